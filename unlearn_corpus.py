"""Unlearning by training on corpora: gradient difference (GD), its LoRA
form (LORA: the same objective through PEFT adapters only, merged before
saving), and the wrong-answer methods WHP and FWF; `unlearn()` runs any
method's objective through the stage runner."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

from toolkit.models import with_lora
from toolkit.names import UnlearnType
from toolkit.prompts import Encoded
from toolkit.registry import Method, register
from toolkit.settings import UnlearnSettings
from toolkit.stage import Objective, Stage, StageResult, StopOutcome, run_stage, unused_settings
from toolkit.training import freeze_layer_ranges

log = logging.getLogger(__name__)


@dataclass
class UnlearnResult:
    """What every unlearning method returns (corpus methods and RMU alike)."""

    save_name: str | None
    forget_accs: dict[str, dict[int, float]]
    forget_accs_calibrated: dict[str, dict[int, float]]
    retain_accs: dict[str, dict[int, float]]
    retain_accs_calibrated: dict[str, dict[int, float]]
    trainable_params: int = 0
    forget_correct: dict[str, dict[int, str]] = field(default_factory=dict)
    steps: int = 0
    stop: StopOutcome | None = None
    save_format: str | None = None
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    update: dict = field(default_factory=dict)  # LoRA: how far the weights moved (toolkit.weight_delta)

    @classmethod
    def from_stage(cls, result: StageResult) -> "UnlearnResult":
        return cls(result.save_path, result.forget.accs, result.forget.calibrated, result.retain.accs,
                   result.retain.calibrated, result.trainable_params, result.forget.correct, result.steps,
                   result.stop, result.save_format, result.seconds, result.phase_seconds, result.update)


@dataclass
class ForgetRetainData:
    """The forget and retain examples of an unlearning run, paired per step."""

    forget: list[Encoded]
    retain: list[Encoded]
    batch_size: int
    stage: Stage

    @classmethod
    def encode(cls, settings: UnlearnSettings, stage: Stage) -> "ForgetRetainData":
        forget = stage.encode(settings.forget_files, settings.loss_type, settings.max_samples)
        retain = stage.encode(settings.retain_files, settings.retain_loss_type, settings.max_samples)
        return cls(forget, retain, settings.train.batch_size, stage)

    def epoch_steps(self, epoch: int):
        """One step per forget batch, each paired with a retain batch (cycled)."""
        forget_batches = self.stage.batches(self.forget, self.batch_size)
        retain_batches = self.stage.batches(self.retain, self.batch_size) if self.retain else [[]]
        return [(f, retain_batches[i % len(retain_batches)]) for i, f in enumerate(forget_batches)]


@dataclass
class CorpusUnlearning:
    """``forget_sign * NLL(forget) + retain_coeff * NLL(retain)``: GD and LoRA
    ascend on the true facts (sign -1), WHP and FWF descend on wrong answers
    (sign +1). With LoRA settings only the adapters train."""

    settings: UnlearnSettings
    forget_sign: float
    uses: frozenset[str] = frozenset({"lora", "freeze_layers"})

    def prepare(self, model, stage: Stage):
        settings = self.settings
        freeze_layer_ranges(model, settings.freeze_layers)
        if settings.lora is not None:
            model = with_lora(model, settings.lora, stage.policy.autocast_dtype)
        self.stage, self.data = stage, ForgetRetainData.encode(settings, stage)
        return model

    def epoch_steps(self, epoch: int):
        return self.data.epoch_steps(epoch)

    def loss(self, model, step):
        forget_batch, retain_batch = step
        retain_batch = retain_batch if self.settings.retain_coeff else []
        nlls = self.stage.grouped_nll(model, [forget_batch, retain_batch])
        loss, metrics = self.forget_sign * nlls[0], {"forget_nll": nlls[0].item()}
        if retain_batch:
            loss = loss + self.settings.retain_coeff * nlls[1]
            metrics["retain_nll"] = nlls[1].item()
        return loss, metrics


GRADIENT_DIFFERENCE = partial(CorpusUnlearning, forget_sign=-1.0)  # GD and LORA
WRONG_ANSWER_DESCENT = partial(CorpusUnlearning, forget_sign=1.0)  # WHP and FWF


def unlearn(settings: UnlearnSettings, objective: Objective | None = None) -> UnlearnResult:
    """Run one unlearning stage with `objective` (default: gradient difference)."""
    objective = objective if objective is not None else GRADIENT_DIFFERENCE(settings)
    unused = unused_settings(settings, objective.uses)
    if unused:
        raise ValueError(f"{', '.join(unused)} set, but {type(objective).__name__} does not use it")
    return UnlearnResult.from_stage(run_stage(settings.train, settings.evals, objective, stop=settings.stop,
                                              save=settings.save, measure_update=True))


register(UnlearnType.GD, Method(GRADIENT_DIFFERENCE))
register(UnlearnType.WHP, Method(WRONG_ANSWER_DESCENT, trains_on="wrong_unlearn_files", mcq=False))
register(UnlearnType.FWF, Method(WRONG_ANSWER_DESCENT, trains_on="fixed_wrong_unlearn_files", mcq=False))
# LoRA unlearning is gradient difference trained through LoRA adapters.
register(UnlearnType.LORA, Method(GRADIENT_DIFFERENCE, lora=True))
