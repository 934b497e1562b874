"""MCQ evaluation: prompts tokenised once, length-sorted batches, letter
logits at the last position only; accuracy, calibrated accuracy and each
question's correctness, by file and epoch."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from toolkit.data import McqRow, data_file, load_mcq
from toolkit.device import DevicePolicy
from toolkit.losses import decoder_and_head, hidden_states
from toolkit.prompts import Encoded, answer_letter_token_ids, collate, fewshot_prefix, mcq_prompt
from toolkit.settings import EvalFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class McqScore:
    acc: float
    calibrated_acc: float
    correct: tuple[bool, ...] = ()  # per question, in file order (for the bootstrap)


@dataclass(frozen=True)
class QuestionFile:
    """A question file tokenised once: each prompt's token ids and its answer."""

    name: str
    prompts: tuple[tuple[int, ...], ...]
    answers: tuple[int, ...]

    @classmethod
    def build(cls, tokenizer, name: str, rows: Sequence[McqRow], prefix: str = "") -> "QuestionFile":
        prompts = tuple(tuple(tokenizer(prefix + mcq_prompt(r)).input_ids) for r in rows)
        return cls(name, prompts, tuple(r.answer for r in rows))


@torch.no_grad()
def letter_logits(model, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int], pad_token_id: int,
                  batch_size: int, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                  ) -> torch.Tensor:
    """Logits of the four answer letters at each prompt's last position, [N, 4],
    in prompt order. Batches hold prompts of similar length (little padding)
    and the LM head runs on one position per prompt."""
    device = next(model.parameters()).device
    _, head = decoder_and_head(model)
    letters = torch.tensor(list(letter_ids), device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.empty(len(prompts), len(letter_ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([Encoded(list(prompts[i]), list(prompts[i])) for i in chunk], pad_token_id, device)
        with autocast():
            hidden = hidden_states(model, batch)
            last = batch["attention_mask"].sum(1) - 1
            final = hidden[torch.arange(len(chunk), device=device), last]
            out[chunk] = head(final)[:, letters].float().cpu()
    return out


def score_letter_logits(logits: torch.Tensor, answers: Sequence[int]) -> McqScore:
    """Accuracy and calibrated accuracy (each letter's mean logit over the file
    subtracted first, which removes a constant preference for one letter)."""
    truth = torch.tensor(list(answers))
    if len(truth) == 0:
        return McqScore(float("nan"), float("nan"))
    correct = logits.argmax(1) == truth
    calibrated = ((logits - logits.mean(0, keepdim=True)).argmax(1) == truth).float().mean().item()
    return McqScore(correct.float().mean().item(), calibrated, tuple(bool(c) for c in correct))


def correct_bits(correct: Sequence[bool]) -> str:
    """Per-question correctness as a compact string of 0s and 1s."""
    return "".join("1" if c else "0" for c in correct)


@dataclass
class AccuracyLog:
    """Per-file accuracies by epoch: ``{file: {epoch: acc}}``, and each
    question's correctness, ``{file: {epoch: "0110..."}}``."""

    accs: dict[str, dict[int, float]] = field(default_factory=dict)
    calibrated: dict[str, dict[int, float]] = field(default_factory=dict)
    correct: dict[str, dict[int, str]] = field(default_factory=dict)

    def record(self, name: str, epoch: int, score: McqScore) -> None:
        self.accs.setdefault(name, {})[epoch] = score.acc
        self.calibrated.setdefault(name, {})[epoch] = score.calibrated_acc
        self.correct.setdefault(name, {})[epoch] = correct_bits(score.correct)

    def mean_at(self, epoch: int) -> float:
        values = [by_epoch[epoch] for by_epoch in self.accs.values() if epoch in by_epoch]
        return sum(values) / len(values) if values else float("nan")


def mean_by_epoch(by_file: Mapping[str, Mapping[int, Any]]) -> dict[int, float]:
    epochs = sorted({e for accs in by_file.values() for e in accs})
    return {e: sum(accs[e] for accs in by_file.values()) / len(by_file) for e in epochs}


@dataclass
class Evaluator:
    """Scores a stage's forget and retain question files (tokenised once per
    stage) and keeps the results by epoch."""

    forget: list[QuestionFile]
    retain: list[QuestionFile]
    letter_ids: list[int]
    pad_token_id: int
    batch_size: int
    autocast: Callable[[], contextlib.AbstractContextManager]
    forget_log: AccuracyLog = field(default_factory=AccuracyLog)
    retain_log: AccuracyLog = field(default_factory=AccuracyLog)
    # The stop rule's last check: (step, forget scores, retain scores or None).
    # An evaluation at that same step records them instead of scoring again.
    last_check: tuple[int, dict[str, McqScore], dict[str, McqScore] | None] | None = None

    @classmethod
    def build(cls, tokenizer, evals: EvalFiles, data_root: str, k_shot: int, batch_size: int,
              policy: "DevicePolicy") -> "Evaluator":
        def files(names, dev):
            prefix = fewshot_prefix(load_mcq(data_file(data_root, dev)), k_shot) if dev and k_shot else ""
            return [QuestionFile.build(tokenizer, n, load_mcq(data_file(data_root, n)), prefix) for n in names]

        return cls(files(evals.val_files, evals.dev_file), files(evals.val_retain_files, evals.retain_dev_file),
                   answer_letter_token_ids(tokenizer), tokenizer.pad_token_id, batch_size, policy.autocast)

    def score(self, model, files: Sequence[QuestionFile]) -> dict[str, McqScore]:
        was_training = model.training
        model.eval()
        try:
            return {f.name: score_letter_logits(letter_logits(model, f.prompts, self.letter_ids, self.pad_token_id,
                                                              self.batch_size, self.autocast), f.answers)
                    for f in files}
        finally:
            model.train(was_training)

    def __call__(self, model, epoch: int, step: int | None = None) -> tuple[float, float]:
        """Score every file at `epoch` (reusing the stop rule's check when it
        scored the model at this same `step`); returns the mean forget and
        retain accuracy."""
        checked = self.last_check if self.last_check and step is not None and self.last_check[0] == step else None
        forget = checked[1] if checked else self.score(model, self.forget)
        retain = checked[2] if checked and checked[2] is not None else self.score(model, self.retain)
        for log_, scores in ((self.forget_log, forget), (self.retain_log, retain)):
            for name, score in scores.items():
                log_.record(name, epoch, score)
        return self.forget_log.mean_at(epoch), self.retain_log.mean_at(epoch)

    def quick_means(self, model, with_retain: bool, step: int) -> tuple[float, float]:
        """Mean forget (and retain) accuracy at optimizer step `step` (the stop
        rule's check), kept but not recorded: an evaluation at the same step uses it."""
        forget = self.score(model, self.forget)
        retain = self.score(model, self.retain) if with_retain else None
        self.last_check = (step, forget, retain)
        mean = lambda scores: sum(s.acc for s in scores) / len(scores) if scores else float("nan")  # noqa: E731
        return mean(list(forget.values())), mean(list((retain or {}).values()))
