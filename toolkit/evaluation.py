"""MCQ evaluation: prompts tokenised once, length-sorted batches, letter
logits at the last position only; accuracy, calibrated accuracy and each
question's correctness, by file and epoch."""

from __future__ import annotations

import contextlib
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from toolkit.data import McqRow, data_file, load_mcq
from toolkit.device import DevicePolicy
from toolkit.losses import decoder_and_head, hidden_states
from toolkit.prompts import Encoded, answer_letter_token_ids, choice_prompt, collate, fewshot_prefix, mcq_prompt
from toolkit.settings import EvalFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class McqScore:
    acc: float
    calibrated_acc: float
    correct: tuple[bool, ...] = ()  # per question, in file order (for the bootstrap)


@dataclass(frozen=True)
class QuestionFile:
    """A question file tokenised once: each prompt's token ids and its answer;
    under choice scoring also each choice's continuation ids and its length
    in bytes (acc_norm's denominator)."""

    name: str
    prompts: tuple[tuple[int, ...], ...]
    answers: tuple[int, ...]
    choices: tuple[tuple[tuple[int, ...], ...], ...] = ()
    choice_bytes: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def build(cls, tokenizer, name: str, rows: Sequence[McqRow], prefix: str = "",
              scoring: str = "letter") -> "QuestionFile":
        answers = tuple(r.answer for r in rows)
        if scoring == "letter":
            return cls(name, tuple(tuple(tokenizer(prefix + mcq_prompt(r)).input_ids) for r in rows), answers)
        # The continuation is tokenised on its own, as the QUESTION_ANSWER loss trains it.
        continuations = [[f" {c}" for c in r.choices] for r in rows]
        return cls(name, tuple(tuple(tokenizer(prefix + choice_prompt(r)).input_ids) for r in rows), answers,
                   tuple(tuple(tuple(tokenizer(c, add_special_tokens=False).input_ids) for c in cs)
                         for cs in continuations),
                   tuple(tuple(len(c.encode("utf-8")) for c in cs) for cs in continuations))


