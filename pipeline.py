"""Unlearn a model, then test whether the knowledge is really gone.

`python pipeline.py --config-name=NAME key=value ...` (Hydra). The driver
plans and checks the whole sweep before any model loads, then runs it as Ray
tasks: teaching (cached), a pre-flight check, one unlearning task per grid
point, and after each the probes of its model: RTT on every held-out split,
the adapter-relearning RTT and the quantization probe. Every finished job
writes its own CSV row under `results_dir`; a rerun skips what is finished;
a failing job is recorded and the others go on.

Reading order: dataset registry -> method registry -> configuration and grid
-> jobs (settings, keys, rows) -> plan -> checks before any model loads ->
Ray -> the sweep -> the entry point.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import socket
import sys
import time
import traceback
import warnings
from collections import deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import hydra
import pandas as pd
import ray
from omegaconf import DictConfig, OmegaConf

import finetune_corpus
import unlearn_corpus as uc
from rmu import unlearn_pipeline as rmu
from unlearn_corpus import (POSITIVE_INTS, POSITIVE_NUMBERS, ConfigError, DataFormat, Datasets,  # noqa: F401
                            LossType, UnlearnType)

log = logging.getLogger("pipeline")
# Run as a script this module is __main__; plugins `import pipeline` to add
# their registry rows, and must reach this module rather than a second copy.
sys.modules.setdefault("pipeline", sys.modules[__name__])


# --------------------------------------------------------------------------
# Dataset registry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetFiles:
    """File names relative to the data root, without `.jsonl`."""

    unlearn_files: tuple[str, ...]
    wrong_unlearn_files: tuple[str, ...]
    fixed_wrong_unlearn_files: tuple[str, ...]
    val_files: tuple[str, ...]
    retain_files: tuple[str, ...]
    val_retain_files: tuple[str, ...]
    dev_file: str
    retain_dev_file: str
    generated_dir: str | None = None  # a folder the project writes itself when absent

    def training_files(self, data_format: DataFormat, corpus: str = "unlearn_files") -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(forget, retain) files to train on: the method's corpus, or with MCQ
        the question files of the same facts."""
        if data_format == DataFormat.MCQ:
            return self.val_files, self.val_retain_files
        return getattr(self, corpus), self.retain_files

    def question_files(self) -> set[str]:
        """Files read as multiple-choice questions (evaluation, k-shot, MCQ training)."""
        return {*self.val_files, *self.val_retain_files} | {f for f in (self.dev_file, self.retain_dev_file) if f}

    def text_files(self) -> set[str]:
        """Training files, corpus or MCQ."""
        return {*self.unlearn_files, *self.wrong_unlearn_files, *self.fixed_wrong_unlearn_files, *self.retain_files}

    def all_files(self) -> list[str]:
        return sorted(self.question_files() | self.text_files())

    def evals(self, with_retain: bool = True, val_files: Sequence[str] | None = None) -> uc.EvalFiles:
        return uc.EvalFiles(tuple(self.val_files if val_files is None else val_files),
                            self.val_retain_files if with_retain else (), self.dev_file, self.retain_dev_file)


MMLU_DIR = "mmlu_cats_random_trimmed"
MMLU_FORGET_CATS = ("STEM", "business", "chemistry", "culture", "geography")
MMLU_RETAIN_CATS = ("health", "history", "law", "philosophy", "social sciences")
YEARS_DIR, RANDOM_BD_DIR, WMDP_DIR = "dates-years-trimmed", "random_bd", "wmdp-deduped"


def _files(directory: str, pattern: str, keys: Iterable) -> tuple[str, ...]:
    return tuple(f"{directory}/{pattern.format(k)}" for k in keys)


MMLU_RETAIN = _files(MMLU_DIR, "corpus_mmlu_{}", MMLU_RETAIN_CATS)
MMLU_VAL_RETAIN = _files(MMLU_DIR, "mmlu_{}", MMLU_RETAIN_CATS)
FIVE, TEN = range(5), range(10)

DATASETS: dict[Datasets, DatasetFiles] = {
    Datasets.MMLU: DatasetFiles(
        _files(MMLU_DIR, "corpus_mmlu_{}", MMLU_FORGET_CATS), _files(MMLU_DIR, "whp_corpus_mmlu_{}", MMLU_FORGET_CATS),
        _files(MMLU_DIR, "fwf_corpus_mmlu_{}", MMLU_FORGET_CATS), _files(MMLU_DIR, "mmlu_{}", MMLU_FORGET_CATS),
        MMLU_RETAIN, MMLU_VAL_RETAIN, f"{MMLU_DIR}/dev", f"{MMLU_DIR}/dev"),
    Datasets.YEARS_MMLU_RETAIN: DatasetFiles(
        _files(YEARS_DIR, "corpus_split_{}", FIVE), _files(YEARS_DIR, "whp_corpus_split_{}", FIVE),
        _files(YEARS_DIR, "fwf_corpus_split_{}", FIVE), _files(YEARS_DIR, "split_{}", FIVE),
        MMLU_RETAIN, MMLU_VAL_RETAIN, f"{YEARS_DIR}/dev", f"{MMLU_DIR}/dev"),
    Datasets.RANDOM_BD_SAME_RETAIN: DatasetFiles(
        _files(RANDOM_BD_DIR, "corpus_split_{}", FIVE), _files(RANDOM_BD_DIR, "whp_corpus_split_{}", FIVE),
        _files(RANDOM_BD_DIR, "fwf_corpus_split_{}", FIVE), _files(RANDOM_BD_DIR, "split_{}", FIVE),
        _files(RANDOM_BD_DIR, "corpus_split_{}", range(5, 10)), _files(RANDOM_BD_DIR, "split_{}", range(5, 10)),
        f"{RANDOM_BD_DIR}/dev", f"{RANDOM_BD_DIR}/dev", generated_dir=RANDOM_BD_DIR),
    Datasets.RANDOM_BD_ALL_SPLITS: DatasetFiles(
        _files(RANDOM_BD_DIR, "corpus_split_{}", TEN), _files(RANDOM_BD_DIR, "whp_corpus_split_{}", TEN),
        _files(RANDOM_BD_DIR, "fwf_corpus_split_{}", TEN), _files(RANDOM_BD_DIR, "split_{}", TEN),
        (), (), f"{RANDOM_BD_DIR}/dev", f"{RANDOM_BD_DIR}/dev", generated_dir=RANDOM_BD_DIR),
    # The paper's WMDP retain corpus (wikitext) was never published: MMLU retain stands in.
    Datasets.WMDP_MCQ_CORPUS: DatasetFiles(
        _files(WMDP_DIR, "corpus_split_{}", FIVE), _files(WMDP_DIR, "whp_corpus_split_{}", FIVE),
        _files(WMDP_DIR, "fwf_corpus_split_{}", FIVE), _files(WMDP_DIR, "split_{}", FIVE),
        MMLU_RETAIN, MMLU_VAL_RETAIN, f"{WMDP_DIR}/dev", f"{MMLU_DIR}/dev"),
}


# --------------------------------------------------------------------------
# Method registry: everything method-specific, one row each
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """A sweep axis of one method: a GridPoint field and the config list it comes from."""

    field: str
    key: str
    allowed: uc.Allowed


@dataclass(frozen=True)
class Method:
    """One unlearning method. Adding a method is one row here (or from a plugin
    module, `plugins: [module]`), one objective and one block in
    `unlearn.types_config`."""

    objective: Callable[[uc.UnlearnSettings], uc.Objective]  # builds the stage runner's objective
    trains_on: str = "unlearn_files"  # the DatasetFiles corpus it trains on (data_format CORPUS)
    mcq: bool = True  # whether unlearn.data_format=MCQ applies (False: it needs its own corpora)
    lora: bool = False  # trains LoRA adapters, swept over unlearn.lora_ranks
    axis: Axis | None = None  # a sweep axis of its own
    settings: type | None = None  # its own settings, built from its config block (plus the axis value)

    @property
    def axes(self) -> list[Axis]:
        rank = [Axis("lora_rank", "unlearn.lora_ranks", POSITIVE_INTS)] if self.lora else []
        return rank + ([self.axis] if self.axis else [])


METHODS: dict[str, Method] = {
    UnlearnType.CUT: Method(rmu.RmuObjective, axis=Axis("steering_coeff", "unlearn.cut_scs", POSITIVE_NUMBERS),
                            settings=rmu.RmuSettings),
    UnlearnType.GD: Method(uc.GRADIENT_DIFFERENCE),
    UnlearnType.WHP: Method(uc.WRONG_ANSWER_DESCENT, trains_on="wrong_unlearn_files", mcq=False),
    UnlearnType.FWF: Method(uc.WRONG_ANSWER_DESCENT, trains_on="fixed_wrong_unlearn_files", mcq=False),
    # LoRA unlearning is gradient difference trained through LoRA adapters.
    UnlearnType.LORA: Method(uc.GRADIENT_DIFFERENCE, lora=True),
}


