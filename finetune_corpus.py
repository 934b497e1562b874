"""RTT: fine-tune on some forgotten facts (T) and measure how much comes back
on held-out facts (V). The same objective teaches the embedded demo its
made-up facts before unlearning, and, with LoRA settings, is the attacker of
the adapter-relearning probe (only a LoRA adapter trains)."""

from __future__ import annotations

from dataclasses import dataclass, field

from toolkit.evaluation import mean_by_epoch
from toolkit.models import with_lora
from toolkit.names import LossType, on_log2_budget
from toolkit.settings import FinetuneSettings
from toolkit.stage import Stage, StageResult, run_stage
from toolkit.training import freeze_embeddings


@dataclass
class FinetuneResult:
    """Per-epoch accuracies (epoch 0 = before fine-tuning); forget = V."""

    forget_accs_local: dict[int, float]
    forget_accs_calibrated_local: dict[int, float]
    retain_accs_local: dict[int, float]
    retain_accs_calibrated_local: dict[int, float]
    save_name: str | None = None
    forget_correct_local: dict[int, str] | None = None  # per question of V, by epoch (one V file)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # scored along the attacker's budget: V by optimizer step (0, 1, 2, 4, ... and each epoch's end)
    forget_accs_by_step: dict[int, float] | None = None
    forget_correct_by_step: dict[int, str] | None = None
    retain_accs_by_step: dict[int, float] | None = None  # mean over the retain files, where asked

    @classmethod
    def from_stage(cls, result: StageResult) -> "FinetuneResult":
        forget, retain, by_step = result.forget, result.retain, result.by_step
        correct = next(iter(forget.correct.values())) if len(forget.correct) == 1 else None
        step_correct = next(iter(by_step.correct.values())) if by_step and len(by_step.correct) == 1 else None
        return cls(mean_by_epoch(forget.accs), mean_by_epoch(forget.calibrated), mean_by_epoch(retain.accs),
                   mean_by_epoch(retain.calibrated), result.save_path, correct, result.seconds,
                   result.phase_seconds, mean_by_epoch(by_step.accs) if by_step else None, step_correct,
                   mean_by_epoch(result.retain_by_step.accs) if result.retain_by_step else None)


@dataclass
class Finetune:
    """Plain NLL on the training files (formatted by the loss type) and any
    extra corpus files; all weights train (embeddings optional), or only a
    LoRA adapter when the settings carry one."""

    settings: FinetuneSettings
    uses: frozenset[str] = frozenset()

    def prepare(self, model, stage: Stage):
        settings = self.settings
        if not settings.train_embeddings:
            freeze_embeddings(model)
        if settings.lora is not None:
            model = with_lora(model, settings.lora, stage.policy.autocast_dtype)
        self.stage = stage
        self.examples = stage.encode(settings.train_files, settings.loss_type) + stage.encode(settings.extra_corpus_files, LossType.CORPUS)
        return model

    def epoch_steps(self, epoch: int):
        return self.stage.batches(self.examples, self.settings.train.batch_size)

    def loss(self, model, batch):
        loss = self.stage.nll(model, batch)
        return loss, {"train_nll": loss.item()}


def finetune(settings: FinetuneSettings) -> FinetuneResult:
    # ft.budget: none, or log2 (V at steps 1, 2, 4, ... besides each epoch's end; _with_retain: the retain files too)
    budget = None if settings.budget == "none" else on_log2_budget
    return FinetuneResult.from_stage(run_stage(settings.train, settings.evals, Finetune(settings), save=settings.save,
                                               budget=budget, budget_retain=settings.budget == "log2_with_retain"))

