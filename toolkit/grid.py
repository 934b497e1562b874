"""The sweep's grid: one GridPoint per unlearning run, from each method's
config block (epochs, lrs, retain coefficients, its own axis) and the seeds."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from toolkit.names import Datasets, LossType
from toolkit.registry import METHODS
from toolkit.settings import (
    NON_NEGATIVE_INTS,
    POSITIVE_INTS,
    POSITIVE_NUMBERS,
    Allowed,
    ConfigError,
    distinct,
    is_number,
)


def get_log_range(start: float, end: float, step: float) -> list[float]:
    """[start, start*step, start*step^2, ...] below `end` (a Hydra resolver)."""
    start, end, step = float(start), float(end), float(step)
    if start <= 0 or step <= 1:
        raise ConfigError(f"get_log_range needs start > 0 and step > 1, got start={start}, step={step}")
    values, value = [], start
    while value < end * (1 - 1e-9):
        values.append(value)
        value *= step
    return values


def parse_name(value: Any, key: str, allowed: Iterable[str]) -> str:
    allowed = [str(a) for a in allowed]
    if str(value) not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; use one of {', '.join(allowed)}")
    return str(value)


def parse_enum(enum: type, value: Any, key: str) -> Any:
    return enum[parse_name(value, key, [m.name for m in enum])]


@dataclass(frozen=True)
class GridPoint:
    """One unlearning run of the sweep."""

    unlearn_type: str
    dataset: Datasets
    loss_type: LossType
    lr: float
    epochs: int
    retain_coeff: float
    max_samples: int
    steering_coeff: float | None = None
    lora_rank: int = 0
    seed: int = 0
    shown: tuple[str, ...] = field(default=(), compare=False)  # the fields that tell runs apart in the sweep
    # A method's own axes beyond the two the first edition published (rank, steering coefficient): (field, value)
    axes: tuple[tuple[str, Any], ...] = ()

    def value(self, name: str) -> Any:
        """An axis's value at this point, by its field name."""
        return getattr(self, name) if name in SLOTS else dict(self.axes)[name]

    @property
    def label(self) -> str:
        """A short name for progress lines and failures: the method, its own
        axes, what varies within the sweep (see `with_labels`) and the seed."""
        parts = [self.unlearn_type] + ([f"r{self.lora_rank}"] if self.lora_rank else [])
        parts += [f"c{self.steering_coeff:g}"] if self.steering_coeff is not None else []
        parts += [f"{SHORT.get(name, name)}{value:g}" if isinstance(value, float) else f"{SHORT.get(name, name)}{value}"
                  for name, value in self.axes]
        parts += [LABEL_PARTS[name](self) for name in self.shown]
        return " ".join(parts + [f"s{self.seed}"])


# Label names of axes whose field name is long.
SHORT = {"stop_at_forget_acc": "stop"}
# The axes with a slot of their own (their columns were published); any other axis goes in `axes`.
SLOTS = ("lora_rank", "steering_coeff")

LABEL_PARTS = {"dataset": lambda p: p.dataset.name, "lr": lambda p: f"lr{p.lr:g}",
               "retain_coeff": lambda p: f"rc{p.retain_coeff:g}", "epochs": lambda p: f"e{p.epochs}",
               "max_samples": lambda p: f"n{p.max_samples}"}


def with_labels(points: list[GridPoint]) -> list[GridPoint]:
    """The points, each labelled with the fields that take more than one
    value among the points of its method."""
    shown = {}
    for method in {p.unlearn_type for p in points}:
        same = [p for p in points if p.unlearn_type == method]
        shown[method] = tuple(name for name in LABEL_PARTS if len({getattr(p, name) for p in same}) > 1)
    return [replace(p, shown=shown[p.unlearn_type]) for p in points]


@dataclass(frozen=True)
class LrRcGrid:
    lrs: list[float]
    rcs: list[float]


def _retain_coeffs(rcs_cfg, key: str) -> list[float]:
    """Retain coefficients from `{range: [...], add: [...]}` (the paper's form) or a plain list."""
    rcs_cfg = rcs_cfg if rcs_cfg is not None else {}
    if isinstance(rcs_cfg, Mapping):
        values = list(rcs_cfg.get("range", []) or []) + list(rcs_cfg.get("add", []) or [])
    else:
        values = list(rcs_cfg)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
        raise ConfigError(f"{key}: {values!r} is not allowed; give non-negative retain coefficients")
    return list(distinct([float(v) for v in values], key, values))


def _grids_by_rank(mapping, shared: LrRcGrid, key: str) -> dict[int, LrRcGrid]:
    """Optional per-rank `lrs` / `rcs` for LoRA (`by_rank`), for users who
    tune each rank themselves; the stop rule matches forgetting without it."""
    out = {}
    for rank, settings in (mapping or {}).items():
        rank_value = int(rank) if str(rank).lstrip("-").isdigit() else rank
        rank_key = f"{key}.{rank}"
        unknown = set(settings or {}) - {"lrs", "rcs"}
        if unknown:
            raise ConfigError(f"{rank_key}: {sorted(unknown)} not allowed; a rank may set lrs and rcs")
        out[POSITIVE_INTS.each([rank_value], key)[0]] = LrRcGrid(
            POSITIVE_NUMBERS.each(settings["lrs"], f"{rank_key}.lrs") if "lrs" in settings else shared.lrs,
            _retain_coeffs(settings["rcs"], f"{rank_key}.rcs") if "rcs" in settings else shared.rcs)
    return out