def method_objective(name: str) -> uc.Objective:
    """A method's objective class (its `uses` tells which optional settings it honours)."""
    objective = METHODS[name].objective
    return getattr(objective, "func", objective)


# --------------------------------------------------------------------------
# Configuration: the grid, read from the YAML sections
# --------------------------------------------------------------------------


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


if not OmegaConf.has_resolver("get_log_range"):
    OmegaConf.register_new_resolver("get_log_range", get_log_range)


def parse_name(value: Any, key: str, allowed: Iterable[str]) -> str:
    allowed = [str(a) for a in allowed]
    if str(value) not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; use one of {', '.join(allowed)}")
    return str(value)


def parse_enum(enum: type, value: Any, key: str, exclude: Sequence = ()) -> Any:
    return enum[parse_name(value, key, [m.name for m in enum if m not in exclude])]


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

    @property
    def label(self) -> str:
        parts = [self.unlearn_type] + ([f"r{self.lora_rank}"] if self.lora_rank else [])
        parts += [f"c{self.steering_coeff:g}"] if self.steering_coeff is not None else []
        return " ".join(parts + [f"s{self.seed}"])


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
    return [float(v) for v in values]


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


def dataset_grid(cfg: Mapping | DictConfig, name: str, dataset: Datasets) -> list[GridPoint]:
    """The paper's grid for one method and dataset, with each method's own
    axis (LORA: ranks, CUT: steering coefficients) and the seeds."""
    cfg = plain(cfg)
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
    seeds = uc.NON_NEGATIVE_INTS.each(cfg["seeds"], "seeds")
    if ds_cfg.get("by_rank") and not method.lora:
        raise ConfigError(f"{ds_key}.by_rank is not allowed for {name}; only LORA (a LoRA method) sweeps ranks")
    by_rank = _grids_by_rank(ds_cfg.get("by_rank"), shared, f"{ds_key}.by_rank")
    axes = [[{}]] + [[{axis.field: v} for v in axis.allowed.each(select(cfg, axis.key), axis.key)] for axis in method.axes]
    points = []
    for ms in max_samples:
        for e in epochs:
            for combo in _product(axes):
                grid = by_rank.get(combo.get("lora_rank", 0), shared)
                points += [GridPoint(name, dataset, loss_type, lr, e, rc, ms, seed=s, **combo)
                           for lr in grid.lrs for rc in grid.rcs for s in seeds]
    return points


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


