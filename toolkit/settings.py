"""Settings: one frozen dataclass per group of config keys, each value
checked when built (one `error:` line naming the key, the value and what is
allowed), and which of them decide a run's result (its key)."""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Callable, Mapping, Sequence

from toolkit.names import LossType


class ConfigError(ValueError):
    """A bad setting: one line naming the key, the value and what is allowed,
    raised while planning, before any model loads."""


def first_line(err: BaseException) -> str:
    """An error's first non-empty line, short enough for a one-line refusal."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]


def importable(module: str) -> bool:
    """Whether an optional package is installed and imports (flash-attn, triton, bitsandbytes)."""
    try:
        importlib.import_module(module)
    except Exception:  # a broken CUDA extension raises more than ImportError
        return False
    return True


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
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
        """Check every value of a list setting that names runs (a sweep axis):
        each value allowed, and each given once (a repeat would run twice)."""
        if not isinstance(values, (list, tuple)):
            raise ConfigError(f"{key}: {values!r} is not allowed; use a list of {self.describe}")
        if not values and not empty_ok:
            raise ConfigError(f"{key}: [] is not allowed; give at least one value ({self.describe})")
        checked = [self.check(value, key) for value in values]
        distinct(checked, key, shown=values)
        return checked


def distinct(values: Sequence, key: str, shown: Any = None) -> Sequence:
    """`values`, refused when one is given twice: a list that names runs runs
    each of them once."""
    seen: list = []
    for value in values:
        if value in seen:
            raise ConfigError(f"{key}: {list(shown if shown is not None else values)!r} is not allowed; give each "
                              f"value once ({value!r} is given {list(values).count(value)} times)")
        seen.append(value)
    return values


POSITIVE_INTS = Allowed("positive integers", lambda v: is_int(v) and v >= 1)
NON_NEGATIVE_INTS = Allowed("integers >= 0", lambda v: is_int(v) and v >= 0)
POSITIVE_NUMBERS = Allowed("positive numbers", lambda v: is_number(v) and v > 0, float)
NON_NEGATIVE_NUMBERS = Allowed("numbers >= 0", lambda v: is_number(v) and v >= 0, float)
FRACTION_OR_NULL = Allowed("null or a number in [0, 1]", lambda v: v is None or (is_number(v) and 0 <= v <= 1),
                           lambda v: None if v is None else float(v))


OPEN_FRACTION = Allowed("a number in (0, 1)", lambda v: is_number(v) and 0 < v < 1, float)
POSITIVE_OR_NULL = Allowed("null or a positive number", lambda v: v is None or (is_number(v) and v > 0),
                           lambda v: None if v is None else float(v))


BOOLEAN = Allowed("true or false", lambda v: isinstance(v, bool))
AUTO_OR_BOOLEAN = Allowed("auto, true or false", lambda v: v == "auto" or isinstance(v, bool))
TEXT = Allowed("a string", lambda v: isinstance(v, str))
OPTIONAL_TEXT = Allowed("a string or null", lambda v: v is None or isinstance(v, str))
NAMES = Allowed("a list of strings", lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v), tuple)
SOME_NAMES = Allowed("a non-empty list of strings",
                     lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) for x in v), tuple)


# auto: every linear layer inside the model's decoder layers (toolkit.architecture), whatever the family names them
LORA_TARGETS = Allowed("auto or a non-empty list of module names", lambda v: v == "auto" or SOME_NAMES.test(v),
                       lambda v: v if v == "auto" else tuple(v))


LAYER_RANGES = Allowed(
    "a list of [start, end) pairs of layer indices with 0 <= start < end",
    lambda v: isinstance(v, (list, tuple)) and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and all(is_int(i) for i in r) and 0 <= r[0] < r[1] for r in v),
    lambda v: tuple(tuple(r) for r in v))


def one_of(*choices: str) -> Allowed:
    return Allowed(f"one of {', '.join(map(str, choices))}", lambda v: v in choices)


def member_of(enum: type[Enum], exclude: Sequence[Enum] = ()) -> Allowed:
    names = [m.name for m in enum if m not in exclude]
    return Allowed(f"one of {', '.join(names)}", lambda v: str(v) in names, lambda v: enum[str(v)])


_NO_DEFAULT = object()


def setting(allowed: Allowed | None = None, *, in_key: bool = True, key_unless: Any = _NO_DEFAULT,
            default: Any = dataclasses.MISSING):
    """A settings field: what it allows, and whether it decides a run's
    result (part of its resume key) or only how the run is shown. A field
    added after rows were published names its old behaviour in `key_unless`:
    at that value it is left out of the key, so the published keys still hold."""
    return field(default=default, metadata={"allowed": allowed, "in_key": in_key, "key_unless": key_unless})


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
        elif f.default is not dataclasses.MISSING:  # a setting added later: configs written before keep working
            value = f.default
        else:
            raise ConfigError(f"{where} is missing; conf/default.yaml holds every key")
        allowed = f.metadata.get("allowed")
        values[f.name] = allowed.check(value, where) if allowed else value
    return cls(**values)


def key_settings(obj) -> Any:
    """The parts of a settings object that decide a run's result, as plain
    data (fields marked in_key=False, such as labels and wandb, are left out)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: key_settings(getattr(obj, f.name)) for f in fields(obj) if f.metadata.get("in_key", True)
                and getattr(obj, f.name) != f.metadata.get("key_unless", _NO_DEFAULT)}
    if isinstance(obj, (list, tuple)):
        return [key_settings(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): key_settings(v) for k, v in obj.items()}
    return obj


