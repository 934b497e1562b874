"""RTT: fine-tune on some forgotten facts (T) and measure how much comes back
on held-out facts (V). The same objective teaches the embedded demo its
made-up facts before unlearning, and, with LoRA settings, is the attacker of
the adapter-relearning probe (only a LoRA adapter trains)."""

from __future__ import annotations

from dataclasses import dataclass, field

import unlearn_corpus as uc
from unlearn_corpus import LossType


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

    @classmethod
    def from_stage(cls, result: uc.StageResult) -> "FinetuneResult":
        forget, retain = result.forget, result.retain
        correct = next(iter(forget.correct.values())) if len(forget.correct) == 1 else None
        return cls(uc.mean_by_epoch(forget.accs), uc.mean_by_epoch(forget.calibrated), uc.mean_by_epoch(retain.accs),
                   uc.mean_by_epoch(retain.calibrated), result.save_path, correct, result.seconds,
                   result.phase_seconds)


@dataclass
class Finetune:
    """Plain NLL on the training files (formatted by the loss type) and any
    extra corpus files; all weights train (embeddings optional), or only a
    LoRA adapter when the settings carry one."""

    settings: uc.FinetuneSettings
    uses: frozenset[str] = frozenset()

    def prepare(self, model, stage: uc.Stage):
        s = self.settings
        if not s.train_embeddings:
            uc.freeze_embeddings(model)
        if s.lora is not None:
            model = s.lora.attach(model, stage.policy.autocast_dtype)
        self.stage = stage
        self.examples = stage.encode(s.train_files, s.loss_type) + stage.encode(s.extra_corpus_files, LossType.CORPUS)
        return model

    def epoch_steps(self, epoch: int):
        return uc.shuffled_batches(self.examples, self.settings.train.batch_size, self.stage.rng)

    def loss(self, model, batch):
        loss = uc.mean_token_nll(model, self.stage.batch(batch))
        return loss, {"train_nll": loss.item()}


def finetune(settings: uc.FinetuneSettings) -> FinetuneResult:
    return FinetuneResult.from_stage(uc.run_stage(settings.train, settings.evals, Finetune(settings), save=settings.save))


def settings_from_keywords(keywords: dict) -> uc.FinetuneSettings:
    """FinetuneSettings from keyword arguments; keywords not given take
    conf/default.yaml's `ft` values."""
    top = uc.default_config()
    section = top["ft"]
    evals = uc._legacy_evals(keywords)
    save = uc.SaveSettings(keywords.pop("save_name", None), "merged")
    loss_type = keywords.pop("loss_type", section["loss_types"][0])
    own = uc._keywords_split(keywords, ("train_files", "extra_corpus_files", "train_embeddings"))
    train = uc._legacy_train(keywords, section, top, "ft")
    uc._unexpected(keywords, "main")
    return uc.build_settings(uc.FinetuneSettings, {**section, "extra_corpus_files": ()}, "ft", train=train,
                             evals=evals, loss_type=loss_type, lora=None, save=save,
                             **{k: tuple(v) if k.endswith("files") else v for k, v in own.items()})


def main(settings: uc.FinetuneSettings | None = None, /, **keywords) -> FinetuneResult:
    """Fine-tune on `train_files` and evaluate `val_files` (V) and
    `val_retain_files` before training and each `eval_every` epochs. Takes a
    FinetuneSettings or keywords (``main(train_files=..., base_model=..., lr=..., epochs=...)``)."""
    return finetune(settings if settings is not None else settings_from_keywords(dict(keywords)))
