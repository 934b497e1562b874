"""Methods added through the registry alone: one `register` call and one objective (the
config block comes from the command line). Used by pipeline tests as a
plugin (`plugins=[toy_method]`): TOY, forget-only gradient ascent, no retain
term; TOYSCALE, the same with its loss scaled by a hyper-parameter the
method sweeps itself (its `Axis`: `unlearn.toy_scales`)."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.registry import Axis, Method, register
from toolkit.settings import POSITIVE_NUMBERS, UnlearnSettings, setting
from toolkit.stage import Stage
from unlearn_corpus import ForgetRetainData


@dataclass
class ForgetOnlyAscent:
    settings: UnlearnSettings
    uses: frozenset[str] = frozenset()

    def prepare(self, model, stage: Stage):
        self.stage, self.data = stage, ForgetRetainData.encode(self.settings, stage)
        return model

    def epoch_steps(self, epoch: int):
        return self.data.epoch_steps(epoch)

    def loss(self, model, step):
        forget_batch, _ = step
        nll = self.stage.nll(model, forget_batch)
        return -nll, {"forget_nll": nll.item()}


register("TOY", Method(ForgetOnlyAscent))


@dataclass(frozen=True)
class ScaleSettings:
    """TOYSCALE's own setting, one value per run of its axis."""

    ascent_scale: float = setting(POSITIVE_NUMBERS)


@dataclass
class ScaledAscent(ForgetOnlyAscent):
    def loss(self, model, step):
        loss, logs = super().loss(model, step)
        return loss * self.settings.method.ascent_scale, logs


register("TOYSCALE", Method(ScaledAscent, settings=ScaleSettings,
                            axis=Axis("ascent_scale", "unlearn.toy_scales", POSITIVE_NUMBERS)))
