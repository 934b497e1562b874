"""A method added through the registry alone: one `register` call and one objective (the
config block comes from the command line). Used by a pipeline test as a
plugin (`plugins=[toy_method]`): forget-only gradient ascent, no retain term."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.losses import mean_token_nll
from toolkit.registry import Method, register
from toolkit.settings import UnlearnSettings
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
        nll = mean_token_nll(model, self.stage.batch(forget_batch))
        return -nll, {"forget_nll": nll.item()}


register("TOY", Method(ForgetOnlyAscent))