OPTIMIZER_NAMES = ("lion", "adamw")
LION_UPDATES = ("auto", "library", "lean", "compiled")
# The `train:` section's keys: how every stage's step computes
TRAIN_SECTION_KEYS = ("gradient_checkpointing", "head_at_labels", "length_buckets", "lion_update")
PROGRESS_MODES = ("auto", "bars", "lines", "off")
WANDB_MODES = ("online", "offline", "disabled")
SAVE_FORMATS = ("merged", "adapter")
# How a question is scored: the arg-max answer letter after the listed choices
# (the paper's), or each choice's log-likelihood as a continuation of the
# question, summed or per byte (lm-evaluation-harness's acc and acc_norm).
SCORING_MODES = ("letter", "choice", "choice_norm")
SCORING = one_of(*SCORING_MODES)
BUDGETS = ("none", "log2", "log2_with_retain")


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
    # How a step computes, not what (the `train:` section; the same result to rounding, so not in a run key):
    # recompute activations in the backward pass: memory for time (7B runs)
    gradient_checkpointing: bool = setting(BOOLEAN, in_key=False, default=False)
    # the LM head only at the positions the loss or the score reads (false: logits at every position)
    head_at_labels: bool = setting(BOOLEAN, in_key=False, default=True)
    # batches of rows of similar length (false: rows in random order, padded to the longest)
    length_buckets: bool = setting(BOOLEAN, in_key=False, default=True)
    # Lion's update: lion-pytorch's own function, the same arithmetic in fewer passes over memory (lean),
    # one compiled pass (compiled: equal to rounding), or auto (Triton where the device policy picks it, else lean)
    lion_update: str = setting(one_of(*LION_UPDATES), in_key=False, default="auto")


@dataclass(frozen=True)
class EvalFiles:
    """The question files a stage is scored on."""

    val_files: tuple[str, ...] = setting(NAMES)
    val_retain_files: tuple[str, ...] = setting(NAMES)
    dev_file: str = setting(TEXT)  # k-shot examples for the forget files
    retain_dev_file: str = setting(TEXT)
    scoring: str = setting(SCORING, key_unless="letter", default="letter")


@dataclass(frozen=True)
class LoraSettings:
    lora_rank: int = setting(POSITIVE_INTS)
    lora_alpha: float | None = setting(POSITIVE_OR_NULL)  # null = 2 * rank
    lora_target_modules: tuple[str, ...] | str = setting(LORA_TARGETS)
    # Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023) instead of alpha/r:
    # with a fixed alpha the update's size then hardly depends on r, so one lr serves every rank.
    use_rslora: bool = setting(BOOLEAN)



@dataclass(frozen=True)
class StopRule:
    """Stop unlearning at matched forgetting: every `stop_check_every`
    optimizer steps, score the forget files and stop at the first check at or
    below `stop_at_forget_acc`; a retain accuracy below `stop_retain_floor`
    stops the run first and flags it."""

    stop_at_forget_acc: float | None = setting(FRACTION_OR_NULL)
    stop_check_every: int = setting(POSITIVE_INTS)
    stop_retain_floor: float | None = setting(FRACTION_OR_NULL)
    # A check first scores this many questions per file, drawn at random, and continues the run on them
    # alone when their mean is above the threshold with confidence 1 - stop_check_alpha (every stop is still
    # decided on exact counts); 0: every check counts exactly (the published studies).
    stop_check_sample: int = setting(NON_NEGATIVE_INTS, key_unless=0, default=0)
    stop_check_alpha: float = setting(OPEN_FRACTION, key_unless=0.001, default=0.001)

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
    # V scored along the attacker's budget too: at optimizer steps 1, 2, 4, 8, ... (log2), besides each epoch's
    # end; log2_with_retain scores the retain files there as well
    budget: str = setting(one_of(*BUDGETS), key_unless="none", default="none")


def train_settings(section: Mapping, top: Mapping, key: str, **given) -> TrainSettings:
    """TrainSettings from a stage section (`unlearn`, `ft`, `teach`) and the
    top-level keys it shares (data root, device, wandb, progress)."""
    device = given.pop("device", top["device"])
    if not isinstance(device, DeviceSettings):
        device = build_settings(DeviceSettings, {**top["device"], **(device or {})}, "device")
    shared = {k: top[k] for k in ("data_root", "wandb_mode", "wandb_project_name", "progress") if k in top}
    computing = dict(top.get("train") or {})
    unknown = sorted(set(computing) - set(TRAIN_SECTION_KEYS))
    if unknown:
        raise ConfigError(f"train.{unknown[0]} is not a setting; the train section holds {', '.join(TRAIN_SECTION_KEYS)}")
    allowed = {f.name: f.metadata["allowed"] for f in fields(TrainSettings)}
    for name, value in computing.items():  # named as the user wrote them (train.*), not as the stage's section
        allowed[name].check(value, f"train.{name}")
    return build_settings(TrainSettings, {**shared, **section, **computing}, key, device=device, **given)