def plain(cfg: Mapping | DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def model_name(model_path: str) -> str:
    return Path(model_path.rstrip("/")).name


def unlearned_model_path(cfg: Mapping | DictConfig, point: GridPoint, base_model: str) -> str:
    cfg = plain(cfg)
    sc = point.steering_coeff if point.steering_coeff is not None else "none"
    target = cfg["unlearn"]["stop_at_forget_acc"]
    stop = f"-stop{target}" if target is not None else ""
    return str(Path(cfg["models_dir"]) / point.unlearn_type / point.dataset.name / cfg["wandb_project_name"] /
               f"rank{point.lora_rank}-sc{sc}-{model_name(base_model)}-rc{point.retain_coeff}-lr{point.lr}"
               f"-epochs{point.epochs}{stop}-seed{point.seed}")


# --------------------------------------------------------------------------
# Jobs: each carries its settings, its resume key and how it writes its row
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class JobReport:
    """What a finished job tells the driver (for progress and the summary)."""

    key: str
    summary: str
    value: float = float("nan")
    flagged: bool = False  # an unlearning run the stop rule flagged (not matched)


def _last_epoch(by_epoch: Mapping) -> Any:
    return by_epoch[max(by_epoch)] if by_epoch else float("nan")


@dataclass(frozen=True)
class Run:
    """One unlearning run; its probes (RTT, adapter RTT, quantization) follow it."""

    index: int
    point: GridPoint
    base_model: str
    model_path: str
    rtt: tuple["RttJob", ...] = ()
    settings: uc.UnlearnSettings | None = None
    key: str = ""
    results_dir: str = ""
    quant: tuple["QuantJob", ...] = ()
    replaces: tuple[str, ...] = ()  # rows of an earlier run with this key (a rerun replaces them)
    stage = "unlearn"

    @property
    def label(self) -> str:
        return f"{self.point.label} unlearn"

    @property
    def model_needed(self) -> bool:
        return bool(self.settings and self.settings.save.path)

    def perform(self) -> JobReport:
        objective = METHODS[self.point.unlearn_type].objective(self.settings)
        result = uc.unlearn(self.settings, objective)
        if result.save_name:
            write_marker(result.save_name, self.key)
        write_row(Path(self.results_dir) / "unlearning", self.index, unlearning_row(self, result), self.replaces)
        forget = uc.mean_by_epoch(result.forget_accs)
        stop = f", stopped at step {result.stop.step} ({result.stop.reason})" if result.stop else ""
        return JobReport(self.key, f"forget {forget.get(0, float('nan')):.2f} -> {_last_epoch(forget):.2f}{stop}",
                         _last_epoch(forget), flagged=bool(result.stop and not result.stop.reached))


@dataclass(frozen=True)
class RttJob:
    """One RTT run: fine-tune `base_model` on every val file but `skip_split`,
    score the held-out one. `probe` says which attacker: `rtt` (all weights,
    the paper's) or `lora_rtt` (a LoRA adapter only)."""

    index: int
    base_model: str
    dataset: Datasets
    condition: str  # "unlearned", "baseline" (the pre-unlearning model), "never_taught", "given"
    loss_type: LossType
    lr: float
    epochs: int
    skip_split: int
    train_files: tuple[str, ...]
    val_file: str
    unlearn_type: str = ""
    lora_rank: int = 0
    key: str = ""
    settings: uc.FinetuneSettings | None = None
    seed: int = 0
    probe: str = "rtt"
    upstream: str = ""  # the key of the run whose model this starts from
    results_dir: str = ""
    replaces: tuple[str, ...] = ()
    stage = "rtt"

    @property
    def label(self) -> str:
        return self.settings.train.label if self.settings else f"{self.probe} v{self.skip_split}"

    def perform(self) -> JobReport:
        result = finetune_corpus.finetune(self.settings)
        write_row(Path(self.results_dir) / "ft", self.index, rtt_row(self, result), self.replaces)
        accs = result.forget_accs_local
        return JobReport(self.key, f"V {accs.get(0, float('nan')):.2f} -> {_last_epoch(accs):.2f}", _last_epoch(accs))


@dataclass(frozen=True)
class QuantJob:
    """The quantization probe (or, with `bits` None and no results folder, a
    plain evaluation: the pre-flight check): score a model's forget and
    retain files after rounding its linear weights to `bits` bits."""

    index: int
    model_path: str
    dataset: Datasets
    condition: str  # "unlearned" or "reference" (the pre-unlearning model)
    bits: int | None
    evals: uc.EvalFiles
    train: uc.TrainSettings
    blocksize: int = 64
    key: str = ""
    upstream: str = ""
    point: GridPoint | None = None
    results_dir: str = ""
    replaces: tuple[str, ...] = ()
    stage = "quant"

    @property
    def label(self) -> str:
        return self.train.label

    def perform(self) -> JobReport:
        policy = uc.resolve_device_policy(self.train.device)
        tokenizer, model = uc.load_tokenizer(self.model_path), uc.load_model(self.model_path, policy)
        if self.bits is not None:
            uc.quantize_weights(model, self.bits, self.blocksize)
        evaluator = uc.Evaluator.build(tokenizer, self.evals, self.train.data_root, self.train.k_shot,
                                       self.train.val_batch_size, policy)
        forget, retain = evaluator(model, 0)
        if self.results_dir:
            write_row(Path(self.results_dir) / "quant", self.index, quant_row(self, evaluator), self.replaces)
        scored = f"forget {forget:.2f}" + ("" if math.isnan(retain) else f", retain {retain:.2f}")
        return JobReport(self.key, scored, forget)


@dataclass(frozen=True)
class TeachJob:
    """Fine-tune the base model on the facts before unlearning them."""

    base_model: str
    model_path: str
    dataset: Datasets
    settings: uc.FinetuneSettings | None = None
    key: str = ""
    stage = "teach"
    label = "teach"

    def perform(self) -> JobReport:
        result = finetune_corpus.finetune(self.settings)
        accs = result.forget_accs_local
        return JobReport(self.key, f"taught: forget {accs.get(0, float('nan')):.2f} -> {_last_epoch(accs):.2f}",
                         _last_epoch(accs))


MARKER = "pipeline_run.json"


def write_marker(model_path: str, key: str) -> None:
    """Mark a saved model folder with the run key that produced it (resume
    trusts a folder only when its marker matches)."""
    (Path(model_path) / MARKER).write_text(json.dumps({"run_key": key}))


def marker_key(model_path: str) -> str | None:
    path = Path(model_path) / MARKER
    try:
        return json.loads(path.read_text()).get("run_key")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------
# Results: one CSV per finished job, written whole
# --------------------------------------------------------------------------

KEY_COLUMNS = {"unlearning": "run_key", "ft": "rtt_key", "quant": "probe_key"}


def _cell(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return value


def write_result_csv(directory: str | os.PathLike, index: int, row: Mapping[str, Any]) -> Path:
    """`{time}--num{index}.csv`, written to a temporary file and renamed so a
    crash never leaves a torn file and concurrent workers never interleave."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S-%f")
    path = directory / f"{stamp}--num{index}.csv"
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    pd.DataFrame([{k: _cell(v) for k, v in row.items()}]).to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def write_row(directory: Path, index: int, row: Mapping[str, Any], replaces: Sequence[str] = ()) -> Path:
    """Write a job's row, then remove the rows an earlier run with the same key
    left, so a key has one row (analysis also keeps only the newest)."""
    path = write_result_csv(directory, index, row)
    for old in replaces:
        Path(old).unlink(missing_ok=True)
    return path


@dataclass
class Recorded:
    """The rows already written, {stage folder: {key: [csv paths]}}, and the
    runs among them that the stop rule flagged (stopped short of its target)."""

    keys: dict[str, dict[str, list[str]]]
    flagged: set[str]


def recorded_rows(results_dir: str | os.PathLike) -> Recorded:
    recorded = Recorded({}, set())
    for folder, column in KEY_COLUMNS.items():
        keys = recorded.keys[folder] = {}
        for path in sorted(Path(results_dir, folder).glob("*.csv")):
            # as text: a key such as "07270824e702" would otherwise be read as a number
            try:
                frame = pd.read_csv(path, usecols=lambda c: c in (column, "stop_reason"), dtype=str)
            except (UnicodeDecodeError, ValueError) as err:  # pandas' parser errors are ValueErrors
                raise ConfigError(f"results_dir: {path} cannot be read as a results row ({type(err).__name__}: "
                                  f"{first_line(err)}); move it out of {Path(results_dir, folder)}") from None
            reasons = frame.get("stop_reason", pd.Series(None, index=frame.index, dtype=str))
            for key, reason in zip(frame.get(column, pd.Series(dtype=str)), reasons):
                if isinstance(key, str):
                    keys.setdefault(key, []).append(str(path))
                    if isinstance(reason, str) and reason != uc.StopOutcome.TARGET:
                        recorded.flagged.add(key)
    return recorded


def drop_superseded_rows(results_dir: str | os.PathLike) -> int:
    """Keep the newest row of each key. A driver killed mid-sweep leaves Ray
    workers that can still write a row for a few seconds, after a quick rerun
    has planned that job again; that rerun then writes a second row."""
    superseded = [old for keys in recorded_rows(results_dir).keys.values() for paths in keys.values()
                  for old in sorted(paths)[:-1]]  # file names start with their time
    for path in superseded:
        Path(path).unlink(missing_ok=True)
    return len(superseded)


def _stop_columns(run: Run, result: uc.UnlearnResult) -> dict:
    rule, stop = run.settings.stop, result.stop
    return {"stop_target": rule.stop_at_forget_acc, "stop_retain_floor": rule.stop_retain_floor,
            "stop_step": stop.step if stop else None, "stop_reached": stop.reached if stop else None,
            "stop_reason": stop.reason if stop else None, "stop_forget_acc": stop.forget_acc if stop else None,
            "stop_retain_acc": stop.retain_acc if stop else None}


def unlearning_row(run: Run, result: uc.UnlearnResult) -> dict:
    point, s = run.point, run.settings
    return {
        "model_path": run.model_path if result.save_name else "", "dataset": point.dataset,
        "unlearn_type": point.unlearn_type, "loss_type": point.loss_type, "lora_rank": point.lora_rank,
        "lr": point.lr, "epochs": point.epochs, "retain_coeff": point.retain_coeff,
        "steering_coeff": point.steering_coeff, "max_samples": point.max_samples,
        "forget_accs": result.forget_accs, "forget_accs_calibrated": result.forget_accs_calibrated,
        "retain_accs": result.retain_accs, "retain_accs_calibrated": result.retain_accs_calibrated,
        "forget_correct": result.forget_correct, "trainable_params": result.trainable_params,
        "base_model": run.base_model, "save_name": result.save_name, "save_format": result.save_format,
        "val_files": s.evals.val_files, "project_name": s.train.wandb_project_name,
        "data_seed": point.seed, "seed": point.seed, "just_eval": s.train.epochs == 0, "steps": result.steps,
        **_stop_columns(run, result), "seconds": round(result.seconds, 1), "phase_seconds": result.phase_seconds,
        "run_key": run.key,
        **uc.provenance(uc.resolve_device_policy(s.train.device)),
    }


def rtt_row(job: RttJob, result: finetune_corpus.FinetuneResult) -> dict:
    lora = job.settings.lora
    return {
        "base_model": job.base_model, "condition": job.condition, "dataset": job.dataset,
        "unlearn_type": job.unlearn_type, "lora_rank": job.lora_rank, "loss_type": job.loss_type,
        "lr": job.lr, "epochs": job.epochs, "skip_split": job.skip_split,
        "train_files": job.train_files, "val_files": [job.val_file],
        "forget_accs_local": result.forget_accs_local,
        "forget_accs_calibrated_local": result.forget_accs_calibrated_local,
        "retain_accs_local": result.retain_accs_local,
        "retain_accs_calibrated_local": result.retain_accs_calibrated_local,
        "forget_correct_local": result.forget_correct_local, "probe": job.probe,
        "attacker_rank": lora.lora_rank if lora else 0, "upstream_key": job.upstream,
        "rtt_key": job.key, "data_seed": job.seed, "seed": job.seed,
        "project_name": job.settings.train.wandb_project_name, "seconds": round(result.seconds, 1),
        "phase_seconds": result.phase_seconds, **uc.provenance(uc.resolve_device_policy(job.settings.train.device)),
    }


def quant_row(job: QuantJob, evaluator: uc.Evaluator) -> dict:
    point = job.point
    return {
        "model_path": job.model_path, "condition": job.condition, "dataset": job.dataset,
        "probe": f"quant{job.bits}", "bits": job.bits, "blocksize": job.blocksize,
        "unlearn_type": point.unlearn_type if point else "", "lora_rank": point.lora_rank if point else 0,
        "seed": point.seed if point else None, "forget_accs": evaluator.forget_log.accs,
        "forget_correct": evaluator.forget_log.correct, "retain_accs": evaluator.retain_log.accs,
        "upstream_key": job.upstream, "probe_key": job.key,
        **uc.provenance(uc.resolve_device_policy(job.train.device)),
    }


# --------------------------------------------------------------------------
# The plan: every job of the sweep, its settings and its key
# --------------------------------------------------------------------------


@dataclass
class Plan:
    base_model: str  # the model_id's checkpoint (an embedded model may not be materialized yet)
    unlearn_from: str  # the taught model when teaching is on, else base_model
    teach: TeachJob | None = None
    runs: list[Run] = field(default_factory=list)
    baseline_rtt: list[RttJob] = field(default_factory=list)  # C: RTT from the pre-unlearning model
    floor_rtt: list[RttJob] = field(default_factory=list)  # RTT from the never-taught model
    given_rtt: list[RttJob] = field(default_factory=list)  # only_ft
    reference_quant: list[QuantJob] = field(default_factory=list)  # the pre-unlearning model, quantized
    finished: set[str] = field(default_factory=set)  # keys of jobs with a row (and model) already
    # finished runs the stop rule flagged, whose probes wait (probe_flagged_runs=false)
    held_back_runs: set[str] = field(default_factory=set)

    def rtt_count(self) -> int:
        return sum(len(r.rtt) for r in self.runs) + len(self.baseline_rtt) + len(self.floor_rtt) + len(self.given_rtt)

    def jobs(self) -> list:
        """Every job, each unlearning run before the jobs that need its model."""
        out: list = []
        for run in self.runs:
            out += [run, *run.rtt, *run.quant]
        return out + self.baseline_rtt + self.floor_rtt + self.given_rtt + self.reference_quant

    def pending(self) -> list:
        return [job for job in self.jobs() if job.key not in self.finished and not self.held_back(job)]

    def held_back(self, job) -> bool:
        """A probe of a run flagged earlier, with probe_flagged_runs=false."""
        return getattr(job, "upstream", "") in self.held_back_runs

    def held_back_jobs(self) -> list:
        return [job for job in self.jobs() if job.key not in self.finished and self.held_back(job)]

    @property
    def pending_baseline_rtt(self) -> list[RttJob]:
        return [job for job in self.baseline_rtt if job.key not in self.finished]


class Planner:
    """Builds every job's settings from the YAML sections (whose keys are the
    settings' field names), checks them, and keys each job by what decides
    its result."""

    def __init__(self, cfg: DictConfig | Mapping):
        self.cfg = plain(cfg)
        self.progress = resolve_progress(self.cfg["progress"])
        self.data_keys: dict[Datasets, str] = {}
        self.index = 0

    def next_index(self) -> int:
        self.index += 1
        return self.index - 1

    def data_key(self, dataset: Datasets) -> str:
        if dataset not in self.data_keys:
            files = DATASETS[dataset].all_files()
            self.data_keys[dataset] = uc.files_fingerprint(uc.data_file(self.cfg["data_root"], f) for f in files)
        return self.data_keys[dataset]

    def top(self) -> dict:
        return {**self.cfg, "progress": self.progress, "device": self.device}

    @functools.cached_property
    def device(self) -> dict:
        """`device.*` with `bf16_autocast: auto` decided once, here, for every
        job of the sweep (the decision measures this machine's matmuls)."""
        device = dict(self.cfg["device"])
        if device.get("bf16_autocast") == "auto":
            device["bf16_autocast"] = uc.resolve_device_policy(device).autocast_dtype is not None
        return device

    # ---- unlearning

    def unlearn_settings(self, point: GridPoint, base_model: str, model_path: str) -> uc.UnlearnSettings:
        cfg, u = self.cfg, self.cfg["unlearn"]
        method, block = METHODS[point.unlearn_type], method_block(self.cfg, point.unlearn_type)
        block_key = f"unlearn.types_config.{point.unlearn_type}"
        overrides = method_overrides(block, block_key, method)
        just_eval = cfg["just_eval"]
        train = uc.train_settings({**u, **overrides}, self.top(), "unlearn", model=base_model, lr=point.lr,
                                  epochs=0 if just_eval else point.epochs, seed=point.seed,
                                  label=f"{point.label} unlearn")
        data_format = parse_enum(DataFormat, u["data_format"], "unlearn.data_format", exclude=(DataFormat.TF,))
        forget, retain = DATASETS[point.dataset].training_files(data_format, method.trains_on)
        lora = uc.build_settings(uc.LoraSettings, u, "unlearn", lora_rank=point.lora_rank) if method.lora else None
        own = None
        if method.settings is not None:
            values = {a.field: getattr(point, a.field) for a in method.axes if a.field != "lora_rank"}
            own = uc.build_settings(method.settings, block, block_key, **values)
        save = uc.build_settings(uc.SaveSettings, u, "unlearn",
                                 path=model_path if u["save_unlearn_model"] and not just_eval else None)
        retain_loss = u["retain_loss_type"] if u["retain_loss_type"] is not None else point.loss_type
        return uc.build_settings(
            uc.UnlearnSettings, u, "unlearn", train=train, evals=DATASETS[point.dataset].evals(),
            forget_files=forget, retain_files=retain, loss_type=point.loss_type, retain_loss_type=retain_loss,
            retain_coeff=point.retain_coeff, max_samples=point.max_samples, lora=lora,
            stop=uc.build_settings(uc.StopRule, u, "unlearn"), save=save, method=own)

    def run_key(self, point: GridPoint, settings: uc.UnlearnSettings, upstream: str) -> str:
        return uc.fingerprint("unlearn", point.unlearn_type, uc.key_settings(settings), self.data_key(point.dataset),
                              upstream)

    # ---- RTT (and the adapter-relearning probe)

    def rtt_jobs(self, model_path: str, dataset: Datasets, condition: str, *, upstream: str, seeds: Sequence[int],
                 point: GridPoint | None = None, who: str = "") -> list[RttJob]:
        """RTT loss types x lrs x epochs x held-out splits x seeds for one model,
        then the same with a LoRA attacker when ft.lora_rtt is enabled."""
        ft = self.cfg["ft"]
        probes = [("rtt", ft, None)]
        if ft["lora_rtt"]["enabled"] and condition in ("unlearned", "baseline"):
            lora_cfg = ft["lora_rtt"]
            probes.append(("lora_rtt", {**ft, **{k: v for k, v in lora_cfg.items() if k in ("lrs", "epochs_lst")}},
                           uc.build_settings(uc.LoraSettings, lora_cfg, "ft.lora_rtt")))
        jobs = []
        files = DATASETS[dataset]
        for probe, section, attacker in probes:
            key_prefix = "ft" if probe == "rtt" else "ft.lora_rtt"
            for loss_name in uc.SOME_NAMES.check(ft["loss_types"], "ft.loss_types") or ():
                loss_type = parse_enum(LossType, loss_name, "ft.loss_types")
                for lr in POSITIVE_NUMBERS.each(section["lrs"], f"{key_prefix}.lrs"):
                    for epochs in POSITIVE_INTS.each(section["epochs_lst"], f"{key_prefix}.epochs_lst"):
                        for skip in range(ft["num_splits"]):
                            for seed in seeds:
                                jobs.append(self.rtt_job(model_path, dataset, condition, loss_type, lr, epochs, skip,
                                                         seed, probe, attacker, upstream, point, who))
        return jobs

    def rtt_job(self, model_path, dataset, condition, loss_type, lr, epochs, skip, seed, probe, attacker, upstream,
                point, who) -> RttJob:
        ft, files = self.cfg["ft"], DATASETS[dataset]
        train_files = tuple(f for i, f in enumerate(files.val_files) if i != skip)
        label = f"{who} {probe} v{skip}" + (f" s{seed}" if point is None and condition == "baseline" else "")
        train = uc.train_settings(ft, self.top(), "ft", model=model_path, lr=lr, epochs=epochs, seed=seed,
                                  label=label.strip())
        settings = uc.build_settings(
            uc.FinetuneSettings, ft, "ft", train=train,
            evals=files.evals(ft["eval_retain"], [files.val_files[skip]]), train_files=train_files,
            extra_corpus_files=(), loss_type=loss_type, lora=attacker, save=uc.SaveSettings(None, "merged"))
        key = uc.fingerprint("rtt", probe, condition, uc.key_settings(settings), self.data_key(dataset), upstream)
        return RttJob(self.next_index(), model_path, dataset, condition, loss_type, lr, epochs, skip, train_files,
                      files.val_files[skip], point.unlearn_type if point else "", point.lora_rank if point else 0,
                      key, settings, seed, probe, upstream, self.cfg["results_dir"])

    # ---- quantization probe and plain evaluation

    def quant_jobs(self, model_path: str, dataset: Datasets, condition: str, upstream: str,
                   point: GridPoint | None, who: str) -> list[QuantJob]:
        q = self.cfg["quant"]
        bits = uc.Allowed(f"bits from {uc.QUANT_BITS}", lambda v: v in uc.QUANT_BITS).each(q["bits"], "quant.bits",
                                                                                          empty_ok=True)
        blocksize = uc.Allowed("a power of two >= 32", lambda v: uc._is_int(v) and v >= 32 and v & (v - 1) == 0).check(
            q["blocksize"], "quant.blocksize")
        jobs = []
        for b in bits:
            train = self.eval_settings(model_path, f"{who} quant{b}".strip())
            evals = DATASETS[dataset].evals(q["eval_retain"])
            key = uc.fingerprint("quant", b, blocksize, condition, model_path, uc.key_settings(evals),
                                 self.data_key(dataset), upstream)
            jobs.append(QuantJob(self.next_index(), model_path, dataset, condition, b, evals, train, blocksize, key,
                                 upstream, point, self.cfg["results_dir"]))
        return jobs

    def eval_settings(self, model_path: str, label: str) -> uc.TrainSettings:
        """TrainSettings for an evaluation with no training (its lr is unused)."""
        return uc.train_settings(self.cfg["unlearn"], self.top(), "unlearn", model=model_path, lr=1.0, epochs=0,
                                 seed=self.cfg["seeds"][0], label=label)

    # ---- teaching

    def teach_job(self, base_model: str) -> TeachJob | None:
        """The taught checkpoint is cached under a key of everything that decides it."""
        t = self.cfg["teach"]
        if not t["enabled"]:
            return None
        dataset = parse_enum(Datasets, t["dataset"], "teach.dataset")
        files = DATASETS[dataset]
        probe = self.provisional_teach_settings(base_model, files, "")
        key = uc.fingerprint("teach", uc.key_settings(probe), self.data_key(dataset))
        path = Path(self.cfg["models_dir"]) / "taught" / f"{model_name(base_model)}-{dataset.name}-{key}"
        settings = self.provisional_teach_settings(base_model, files, str(path))
        return TeachJob(base_model, str(path), dataset, settings, key)

    def provisional_teach_settings(self, base_model: str, files: DatasetFiles, path: str) -> uc.FinetuneSettings:
        t = self.cfg["teach"]
        train = uc.train_settings(t, self.top(), "teach", model=base_model, label="teach",
                                  eval_every=POSITIVE_INTS.check(t["epochs"], "teach.epochs"))
        return uc.build_settings(
            uc.FinetuneSettings, t, "teach", train=train, evals=files.evals(with_retain=False),
            train_files=files.val_files, extra_corpus_files=files.unlearn_files if t["with_corpus"] else (),
            lora=None, save=uc.SaveSettings(path or None, "merged"))


def method_overrides(block: Mapping, key: str, method: Method) -> dict:
    """A method block may override shared training settings (CUT's own
    optimizer); any other key must be one of the method's own settings."""
    shared = {f.name for f in fields(uc.TrainSettings)}
    own = {f.name for f in fields(method.settings)} if method.settings else set()
    axis_fields = {a.field for a in method.axes}
    unknown = set(block) - shared - own - {"loss_type", "datasets_config"}
    if unknown & axis_fields:
        raise ConfigError(f"{key}.{sorted(unknown & axis_fields)[0]} is swept by {method.axes[0].key}; set it there")
    if unknown:
        allowed = sorted(own | {"loss_type", "datasets_config", "optimizer", "batch_size", "warmup_steps"})
        raise ConfigError(f"{key}: {sorted(unknown)} not allowed; a method block may set {', '.join(allowed)}")
    return {k: v for k, v in block.items() if k in shared}


def resolve_progress(mode: str) -> str:
    mode = uc.one_of(*uc.PROGRESS_MODES).check(mode, "progress")
    if mode == "auto":
        return "bars" if sys.stderr.isatty() else "lines"
    return mode


def plan_sweep(cfg: DictConfig | Mapping) -> Plan:
    """Every stage and job of the sweep, checked (and any made-up data
    written) before any model loads, with the jobs already finished marked."""
    planner = Planner(cfg)
    c = planner.cfg
    validate_settings(c)
    names = [parse_name(t, "unlearn.types", METHODS) for t in c["unlearn"]["types"]] if c["unlearn"]["types"] else []
    if not names:
        raise ConfigError("unlearn.types: [] is not allowed; give at least one of " + ", ".join(METHODS))
    datasets = [parse_enum(Datasets, d, "datasets") for d in uc.SOME_NAMES.check(c["datasets"], "datasets")]
    if c["quant"]["bits"] and not uc.importable("bitsandbytes"):
        raise ConfigError(f"quant.bits: {c['quant']['bits']!r} needs the bitsandbytes package "
                          "(pip install bitsandbytes); or set quant.bits=[] to skip the quantization probe")
    for dataset in datasets:
        if c["ft"]["num_splits"] > len(DATASETS[dataset].val_files):
            raise ConfigError(f"ft.num_splits: {c['ft']['num_splits']} is more than the "
                              f"{len(DATASETS[dataset].val_files)} val files of {dataset.name}")
    check_methods(c, names)
    in_slice = slice_seeds(c)
    points = [p for name in names for d in datasets for p in dataset_grid(c, name, d) if p.seed in in_slice]
    teach_dataset = [parse_enum(Datasets, c["teach"]["dataset"], "teach.dataset")] if c["teach"]["enabled"] else []
    check_folders(c, [*datasets, *teach_dataset])
    for dataset in datasets:
        ensure_dataset(c, dataset)
    base_model = uc.model_checkpoint_path(c["model_id"], c["models_dir"])
    teach = planner.teach_job(base_model)
    if teach:
        ensure_dataset(c, teach.dataset)
    plan = Plan(base_model, teach.model_path if teach else base_model, teach)
    recorded = recorded_rows(c["results_dir"])  # with rerun=true too: the new rows replace these
    if c["only_ft"]:
        plan.given_rtt = only_ft_jobs(planner)
    else:
        add_runs(planner, plan, points, datasets)
    mark_finished(plan, recorded.keys, c["rerun"])
    if not c["probe_flagged_runs"]:
        plan.held_back_runs = recorded.flagged & plan.finished
    return plan


def add_runs(planner: Planner, plan: Plan, points: list[GridPoint], datasets: list[Datasets]) -> None:
    c = planner.cfg
    upstream = plan.teach.key if plan.teach else plan.base_model
    run_rtt = not (c["dont_ft"] or c["just_eval"] or not c["unlearn"]["save_unlearn_model"])
    probe = not c["just_eval"] and c["unlearn"]["save_unlearn_model"]
    for point in points:
        path = unlearned_model_path(c, point, plan.unlearn_from)
        settings = planner.unlearn_settings(point, plan.unlearn_from, path)
        key = planner.run_key(point, settings, upstream)
        rtt = planner.rtt_jobs(path, point.dataset, "unlearned", upstream=key, seeds=[point.seed], point=point,
                               who=point.label) if run_rtt else []
        quant = planner.quant_jobs(path, point.dataset, "unlearned", key, point, point.label) if probe else []
        plan.runs.append(Run(planner.next_index(), point, plan.unlearn_from, path, tuple(rtt), settings, key,
                             c["results_dir"], tuple(quant)))
    seeds = uc.NON_NEGATIVE_INTS.each(c["seeds"], "seeds")
    for dataset in datasets:
        if run_rtt and c["baseline_rtt"]:
            plan.baseline_rtt += planner.rtt_jobs(plan.unlearn_from, dataset, "baseline", upstream=upstream,
                                                  seeds=baseline_seeds(c), who="C")
        if run_rtt and plan.teach and c["never_taught_rtt"]:
            # The floor: what RTT on T gives on V from a model that never knew V.
            plan.floor_rtt += planner.rtt_jobs(plan.base_model, dataset, "never_taught", upstream=plan.base_model,
                                               seeds=seeds[:1], who="floor")
        if probe and plan.runs:
            plan.reference_quant += planner.quant_jobs(plan.unlearn_from, dataset, "reference", upstream, None, "ref")


def seeds_subset(cfg: Mapping, key: str) -> list[int]:
    """`cfg[key]`, a non-empty list of seeds from `seeds`, or all of them when null."""
    chosen = cfg[key]
    if chosen is None:
        return list(cfg["seeds"])
    uc.NON_NEGATIVE_INTS.each(chosen, key)
    strays = [s for s in chosen if s not in cfg["seeds"]]
    if strays:
        raise ConfigError(f"{key}: {strays!r} is not allowed; use seeds from seeds ({list(cfg['seeds'])!r}) "
                          "or null for all of them")
    return [s for s in cfg["seeds"] if s in chosen]


def slice_seeds(cfg: Mapping) -> list[int]:
    """The seeds this invocation runs: `slice` (a piece of a study whose
    `seeds` name all of it), or every seed."""
    return seeds_subset(cfg, "slice")


def baseline_seeds(cfg: Mapping) -> list[int]:
    """The seeds of this slice whose baseline RTT (C) runs: `baseline_rtt_seeds`
    (all seeds when null). Analysis gives a seed without its own C the mean of theirs."""
    in_slice = slice_seeds(cfg)
    return [s for s in seeds_subset(cfg, "baseline_rtt_seeds") if s in in_slice]


def mark_finished(plan: Plan, recorded: Mapping[str, Mapping[str, list[str]]], rerun: bool) -> None:
    """A job is finished when its row exists (and, for a run that saves a
    model its probes still need, the model folder carries its key)."""
    rows = {"unlearn": recorded.get("unlearning", {}), "rtt": recorded.get("ft", {}), "quant": recorded.get("quant", {})}
    for i, run in enumerate(plan.runs):
        have_row = run.key in rows["unlearn"]
        probes_pending = [j for j in (*run.rtt, *run.quant) if j.key not in rows[j.stage]]
        model_ok = not run.model_needed or marker_key(run.model_path) == run.key
        if have_row and (model_ok or not probes_pending):
            plan.finished.add(run.key)
        plan.runs[i] = replace(run, replaces=tuple(rows["unlearn"].get(run.key, ())),
                               rtt=_with_earlier_rows(run.rtt, rows), quant=_with_earlier_rows(run.quant, rows))
    for job_list in (plan.baseline_rtt, plan.floor_rtt, plan.given_rtt, plan.reference_quant):
        job_list[:] = _with_earlier_rows(job_list, rows)
    for run in plan.runs:
        for job in (*run.rtt, *run.quant):
            if job.key in rows[job.stage]:
                plan.finished.add(job.key)
    for job in (*plan.baseline_rtt, *plan.floor_rtt, *plan.given_rtt, *plan.reference_quant):
        if job.key in rows[job.stage]:
            plan.finished.add(job.key)
    if rerun:
        plan.finished.clear()


def _with_earlier_rows(jobs, rows) -> tuple:
    """The jobs, each knowing the rows an earlier run with its key left (its own row replaces them)."""
    return tuple(replace(job, replaces=tuple(rows[job.stage].get(job.key, ()))) for job in jobs)


def only_ft_jobs(planner: Planner) -> list[RttJob]:
    """`only_ft`: RTT on given models, `ft_model_paths: [[path, DATASET], ...]`."""
    jobs: list[RttJob] = []
    for entry in planner.cfg["ft_model_paths"]:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ConfigError(f"ft_model_paths: {entry!r} is not allowed; use [model_path, DATASET] pairs")
        path, dataset = str(entry[0]), parse_enum(Datasets, entry[1], "ft_model_paths")
        if not (Path(path, "config.json").is_file() or uc.adapter_base(path)):
            raise ConfigError(f"ft_model_paths: {path!r} is not a model folder (no config.json)")
        ensure_dataset(planner.cfg, dataset)
        jobs += planner.rtt_jobs(path, dataset, "given", upstream=path, seeds=planner.cfg["seeds"][:1],
                                 who=model_name(path)[:24])
    if not jobs:
        raise ConfigError("only_ft=true needs ft_model_paths: [[model_path, DATASET], ...] and ft.num_splits > 0")
    return jobs


# --------------------------------------------------------------------------
# Checks before any model loads
# --------------------------------------------------------------------------


def validate_settings(cfg: Mapping) -> None:
    """Checks that need no model or data: modes, sizes, device, Ray, wandb."""
    if cfg["just_eval"] and cfg["only_ft"]:
        raise ConfigError("just_eval and only_ft cannot both be set")
    rtt_on = not (cfg["dont_ft"] or cfg["just_eval"])
    if uc.NON_NEGATIVE_INTS.check(cfg["ft"]["num_splits"], "ft.num_splits") == 0 and rtt_on:
        raise ConfigError("ft.num_splits: 0 is not allowed; use a positive integer (to run no RTT, set dont_ft=true)")
    uc.NON_NEGATIVE_INTS.each(cfg["seeds"], "seeds")
    if len(set(cfg["seeds"])) != len(cfg["seeds"]):
        raise ConfigError(f"seeds: {cfg['seeds']!r} is not allowed; give each seed once")
    baseline_seeds(cfg)  # checks slice and baseline_rtt_seeds against seeds
    uc.FRACTION_OR_NULL.check(cfg["preflight"]["min_forget_acc"], "preflight.min_forget_acc")
    uc.POSITIVE_NUMBERS.check(cfg["ray"]["cpus_per_task"], "ray.cpus_per_task")
    uc.NON_NEGATIVE_INTS.check(cfg["ray"]["max_retries"], "ray.max_retries")
    if cfg["ray"]["num_cpus"] is not None:
        uc.POSITIVE_INTS.check(cfg["ray"]["num_cpus"], "ray.num_cpus")
    if cfg["teach"]["cpus"] is not None:
        uc.POSITIVE_NUMBERS.check(cfg["teach"]["cpus"], "teach.cpus")
    uc.build_settings(uc.RandomBdSpec, cfg["random_bd"], "random_bd").check_capacity()
    for flag in ("just_eval", "dont_ft", "only_ft", "baseline_rtt", "never_taught_rtt", "probe_flagged_runs", "rerun"):
        uc.BOOLEAN.check(cfg[flag], flag)
    uc.one_of(*uc.WANDB_MODES).check(cfg["wandb_mode"], "wandb_mode")
    uc.resolve_device_policy(cfg["device"])
    if cfg["plugins"]:
        uc.NAMES.check(cfg["plugins"], "plugins")


def check_methods(cfg: Mapping, names: Sequence[str]) -> None:
    """What a method cannot use is refused when it is set."""
    u = cfg["unlearn"]
    data_format = parse_enum(DataFormat, u["data_format"], "unlearn.data_format", exclude=(DataFormat.TF,))
    no_mcq = sorted(n for n in names if not METHODS[n].mcq)
    if data_format == DataFormat.MCQ and no_mcq:
        raise ConfigError(f"unlearn.data_format: MCQ is not allowed with {', '.join(no_mcq)}; "
                          "they train on their wrong-answer corpora (use CORPUS)")
    uc.LAYER_RANGES.check(u["freeze_layers"], "unlearn.freeze_layers")
    for name in names:
        uses = method_objective(name).uses
        if u["freeze_layers"] and "freeze_layers" not in uses:
            raise ConfigError(f"unlearn.freeze_layers: {u['freeze_layers']!r} is not allowed with {name}; it does not "
                              "use frozen layers (leave it [] or drop the method from unlearn.types)")
    if not any(METHODS[n].lora for n in names) and u["lora_alpha"] is not None:
        raise ConfigError(f"unlearn.lora_alpha: {u['lora_alpha']!r} is set but no method in unlearn.types "
                          f"({', '.join(names)}) trains LoRA adapters; leave it null")


def ensure_dataset(cfg: Mapping, dataset: Datasets) -> None:
    """Write the made-up-facts dataset when it is asked for and absent; fail
    with the list of missing files otherwise (the paper's registry points at
    files that were never published); parse every file."""
    files = DATASETS[dataset]
    root = Path(cfg["data_root"])
    if files.generated_dir and not (root / files.generated_dir).exists():
        spec = uc.build_settings(uc.RandomBdSpec, cfg["random_bd"], "random_bd")
        log.info("writing made-up facts to %s (%d splits x %d facts)", root / files.generated_dir,
                 spec.num_splits, spec.facts_per_split)
        uc.write_random_bd_dataset(root / files.generated_dir, spec)
    missing = uc.missing_files(root, files.all_files())
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise uc.DataValidationError(f"dataset {dataset.name} is missing {len(missing)} file(s) under {root}: {shown}")
    uc.check_data_files(root, sorted(files.question_files()), sorted(files.text_files() - files.question_files()))


# --------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    num_cpus: float
    num_gpus: float
    at_once: int = 1  # tasks of this size the cluster runs side by side

    def options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def task_resources(ray_cfg: Mapping, cluster: Mapping[str, float]) -> Resources:
    """Per-task CPUs and GPUs from the config and what the cluster has; a task
    never asks for a GPU the cluster lacks (the paper's code hung on CPU)."""
    have_gpus = float(cluster.get("GPU", 0))
    have_cpus = float(cluster.get("CPU", 1))
    cpus = ray_cfg.get("cpus_per_task") or 1
    gpus = ray_cfg.get("gpus_per_task", "auto")
    gpus = (1.0 if have_gpus >= 1 else 0.0) if gpus in (None, "auto") else float(gpus)
    if gpus > have_gpus:
        raise ConfigError(f"ray.gpus_per_task: {gpus:g} is more than the {have_gpus:g} GPU(s) the Ray cluster has; "
                          "use auto or 0")
    if cpus > have_cpus:
        raise ConfigError(f"ray.cpus_per_task: {cpus} is more than the {have_cpus:g} CPU(s) the Ray cluster has")
    at_once = min(have_cpus // cpus, have_gpus // gpus if gpus else math.inf)
    return Resources(float(cpus), gpus, max(1, int(at_once)))


def configure_logging(progress: str = "lines") -> None:
    """The driver's and each worker's logging: with live bars, workers log
    warnings only (their lines would tear the bars)."""
    import transformers

    level = logging.WARNING if progress == "bars" else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", force=True)
    # A bar per checkpoint load (well under a second each) only buries the sweep's own bars.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # peft calls a transformers property deprecated for v6, once per LoRA run; nothing to act on here.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@ray.remote
def perform(job, progress: str, plugins: Sequence[str] = ()) -> JobReport:
    """Every Ray task: one job, which writes its own row."""
    configure_logging(progress)
    import_plugins(plugins)
    use_assigned_cpus()
    return job.perform()


def use_assigned_cpus() -> None:
    """Torch threads = the CPUs Ray gave this task. Ray sets the thread count
    when it starts a worker, but workers are reused: one that taught with 2
    CPUs would otherwise run a 1-CPU sweep task with 2 threads, and
    oversubscribe the machine."""
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def import_plugins(modules: Sequence[str]) -> None:
    """Modules that add methods to METHODS (one registry row and an objective each)."""
    import importlib

    for module in uc.NAMES.check(modules or [], "plugins"):
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - whatever the module raises, the setting is at fault
            raise ConfigError(f"plugins: {module!r} cannot be imported ({type(err).__name__}: {first_line(err)}); "
                              "name a module on the Python path (PYTHONPATH) that adds rows to pipeline.METHODS") \
                from None


def start_ray(ray_cfg: Mapping, progress: str) -> None:
    """A private local Ray instance unless `ray.address` names a cluster to
    join: a stale cluster address recorded on the machine is never used."""
    if ray.is_initialized():
        return
    # Token authentication stays on; only its start-up notice is quiet.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    quiet = {"logging_level": logging.WARNING, "log_to_driver": progress == "bars", "include_dashboard": False}
    address = ray_cfg.get("address")
    if not address:
        ray.init(address="local", num_cpus=ray_cfg.get("num_cpus"), **quiet)
        return
    project = str(Path(__file__).resolve().parent)
    try:
        ray.init(address=address, runtime_env={"working_dir": project,
                                               "excludes": [".venv", ".git", "models", "data", "evals"]}, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"ray.address: {address!r} cannot be reached ({str(err).splitlines()[0][:160]})") from None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray retries an unreachable head for minutes; a plain TCP connect says
    in seconds whether there is anything to join ("auto" is left to Ray)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise ConfigError(f"ray.address: {address!r} cannot be reached ({err}); use host:port of a running "
                          "Ray head, or null for a local instance") from None


# --------------------------------------------------------------------------
# The sweep: jobs as Ray tasks, failures recorded, the rest goes on
# --------------------------------------------------------------------------


@dataclass
class Failure:
    job: Any
    error_type: str
    error: str
    detail: str = ""

    def row(self) -> dict:
        job = self.job
        return {"time": datetime.datetime.now().isoformat(timespec="seconds"), "stage": job.stage,
                "label": job.label, "run_key": job.key, "model_path": _job_model(job),
                "error_type": self.error_type, "error": self.error}


def _job_model(job) -> str:
    return getattr(job, "model_path", None) or getattr(job, "base_model", "")


def describe_error(err: BaseException) -> tuple[str, str, str]:
    """(type, last line, full text) of a task's error, unwrapped from Ray's."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip() or type(cause).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return type(cause).__name__, (lines[-1] if lines else "").strip()[:300], str(err)


@dataclass
class JobQueue:
    """Which job starts when a slot frees: a finished run's probes, then the
    controls, then the next unlearning run, except that the last two rounds
    of runs (the longest jobs left) go first. tests/benchmarks/sweep_order.py
    compares it with starting every run first."""

    at_once: int
    runs: deque = field(default_factory=deque)
    probes: deque = field(default_factory=deque)
    others: deque = field(default_factory=deque)

    def __bool__(self) -> bool:
        return bool(self.runs or self.probes or self.others)

    def pop(self):
        if self.runs and len(self.runs) <= 2 * self.at_once:
            return self.runs.popleft()
        return next(jobs for jobs in (self.probes, self.others, self.runs) if jobs).popleft()


@dataclass
class Sweep:
    """Runs a plan's pending jobs with at most what the cluster offers,
    starting each run's probes when its model is saved; records failures."""

    plan: Plan
    resources: Resources
    cfg: Mapping
    progress: str
    finished: list = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    not_run: list = field(default_factory=list)
    skipped_flagged: list = field(default_factory=list)  # probes of flagged runs (probe_flagged_runs=false)

    def options(self) -> dict:
        return {**self.resources.options(), "max_retries": self.cfg["ray"]["max_retries"], "retry_exceptions": False}

    def run(self) -> None:
        """Keeps as many tasks in flight as the cluster runs at once, in
        `JobQueue` order: whole rows (and a first table) arrive from the first
        run on, and no slot idles at the end waiting for a late run."""
        pending = self.plan.pending()
        waiting: dict[str, list] = {}
        refs: dict = {}
        queue = JobQueue(self.resources.at_once)
        run_keys = {run.key for run in self.plan.runs}
        self.skipped_flagged = self.plan.held_back_jobs()
        for job in pending:
            upstream = getattr(job, "upstream", "")
            if upstream in run_keys and upstream not in self.plan.finished:
                waiting.setdefault(upstream, []).append(job)
            else:
                (queue.runs if job.key in run_keys else queue.others).append(job)

        def fill() -> None:
            while len(refs) < queue.at_once and queue:
                job = queue.pop()
                refs[self.submit(job)] = job

        bar = SweepProgress(self.progress, len(pending), len(self.plan.jobs()) - len(pending) - len(self.skipped_flagged))
        fill()
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            job = refs.pop(done[0])
            try:
                report = ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - one failure stays one failure
                failure = self.record_failure(job, err)
                blocked = waiting.pop(job.key, [])
                self.not_run += [(dependent, job) for dependent in blocked]
                bar.update(job, f"FAILED {failure.error_type}: {failure.error}", 1 + len(blocked))
                fill()
                continue
            self.finished.append((job, report))
            dependents = waiting.pop(job.key, [])
            if not self.cfg["probe_flagged_runs"] and report.flagged and dependents:
                self.skipped_flagged += dependents
                bar.update(job, f"{report.summary}; flagged, so its {len(dependents)} probe(s) are skipped "
                                "(probe_flagged_runs=false)", 1 + len(dependents))
            else:
                bar.update(job, report.summary)
                queue.probes.extend(dependents)
            fill()
        bar.close()

    def submit(self, job):
        return perform.options(**self.options(), name=job.label[:40]).remote(job, self.progress, self.cfg["plugins"])

    def record_failure(self, job, err: BaseException) -> Failure:
        """Keep the failure (failures.csv and its full traceback beside the results)."""
        error_type, line, detail = describe_error(err)
        failure = Failure(job, error_type, line, detail)
        self.failed.append(failure)
        directory = Path(self.cfg["results_dir"])
        directory.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame([f.row() for f in self.failed])
        tmp = directory / ".failures.csv.tmp"
        frame.to_csv(tmp, index=False)
        os.replace(tmp, directory / "failures.csv")
        (directory / "failures").mkdir(exist_ok=True)
        (directory / "failures" / f"{job.stage}-{job.key}.txt").write_text(detail)
        return failure

    def summary(self) -> str:
        skipped = len(self.plan.jobs()) - len(self.plan.pending()) - len(self.plan.held_back_jobs())
        lines = [f"sweep: {len(self.finished)} finished, {skipped} skipped (finished earlier), "
                 f"{len(self.failed)} failed" + (f", {len(self.not_run)} not run (their unlearning failed)"
                                                  if self.not_run else "")
                 + (f", {len(self.skipped_flagged)} not run (probes of flagged runs; probe_flagged_runs=false)"
                    if self.skipped_flagged else "")]
        for failure in self.failed:
            lines.append(f"  failed: {failure.job.label} ({_job_model(failure.job)}): "
                         f"{failure.error_type}: {failure.error}")
        where = f"results: {self.cfg['results_dir']}"
        if self.failed:
            where += f" (failures: {Path(self.cfg['results_dir']) / 'failures.csv'}; rerun the same command to retry them)"
        return "\n".join(lines + [where])


class SweepProgress:
    """The sweep's own progress: a live bar of jobs done (drawn with the
    workers' bars by Ray's tqdm) or one plain line per finished job."""

    def __init__(self, mode: str, total: int, skipped: int):
        self.mode, self.total, self.done = mode, total, 0
        self.started = time.monotonic()
        self.bar = None
        if skipped:
            print(f"sweep: {skipped} job(s) finished earlier, skipped; {total} to run", flush=True)
        if mode == "bars" and total:
            from ray.experimental import tqdm_ray

            self.bar = tqdm_ray.tqdm(desc="sweep: jobs done", total=total)

    def update(self, job, summary: str, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.mode == "lines":
            minutes = (time.monotonic() - self.started) / 60
            print(f"[{self.done}/{self.total} {minutes:.1f} min] {job.label}: {summary}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------
# Driver: plan, check, teach, pre-flight, sweep, summary
# --------------------------------------------------------------------------


def run_one(job, resources: Resources, cfg: Mapping, progress: str):
    return ray.get(perform.options(**resources.options()).remote(job, progress, cfg["plugins"]))


def preflight(cfg: Mapping, plan: Plan, planner_progress: str, resources: Resources) -> None:
    """Refuse to "unlearn" facts the model never knew."""
    threshold = cfg["preflight"]["min_forget_acc"]
    if threshold is None or cfg["only_ft"] or not plan.pending():
        return
    planner = Planner(cfg)
    for dataset in sorted({run.point.dataset for run in plan.runs}):
        evals = DATASETS[dataset].evals(with_retain=False)
        job = QuantJob(0, plan.unlearn_from, dataset, "preflight", None, evals,
                       planner.eval_settings(plan.unlearn_from, "preflight"))
        acc = run_one(job, resources, cfg, planner_progress).value
        log.info("preflight: %s knows %.3f of %s's forget facts", plan.unlearn_from, acc, dataset.name)
        if acc < threshold:
            raise ConfigError(f"preflight: {plan.unlearn_from} answers only {acc:.3f} of {dataset.name}'s forget questions "
                              f"(preflight.min_forget_acc={threshold}); teach it first (teach.enabled=true) "
                              "or lower the threshold")


def execute(cfg: DictConfig | Mapping) -> Sweep | None:
    """Check everything, then: base model, teach (cached), pre-flight, sweep."""
    c = plain(cfg)
    import_plugins(c["plugins"])
    plan = plan_sweep(c)
    progress = resolve_progress(c["progress"])
    check_before_loading(c, plan)
    if not plan.pending():
        held = len(plan.held_back_jobs())
        print(f"sweep: all {len(plan.jobs()) - held} job(s) finished earlier; nothing to run "
              f"(rerun=true runs them again)"
              + (f"; {held} probe(s) of flagged runs held back (probe_flagged_runs=false)" if held else "")
              + f". results: {c['results_dir']}", flush=True)
        return None
    if c["ray"]["address"]:
        check_reachable(c["ray"]["address"])  # refused in seconds, even where this process already runs Ray
    start_ray(c["ray"], progress)
    resources = task_resources(c["ray"], ray.cluster_resources())
    uc.resolve_model_path(c["model_id"], c["models_dir"])
    if plan.teach and not Path(plan.teach.model_path, "config.json").is_file():
        print(f"teaching {plan.base_model} the facts of {plan.teach.dataset.name} -> {plan.teach.model_path}",
              flush=True)
        # One task alone: it may take more CPUs than a sweep task (teach.cpus).
        teach_resources = replace(resources, num_cpus=float(c["teach"]["cpus"] or resources.num_cpus))
        report = run_one(plan.teach, teach_resources, c, progress)
        print(f"teach: {report.summary}", flush=True)
    preflight(c, plan, progress, resources)
    sweep = Sweep(plan, resources, c, progress)
    print(f"sweep: {len(plan.runs)} unlearning run(s), {plan.rtt_count()} RTT run(s), "
          f"{sum(len(r.quant) for r in plan.runs) + len(plan.reference_quant)} quantization probe(s); "
          f"{len(plan.pending())} job(s) to run", flush=True)
    sweep.run()
    drop_superseded_rows(c["results_dir"])
    return sweep


def check_before_loading(cfg: Mapping, plan: Plan) -> None:
    """What can be checked without loading weights: the model id, its
    tokenizer's answer letters, and the architecture against every run's
    settings (built on the meta device)."""
    model_id = cfg["model_id"]
    if model_id not in uc.EMBEDDED_MODELS and not is_model_folder(model_id) and not in_hub_cache(model_id):
        raise ConfigError(f"model_id: {model_id!r} is not allowed; use an embedded alias "
                          f"({', '.join(uc.EMBEDDED_MODELS)}), a folder with config.json, or a Hugging Face hub id "
                          "already in the local cache")
    for weights in sorted(Path(model_id).glob("*.safetensors")) if is_model_folder(model_id) else ():
        try:
            uc.check_safetensors_file(weights)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model_id: {model_id!r} is not allowed; its weights file {weights.name} is damaged "
                              f"({err})") from None
    try:
        config = uc.model_config(model_id, cfg["models_dir"])
        skeleton = uc.model_skeleton(config)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad model_id
        raise ConfigError(f"model_id: {model_id!r} cannot be used: {type(err).__name__}: "
                          f"{first_line(err)}; the pipeline needs a causal language model") from None
    if model_id not in uc.EMBEDDED_MODELS:
        try:
            uc.answer_letter_token_ids(uc.load_tokenizer(uc.model_checkpoint_path(model_id, cfg["models_dir"])))
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"model_id: {model_id!r}: its tokenizer cannot score answers ({first_line(err)})") from None
    checked: set[str] = set()
    for run in plan.runs:
        if run.point.unlearn_type not in checked:
            checked.add(run.point.unlearn_type)
            check_run_against_model(run, skeleton, config)
    lora_rtt = [job.settings.lora for run in plan.runs for job in run.rtt if job.settings.lora]
    if lora_rtt:
        check_lora_targets(skeleton, lora_rtt[0].lora_target_modules, "ft.lora_rtt.lora_target_modules", config)


def check_run_against_model(run: Run, skeleton, config) -> None:
    settings, name = run.settings, run.point.unlearn_type
    layers = getattr(config, "num_hidden_layers", None)
    if settings.lora is not None:
        check_lora_targets(skeleton, settings.lora.lora_target_modules, "unlearn.lora_target_modules", config)
    if settings.freeze_layers and (layers is None or max(end for _, end in settings.freeze_layers) > layers):
        raise ConfigError(f"unlearn.freeze_layers: {[list(r) for r in settings.freeze_layers]!r} is not allowed; "
                          f"the model has {layers} decoder layers")
    check = getattr(METHODS[name].settings, "check_model", None)
    if check is not None:
        try:
            check(settings.method, skeleton)
        except ValueError as err:
            raise ConfigError(f"unlearn.types_config.{name}: {err}") from None


def check_lora_targets(skeleton, targets: Sequence[str], key: str, config) -> None:
    names = uc.linear_module_names(skeleton)
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"{key}: {missing!r} is not allowed; this {config.model_type} model's linear modules "
                          f"are {names}")


def is_model_folder(path: str) -> bool:
    return Path(path, "config.json").is_file() or uc.adapter_base(path) is not None if Path(path).is_dir() else False


def in_hub_cache(model_id: str) -> bool:
    """A hub id whose config is already downloaded (GPU clusters keep a cache; nothing is fetched here)."""
    if model_id.count("/") != 1 or Path(model_id).exists():
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unusable id is simply not in the cache
        return False


def first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]


def check_writable(path: str, key: str) -> None:
    """A folder the sweep writes must be writable: probe its nearest existing
    ancestor with a file (created and removed), so nothing is left behind."""
    target = Path(path).absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path!r} is not allowed; {existing} is a file, not a folder")
    probe = existing / f".write-probe-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}: {path!r} cannot be written ({err.strerror} in {existing}); "
                          "use a writable folder") from None