@torch.no_grad()
def batch_choice_logprobs(model, prompts: Sequence[Sequence[int]], choices, batch: Sequence[int], pad_token_id: int,
                          autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                          head_at_labels: bool = True) -> torch.Tensor:
    """Each choice's summed log-probability as a continuation of its prompt,
    [len(batch), 4], in one forward pass per question: the prompt and its four
    continuations are packed into one row whose attention mask lets each
    continuation see the prompt and itself only, with positions restarting
    after the prompt (so every continuation is scored as if alone)."""
    device = next(model.parameters()).device
    decoder, head = decoder_and_head(model)
    rows, spans = [], []
    for i in batch:
        ids, pos, owner = list(prompts[i]), list(range(len(prompts[i]))), [-1] * len(prompts[i])
        row_spans = []
        for c, tokens in enumerate(choices[i]):
            row_spans.append((len(ids), len(tokens)))
            ids += tokens
            pos += range(len(prompts[i]), len(prompts[i]) + len(tokens))
            owner += [c] * len(tokens)
        rows.append((ids, pos, owner, len(prompts[i])))
        spans.append(row_spans)
    width = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    for r, (ids, pos, owner, prompt_len) in enumerate(rows):
        n = len(ids)
        input_ids[r, :n], position_ids[r, :n] = torch.tensor(ids), torch.tensor(pos)
        o = torch.tensor(owner)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        same = (o[:, None] == o[None, :]) | (o[None, :] == -1)  # its own choice, or the prompt
        allowed[r, 0, :n, :n] = causal & same
        allowed[r, 0, n:, :] = torch.eye(width, dtype=torch.bool)[n:]  # padding sees itself (no empty rows)
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with autocast():
        hidden = decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                         position_ids=position_ids.to(device)).last_hidden_state
    # token t of a continuation is predicted at the position before it: the prompt's last, then its own; the head
    # runs once for the whole batch, on those positions of every continuation (one large matmul, not one a row)
    row_of, where, targets, lengths = [], [], [], []
    for r, (ids, pos, owner, prompt_len) in enumerate(rows):
        for start, length in spans[r]:
            positions = [prompt_len - 1, *range(start, start + length - 1)]
            row_of += [r] * len(positions)
            where += positions
            targets += ids[start:start + length]
            lengths.append(length)
    row_of, where = torch.tensor(row_of, device=device), torch.tensor(where, device=device)
    with autocast():
        logits = head(hidden[row_of, where]) if head_at_labels else head(hidden)[row_of, where]
        logprobs = logits.float().log_softmax(-1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
    sums = torch.stack([part.sum() for part in logprobs.cpu().split(lengths)])
    out = sums.view(len(batch), len(choices[batch[0]]))
    return out


def length_sorted_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of similar length (little padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def batch_letter_logits(model, prompts: Sequence[Sequence[int]], batch: Sequence[int], letter_ids: Sequence[int],
                        pad_token_id: int,
                        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                        head_at_labels: bool = True) -> torch.Tensor:
    """Logits of the four answer letters at the last position of each prompt
    in `batch` (indices into `prompts`), [len(batch), 4]; the LM head runs on
    one position per prompt."""
    device = next(model.parameters()).device
    _, head = decoder_and_head(model)
    letters = torch.tensor(list(letter_ids), device=device)
    inputs = collate([Encoded(list(prompts[i]), list(prompts[i])) for i in batch], pad_token_id, device)
    with autocast():
        hidden = hidden_states(model, inputs)
        last = inputs["attention_mask"].sum(1) - 1
        rows = torch.arange(len(batch), device=device)
        logits = head(hidden[rows, last]) if head_at_labels else head(hidden)[rows, last]
        return logits[:, letters].float().cpu()


def letter_logits(model, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int], pad_token_id: int,
                  batch_size: int, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                  ) -> torch.Tensor:
    """Logits of the four answer letters at each prompt's last position, [N, 4],
    in prompt order."""
    out = torch.empty(len(prompts), len(letter_ids))
    for batch in length_sorted_batches(prompts, batch_size):
        out[batch] = batch_letter_logits(model, prompts, batch, letter_ids, pad_token_id, autocast)
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
    mode: str = "letter"  # toolkit.settings.SCORING_MODES
    forget_log: AccuracyLog = field(default_factory=AccuracyLog)
    retain_log: AccuracyLog = field(default_factory=AccuracyLog)
    last_check: "Check | None" = None  # the stop rule's latest scoring
    by_step: AccuracyLog | None = None  # V by optimizer step, when RTT is scored along its budget
    retain_by_step: AccuracyLog | None = None  # the retain files by step, where that is asked too
    head_at_labels: bool = True  # train.head_at_labels: the LM head only at the positions a score reads

    @classmethod
    def build(cls, tokenizer, evals: EvalFiles, data_root: str, k_shot: int, batch_size: int,
              policy: "DevicePolicy", head_at_labels: bool = True) -> "Evaluator":
        def files(names, dev):
            prefix = fewshot_prefix(load_mcq(data_file(data_root, dev)), k_shot) if dev and k_shot else ""
            return [QuestionFile.build(tokenizer, n, load_mcq(data_file(data_root, n)), prefix, evals.scoring)
                    for n in names]

        return cls(files(evals.val_files, evals.dev_file), files(evals.val_retain_files, evals.retain_dev_file),
                   answer_letter_token_ids(tokenizer), tokenizer.pad_token_id, batch_size, policy.autocast,
                   evals.scoring, head_at_labels=head_at_labels)

    def batch_scores(self, model, f: QuestionFile, batch: Sequence[int]) -> torch.Tensor:
        """[len(batch), 4] scores whose arg-max is the model's answer."""
        if self.mode == "letter":
            return batch_letter_logits(model, f.prompts, batch, self.letter_ids, self.pad_token_id, self.autocast,
                                       self.head_at_labels)
        logprobs = batch_choice_logprobs(model, f.prompts, f.choices, batch, self.pad_token_id, self.autocast,
                                         self.head_at_labels)
        if self.mode == "choice_norm":
            logprobs = logprobs / torch.tensor([f.choice_bytes[i] for i in batch], dtype=torch.float32)
        return logprobs

    def scoring(self, model, files: Sequence[QuestionFile], sample: int = 0, alpha: float = 0.001,
                rng: random.Random | None = None) -> "Scoring":
        return Scoring(self, model, list(files), sample=sample, alpha=alpha, rng=rng)

    def score(self, model, files: Sequence[QuestionFile]) -> dict[str, McqScore]:
        return self.scoring(model, files).finish()

    def score_at_step(self, model, step: int) -> float:
        """V (and the retain files, where asked) at an optimizer step of the budget schedule; V's mean accuracy."""
        retain = self.score(model, self.retain) if self.retain_by_step is not None else {}
        self.record_by_step(step, self.score(model, self.forget), retain)
        return self.by_step.mean_at(step)

    def record_by_step(self, step: int, forget: Mapping[str, McqScore], retain: Mapping[str, McqScore]) -> None:
        for log_, scores in ((self.by_step, forget), (self.retain_by_step, retain)):
            for name, score in scores.items() if log_ is not None else ():
                log_.record(name, step, score)

    def __call__(self, model, epoch: int, step: int | None = None) -> tuple[float, float]:
        """Score every file at `epoch` (finishing the stop rule's check when it
        scored the model at this same `step`); returns the mean forget and
        retain accuracy."""
        checked = self.last_check if self.last_check and step is not None and self.last_check.step == step else None
        forget = checked.forget.finish() if checked else self.score(model, self.forget)
        retain = checked.retain.finish() if checked and checked.retain else self.score(model, self.retain)
        for log_, scores in ((self.forget_log, forget), (self.retain_log, retain)):
            for name, score in scores.items():
                log_.record(name, epoch, score)
        if step is not None:
            self.record_by_step(step, forget, retain)
        return self.forget_log.mean_at(epoch), self.retain_log.mean_at(epoch)


@dataclass
class Check:
    """The stop rule's scoring at one optimizer step (possibly unfinished); an
    evaluation at that same step finishes and records it instead of scoring again."""

    step: int
    forget: "Scoring"
    retain: "Scoring | None"


# A bound decides only when it clears the threshold by more than float32
# rounding of an accuracy could move the exact mean.
MARGIN = 1e-6


def poisson_tail_mean(wrong: int, alpha: float) -> float:
    """The smallest mean mu at which Chernoff's bound on P(W <= wrong), for W
    a sum of independent Bernoullis of mean mu, is at most alpha:
    exp(-mu) (e mu / wrong)^wrong <= alpha (exp(-mu) <= alpha when wrong = 0)."""
    if wrong == 0:
        return math.log(1 / alpha)
    log_bound = lambda mu: -mu + wrong + wrong * math.log(mu / wrong)  # noqa: E731 - decreasing for mu > wrong
    low, high = float(wrong), wrong + 2 * math.log(1 / alpha) + 2 * math.sqrt(wrong * math.log(1 / alpha)) + 1
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if log_bound(middle) <= math.log(alpha) else (middle, high)
    return high


def sampled_lower_bound(correct: Sequence[int], drawn: Sequence[int], sizes: Sequence[int], alpha: float) -> float:
    """A lower bound, at confidence 1 - alpha, on the mean over files of each
    file's accuracy, from `correct[f]` right answers among `drawn[f]` of its
    `sizes[f]` questions drawn at random without replacement (the same number
    from every file not drawn whole). The wrong answers in the sample number
    on average n * (the sum over files of their error rates); drawing without
    replacement only concentrates that count (Hoeffding 1963), so Chernoff's
    bound for independent draws holds, and a mean at or below the bound would
    show this few wrong answers with probability at most alpha."""
    whole = [f for f in range(len(sizes)) if drawn[f] >= sizes[f]]  # known exactly
    parts = [f for f in range(len(sizes)) if drawn[f] < sizes[f]]
    known_errors = sum((sizes[f] - correct[f]) / sizes[f] for f in whole)
    if not parts:
        return 1 - known_errors / len(sizes)
    n = min(drawn[f] for f in parts)
    wrong = sum(drawn[f] - correct[f] for f in parts)
    return 1 - (known_errors + poisson_tail_mean(wrong, alpha) / n) / len(sizes)


@dataclass
class Scoring:
    """Question files scored a batch at a time, so that the stop rule can stop
    scoring once its decision is certain (`until`) and an evaluation at the
    same step can finish the rest (`finish`). The batches are `letter_logits`'s,
    so every question's logits are those of one pass. With `sample`, that many
    questions per file, drawn with `rng`, are scored first, and at that point
    the lower bound is the larger of the exact one and the sample's bound at
    confidence 1 - `alpha` (`sampled_lower_bound`)."""

    evaluator: Evaluator
    model: Any
    files: list[QuestionFile]
    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)
    pending: list = field(default_factory=list)  # (file, batch of prompt indices) not scored yet
    questions: int = 0  # scored so far
    sample: int = 0
    alpha: float = 0.001
    rng: random.Random | None = None
    drawn: dict[str, int] = field(default_factory=dict)  # each file's questions in the random sample

    def __post_init__(self):
        rest = []
        for f in self.files:
            self.logits[f.name] = torch.empty(len(f.prompts), len(self.evaluator.letter_ids))
            self.correct[f.name], self.left[f.name] = 0, len(f.prompts)
            drawn = (self.rng or random.Random(0)).sample(range(len(f.prompts)), min(self.sample, len(f.prompts))) \
                if self.sample else []
            self.drawn[f.name] = len(drawn)
            self.pending += self._batches(f, drawn)
            rest += self._batches(f, sorted(set(range(len(f.prompts))) - set(drawn)))
        self.pending += rest  # every file's sample first, then the rest

    def _batches(self, f: QuestionFile, indices: Sequence[int]) -> list:
        indices = list(indices)
        return [(f, [indices[i] for i in batch])
                for batch in length_sorted_batches([f.prompts[i] for i in indices], self.evaluator.batch_size)]

    @property
    def complete(self) -> bool:
        return not self.pending

    def bounds(self) -> tuple[float, float]:
        """The lowest and highest mean accuracy (over files) the questions not
        yet scored could still give."""
        sizes = {f.name: len(f.prompts) for f in self.files}
        if not sizes or not all(sizes.values()):
            return float("nan"), float("nan")
        low = sum(self.correct[n] / sizes[n] for n in sizes) / len(sizes)
        high = sum((self.correct[n] + self.left[n]) / sizes[n] for n in sizes) / len(sizes)
        if self.sample and self.questions == sum(self.drawn.values()) and not self.complete:
            low = max(low, sampled_lower_bound([self.correct[n] for n in sizes], [self.drawn[n] for n in sizes],
                                               list(sizes.values()), self.alpha))
        return low, high

    def until(self, decided: Callable[[float, float], bool] = lambda low, high: False) -> "Scoring":
        """Score batches until `decided(low, high)` holds, or all are scored."""
        ev, model = self.evaluator, self.model
        was_training = model.training
        model.eval()
        try:
            while self.pending and not decided(*self.bounds()):
                f, batch = self.pending.pop(0)
                logits = ev.batch_scores(model, f, batch)
                self.logits[f.name][batch] = logits
                answers = torch.tensor([f.answers[i] for i in batch])
                self.correct[f.name] += int((logits.argmax(1) == answers).sum())
                self.left[f.name] -= len(batch)
                self.questions += len(batch)
        finally:
            model.train(was_training)
        return self

    def finish(self) -> dict[str, McqScore]:
        self.until()
        return {f.name: score_letter_logits(self.logits[f.name], f.answers) for f in self.files}

    def mean(self) -> float:
        """The mean accuracy over files, as an evaluation computes it (finishing first)."""
        scores = list(self.finish().values())
        return sum(s.acc for s in scores) / len(scores) if scores else float("nan")

    def at_least(self, threshold: float) -> float:
        """The mean accuracy, or, once the mean is certainly at least
        `threshold`, a lower bound that is (scoring stops there)."""
        self.until(lambda low, high: low >= threshold + MARGIN)
        return self.mean() if self.complete else self.bounds()[0]

    def above(self, threshold: float) -> float:
        """The mean accuracy, or, once the mean is certainly above `threshold`,
        a lower bound that is (scoring stops there)."""
        self.until(lambda low, high: low > threshold + MARGIN)
        return self.mean() if self.complete else self.bounds()[0]
