"""Prompts and training examples, and their tokens: the MCQ prompt, the
examples each loss type trains on, encoding with loss on the target only,
batches of similar length, and the answer-letter tokens."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from toolkit.data import McqRow, data_file, load_training_rows
from toolkit.names import IGNORE_INDEX, LETTERS, LossType


@dataclass(frozen=True)
class TextPair:
    """A training example: the loss is taken on `target` tokens only."""

    prefix: str
    target: str


def mcq_prompt(row: McqRow) -> str:
    lines = [row.question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, row.choices)]
    return "\n".join(lines) + "\nAnswer:"


def choice_prompt(row: McqRow) -> str:
    """The question alone, as a choice's continuation follows it (the QUESTION_ANSWER and NUMBER forms)."""
    return f"{row.question}\nAnswer:"


def fewshot_prefix(dev_rows: Sequence[McqRow], k_shot: int) -> str:
    return "".join(f"{mcq_prompt(r)} {LETTERS[r.answer]}\n\n" for r in dev_rows[:k_shot])


def _letter(row: McqRow) -> str:
    return LETTERS[row.answer]


def _choice(row: McqRow) -> str:
    return row.choices[row.answer]


MCQ_EXAMPLE_BUILDERS: dict[LossType, Callable[[McqRow], TextPair]] = {
    LossType.LETTER: lambda r: TextPair(mcq_prompt(r), f" {_letter(r)}"),
    LossType.LETTER_ANSWER: lambda r: TextPair(mcq_prompt(r), f" {_letter(r)}. {_choice(r)}"),
    LossType.QUESTION_LETTER_ANSWER: lambda r: TextPair("", f"{mcq_prompt(r)} {_letter(r)}. {_choice(r)}"),
    LossType.QUESTION_ANSWER: lambda r: TextPair("", f"{choice_prompt(r)} {_choice(r)}"),
    LossType.NUMBER: lambda r: TextPair(choice_prompt(r), f" {_choice(r)}"),
    # An MCQ file under the corpus loss is trained on as plain text.
    LossType.CORPUS: lambda r: TextPair("", f"{mcq_prompt(r)} {_letter(r)}. {_choice(r)}"),
}


def load_examples(path: str | os.PathLike, loss_type: LossType) -> list[TextPair]:
    """Corpus files give plain text; MCQ files are formatted by loss type."""
    rows = load_training_rows(path)
    if rows and isinstance(rows[0], str):
        return [TextPair("", text) for text in rows]
    return [MCQ_EXAMPLE_BUILDERS[loss_type](row) for row in rows]


def load_examples_from(data_root: str, names: Sequence[str], loss_type: LossType) -> list[TextPair]:
    return [ex for name in names for ex in load_examples(data_file(data_root, name), loss_type)]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode(tokenizer, pair: TextPair, max_length: int) -> Encoded:
    # The prefix carries the tokenizer's special tokens (BOS); the target is
    # tokenised on its own so " A" is the same token that follows "Answer:".
    head = tokenizer(pair.prefix).input_ids
    tail = tokenizer(pair.target, add_special_tokens=False).input_ids
    ids = (head + tail)[:max_length]
    labels = ([IGNORE_INDEX] * len(head) + tail)[:max_length]
    return Encoded(ids, labels)


def collate(examples: Sequence[Encoded], pad_token_id: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad; padded positions get label IGNORE_INDEX and mask 0."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def shuffled_batches(items: Sequence[Encoded], batch_size: int, rng: random.Random,
                     by_length: bool = True) -> list[list[Encoded]]:
    """Batches of similar length in random order: on CPU, padding is most of
    the cost when 15-token sentences share a batch with 50-token questions
    (`by_length=False`: rows in random order, as most trainers batch them)."""
    order = list(items)
    rng.shuffle(order)
    if by_length:
        order.sort(key=lambda e: len(e.input_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def limit_samples(items: list, max_samples: int | None, rng: random.Random) -> list:
    if max_samples is None or max_samples <= 0 or len(items) <= max_samples:
        return items
    return rng.sample(items, max_samples)


def encode_files(tokenizer, data_root: str, names: Sequence[str], loss_type: LossType, *,
                 max_samples: int | None, rng: random.Random, max_length: int) -> list[Encoded]:
    pairs = limit_samples(load_examples_from(data_root, names, loss_type), max_samples, rng)
    return [encode(tokenizer, pair, max_length) for pair in pairs]


def answer_letter_token_ids(tokenizer) -> list[int]:
    """The token ids that follow "Answer:" for " A".." D" with this tokenizer.

    Byte-level BPE spells them "ĠA", SentencePiece "▁A"; taking the first token
    of "A. " (the paper's choice) is wrong for both."""
    prefix = tokenizer("Answer:", add_special_tokens=False).input_ids
    ids = []
    for letter in LETTERS:
        full = tokenizer(f"Answer: {letter}", add_special_tokens=False).input_ids
        if full[: len(prefix)] != prefix or len(full) != len(prefix) + 1:
            raise ValueError(f"tokenizer splits 'Answer: {letter}' as {tokenizer.convert_ids_to_tokens(full)}; "
                             "expected 'Answer:' followed by one letter token")
        ids.append(full[-1])
    if len(set(ids)) != len(LETTERS):
        raise ValueError(f"answer letters share tokens: {tokenizer.convert_ids_to_tokens(ids)}")
    return ids