def check_folders(cfg: Mapping, datasets: Iterable[Datasets]) -> None:
    check_writable(cfg["results_dir"], "results_dir")
    check_writable(cfg["models_dir"], "models_dir")
    generated = [DATASETS[d].generated_dir for d in datasets if DATASETS[d].generated_dir]
    if any(not Path(cfg["data_root"], g).exists() for g in generated):
        check_writable(cfg["data_root"], "data_root")


def drive(cfg: DictConfig | Mapping) -> int:
    """The whole command on a composed config: 0 when every job finished, 1
    when one failed, 2 when the input was refused (one `error:` line on
    stderr, before any model loads). Ray is shut down only if this call
    started it (tests share one instance across sweeps)."""
    c = plain(cfg)
    progress = resolve_progress(c.get("progress", "auto")) if c.get("progress") in uc.PROGRESS_MODES else "lines"
    configure_logging(progress)
    ray_was_up = ray.is_initialized()

    def stop_ray() -> None:
        # Before the error line: workers' forwarded output must not land after it.
        if not ray_was_up:
            ray.shutdown()

    try:
        sweep = execute(c)
    except (ConfigError, uc.DataValidationError) as err:
        stop_ray()
        sys.stdout.flush()
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except ray.exceptions.RayError as err:
        error_type, line, _ = describe_error(err)
        stop_ray()
        print(f"error: {error_type}: {line}", file=sys.stderr, flush=True)
        return 1
    if sweep is None:
        return 0
    summary = sweep.summary()
    stop_ray()
    print(summary, flush=True)
    return 1 if sweep.failed else 0


@hydra.main(version_base=None, config_path=str(Path(__file__).resolve().parent / "conf"), config_name="default")
def run_pipeline(cfg: DictConfig) -> None:
    code = drive(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    run_pipeline()