def method_block(cfg: Mapping, name: str) -> Mapping:
    key = f"unlearn.types_config.{name}"
    block = cfg["unlearn"]["types_config"].get(name)
    if block is None:
        raise ConfigError(f"{key} is missing; every method in unlearn.types needs a config block")
    return block


def dataset_grid(cfg: Mapping, name: str, dataset: Datasets) -> list[GridPoint]:
    """The paper's grid for one method and dataset, with each method's own
    axis (LORA: ranks, CUT: steering coefficients) and the seeds."""
    method, block = METHODS[name], method_block(cfg, name)
    key = f"unlearn.types_config.{name}"
    ds_cfg = (block.get("datasets_config") or {}).get(dataset.name)
    ds_key = f"{key}.datasets_config.{dataset.name}"
    if ds_cfg is None:
        raise ConfigError(f"{ds_key} is missing; add epochs_lst, lrs and rcs for it")
    loss_type = parse_enum(LossType, block.get("loss_type", "CORPUS"), f"{key}.loss_type")
    epochs = POSITIVE_INTS.each(ds_cfg.get("epochs_lst"), f"{ds_key}.epochs_lst")
    shared = LrRcGrid(POSITIVE_NUMBERS.each(ds_cfg.get("lrs"), f"{ds_key}.lrs"), _retain_coeffs(ds_cfg.get("rcs"), f"{ds_key}.rcs"))
    max_samples = POSITIVE_INTS.each(cfg["unlearn"]["max_samples_lst"], "unlearn.max_samples_lst")
    seeds = NON_NEGATIVE_INTS.each(cfg["seeds"], "seeds")
    if ds_cfg.get("by_rank") and not method.lora:
        raise ConfigError(f"{ds_key}.by_rank is not allowed for {name}; only LORA (a LoRA method) sweeps ranks")
    by_rank = _grids_by_rank(ds_cfg.get("by_rank"), shared, f"{ds_key}.by_rank")
    axes = [[{}]] + [[{axis.field: v} for v in axis.allowed.each(select(cfg, axis.key), axis.key)] for axis in method.axes]
    axes += [[{STOP_AXIS: t} for t in targets] for targets in [stop_targets(cfg)] if len(targets) > 1]
    points = []
    for ms in max_samples:
        for e in epochs:
            for combo in _product(axes):
                grid = by_rank.get(combo.get("lora_rank", 0), shared)
                slots = {k: v for k, v in combo.items() if k in SLOTS}
                others = tuple((k, v) for k, v in combo.items() if k not in SLOTS)
                points += [GridPoint(name, dataset, loss_type, lr, e, rc, ms, seed=s, axes=others, **slots)
                           for lr in grid.lrs for rc in grid.rcs for s in seeds]
    return points


# How deep unlearning goes is a sweep axis of every method when the stop rule names several targets.
STOP_AXIS = "stop_at_forget_acc"
STOP_TARGETS = Allowed("null, a number in [0, 1], or a list of such numbers",
                       lambda v: v is None or (is_number(v) and 0 <= v <= 1))


def stop_targets(cfg: Mapping) -> list[float | None]:
    """`unlearn.stop_at_forget_acc`: one target (or null), or several, each a run of its own."""
    value = cfg["unlearn"][STOP_AXIS]
    if isinstance(value, (list, tuple)):
        return [None if v is None else float(v) for v in STOP_TARGETS.each(value, f"unlearn.{STOP_AXIS}")]
    return [STOP_TARGETS.check(value, f"unlearn.{STOP_AXIS}")]


def stop_target_of(cfg: Mapping, point: GridPoint) -> float | None:
    """The stop rule's target of this run: its own where the sweep names several, else the one."""
    return point.value(STOP_AXIS) if STOP_AXIS in dict(point.axes) else stop_targets(cfg)[0]


def _product(axes: list[list[dict]]) -> list[dict]:
    combos = [{}]
    for values in axes:
        combos = [{**c, **v} for c in combos for v in values]
    return combos


def select(cfg: Mapping, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = value[part]
    return value


def model_name(model_path: str) -> str:
    return Path(model_path.rstrip("/")).name


def unlearned_model_path(cfg: Mapping, point: GridPoint, base_model: str) -> str:
    sc = point.steering_coeff if point.steering_coeff is not None else "none"
    target = stop_target_of(cfg, point)
    stop = f"-stop{target}" if target is not None else ""
    others = "".join(f"-{k}{v}" for k, v in point.axes if k != STOP_AXIS)
    return str(Path(cfg["models_dir"]) / point.unlearn_type / point.dataset.name / cfg["wandb_project_name"] /
               f"rank{point.lora_rank}-sc{sc}-{model_name(base_model)}-rc{point.retain_coeff}-lr{point.lr}"
               f"-epochs{point.epochs}{stop}-seed{point.seed}{others}")
