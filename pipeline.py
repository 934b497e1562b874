"""Unlearn a model, then test with RTT whether the knowledge is really gone.

`python pipeline.py --config-name=NAME key=value ...` (Hydra). The driver
validates the whole sweep before any model loads, then runs one Ray task
`main` per grid point: unlearning (`unlearn`), then RTT (`finetune`) on each
held-out split, writing one CSV per finished run under `results_dir`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field, replace
from enum import Enum, auto
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import hydra
import pandas as pd
import ray
import transformers
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

log = logging.getLogger("pipeline")


class UnlearnType(Enum):
    CUT = auto()
    GD = auto()
    WHP = auto()
    FWF = auto()
    LORA = auto()
    NOT_SPECIFIED = auto()


class LossType(Enum):
    LETTER = auto()
    CORPUS = auto()
    LETTER_ANSWER = auto()
    QUESTION_LETTER_ANSWER = auto()
    QUESTION_ANSWER = auto()
    NUMBER = auto()


class DataFormat(Enum):
    CORPUS = auto()
    MCQ = auto()
    TF = auto()


class Datasets(Enum):
    YEARS_MMLU_RETAIN = auto()
    MMLU = auto()
    RANDOM_BD_SAME_RETAIN = auto()
    RANDOM_BD_ALL_SPLITS = auto()
    WMDP_MCQ_CORPUS = auto()


# The project's modules import the enums above from here, so they are imported
# after the enums are defined (see also the __main__ guard at the bottom).
import unlearn_corpus as uc  # noqa: E402
import finetune_corpus  # noqa: E402


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

    def training_files(self, data_format: DataFormat) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(forget, retain) files to train on: the corpora, or with MCQ the
        question files of the same facts."""
        if data_format == DataFormat.MCQ:
            return self.val_files, self.val_retain_files
        return self.unlearn_files, self.retain_files

    def question_files(self) -> set[str]:
        """Files read as multiple-choice questions (evaluation, k-shot, MCQ training)."""
        return {*self.val_files, *self.val_retain_files} | {f for f in (self.dev_file, self.retain_dev_file) if f}

    def text_files(self) -> set[str]:
        """Training files, corpus or MCQ."""
        return {*self.unlearn_files, *self.wrong_unlearn_files, *self.fixed_wrong_unlearn_files, *self.retain_files}

    def all_files(self) -> list[str]:
        return sorted(self.question_files() | self.text_files())


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
# Configuration: validation before anything loads
# --------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad configuration value; reported as one line before any model loads."""


def parse_enum(enum: type[Enum], value: Any, key: str, exclude: Sequence[Enum] = ()) -> Enum:
    allowed = [m.name for m in enum if m not in exclude]
    name = value.name if isinstance(value, Enum) else str(value)
    if name not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; use one of {', '.join(allowed)}")
    return enum[name]


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


def _positive_ints(values: Iterable, key: str) -> list[int]:
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}: {value!r} is not allowed; use positive integers")
        out.append(value)
    return out


def _positive_floats(values: Iterable, key: str) -> list[float]:
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{key}: {value!r} is not allowed; use positive numbers")
        out.append(float(value))
    return out


@dataclass(frozen=True)
class GridPoint:
    """One unlearning run of the sweep."""

    unlearn_type: UnlearnType
    dataset: Datasets
    loss_type: LossType
    lr: float
    epochs: int
    retain_coeff: float
    max_samples: int
    steering_coeff: float | None = None
    lora_rank: int = 0


def dataset_grid(cfg: DictConfig, method: UnlearnType, dataset: Datasets) -> list[GridPoint]:
    """The paper's grid for one method and dataset, with cut_scs only for CUT
    and lora_ranks only for LORA."""
    key = f"unlearn.types_config.{method.name}"
    method_cfg = OmegaConf.select(cfg, key)
    if method_cfg is None:
        raise ConfigError(f"{key} is missing; every method in unlearn.types needs a config block")
    ds_cfg = OmegaConf.select(method_cfg, f"datasets_config.{dataset.name}")
    if ds_cfg is None:
        raise ConfigError(f"{key}.datasets_config.{dataset.name} is missing; add epochs_lst, lrs and rcs for it")
    loss_type = parse_enum(LossType, method_cfg.get("loss_type", "CORPUS"), f"{key}.loss_type")
    ds_key = f"{key}.datasets_config.{dataset.name}"
    epochs = _positive_ints(ds_cfg.epochs_lst, f"{ds_key}.epochs_lst")
    shared = LrRcGrid(_positive_floats(ds_cfg.lrs, f"{ds_key}.lrs"), _retain_coeffs(ds_cfg.get("rcs"), f"{ds_key}.rcs"))
    max_samples = _positive_ints(cfg.unlearn.max_samples_lst, "unlearn.max_samples_lst")
    scs: list[float | None] = [None]
    ranks = [0]
    if method == UnlearnType.CUT:
        scs = _positive_floats(cfg.unlearn.cut_scs, "unlearn.cut_scs")
    if method == UnlearnType.LORA:
        ranks = _positive_ints(cfg.unlearn.lora_ranks, "unlearn.lora_ranks")
    if ds_cfg.get("by_rank") and method != UnlearnType.LORA:
        raise ConfigError(f"{ds_key}.by_rank is not allowed for {method.name}; only LORA sweeps ranks")
    by_rank = _grids_by_rank(ds_cfg.get("by_rank"), shared, f"{ds_key}.by_rank")
    return [GridPoint(method, dataset, loss_type, lr, e, rc, ms, sc, r)
            for ms in max_samples for e in epochs for r in ranks
            for lr in by_rank.get(r, shared).lrs for rc in by_rank.get(r, shared).rcs for sc in scs]


@dataclass(frozen=True)
class LrRcGrid:
    lrs: list[float]
    rcs: list[float]


def _retain_coeffs(rcs_cfg, key: str) -> list[float]:
    """Retain coefficients from `{range: [...], add: [...]}` (the paper's form) or a plain list."""
    rcs_cfg = rcs_cfg or {}
    if isinstance(rcs_cfg, Mapping):
        values = list(rcs_cfg.get("range", []) or []) + list(rcs_cfg.get("add", []) or [])
    else:
        values = list(rcs_cfg)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
        raise ConfigError(f"{key}: {values!r} is not allowed; give non-negative retain coefficients")
    return [float(v) for v in values]


def _grids_by_rank(mapping, shared: LrRcGrid, key: str) -> dict[int, LrRcGrid]:
    """Optional per-rank `lrs` / `rcs` for LoRA: a larger rank moves the weights
    further per step, so matched forgetting needs its own lr (and a small rank,
    whose one direction the forget and retain answers share, a larger rc)."""
    out = {}
    for rank, settings in (mapping or {}).items():
        rank_value = int(rank) if str(rank).isdigit() else rank
        rank_key = f"{key}.{rank}"
        unknown = set(settings or {}) - {"lrs", "rcs"}
        if unknown:
            raise ConfigError(f"{rank_key}: {sorted(unknown)} not allowed; a rank may set lrs and rcs")
        out[_positive_ints([rank_value], key)[0]] = LrRcGrid(
            _positive_floats(settings["lrs"], f"{rank_key}.lrs") if "lrs" in settings else shared.lrs,
            _retain_coeffs(settings["rcs"], f"{rank_key}.rcs") if "rcs" in settings else shared.rcs)
    return out


def model_name(model_path: str) -> str:
    return Path(model_path.rstrip("/")).name


def unlearned_model_path(cfg: DictConfig, point: GridPoint, base_model: str) -> str:
    sc = point.steering_coeff if point.steering_coeff is not None else "none"
    return str(Path(cfg.models_dir) / point.unlearn_type.name / point.dataset.name / cfg.wandb_project_name /
               f"rank{point.lora_rank}-sc{sc}-{model_name(base_model)}-rc{point.retain_coeff}-lr{point.lr}-epochs{point.epochs}")


@dataclass(frozen=True)
class RttJob:
    """One RTT run: fine-tune `base_model` on every val file but `skip_split`."""

    index: int
    base_model: str
    dataset: Datasets
    condition: str  # "unlearned" or "baseline" (RTT from the pre-unlearning model)
    loss_type: LossType
    lr: float
    epochs: int
    skip_split: int
    train_files: tuple[str, ...]
    val_file: str
    unlearn_type: str = ""
    lora_rank: int = 0
    key: str = ""


@dataclass(frozen=True)
class Run:
    index: int
    point: GridPoint
    base_model: str
    model_path: str
    rtt: tuple[RttJob, ...] = ()


@dataclass(frozen=True)
class TeachJob:
    """Fine-tune the base model on the facts before unlearning them."""

    base_model: str
    model_path: str
    dataset: Datasets


@dataclass
class Plan:
    base_model: str  # the model_id's checkpoint (an embedded model may not be materialized yet)
    unlearn_from: str  # the taught model when teaching is on, else base_model
    teach: TeachJob | None = None
    runs: list[Run] = field(default_factory=list)
    baseline_rtt: list[RttJob] = field(default_factory=list)
    given_rtt: list[RttJob] = field(default_factory=list)

    def rtt_count(self) -> int:
        return sum(len(r.rtt) for r in self.runs) + len(self.baseline_rtt) + len(self.given_rtt)


def rtt_jobs(cfg: DictConfig, model_path: str, dataset: Datasets, condition: str, start: int,
             unlearn_type: str = "", lora_rank: int = 0) -> list[RttJob]:
    """RTT loss types x lrs x epochs x held-out splits, for one model."""
    files = DATASETS[dataset]
    jobs = []
    for loss_name in cfg.ft.loss_types:
        loss_type = parse_enum(LossType, loss_name, "ft.loss_types")
        for lr in _positive_floats(cfg.ft.lrs, "ft.lrs"):
            for epochs in _positive_ints(cfg.ft.epochs_lst, "ft.epochs_lst"):
                for skip in range(cfg.ft.num_splits):
                    train = tuple(f for i, f in enumerate(files.val_files) if i != skip)
                    key = uc.fingerprint(model_path, dataset.name, loss_type.name, lr, epochs, skip,
                                         OmegaConf.to_container(cfg.ft, resolve=True), cfg.data_seed)
                    jobs.append(RttJob(start + len(jobs), model_path, dataset, condition, loss_type, lr, epochs, skip,
                                       train, files.val_files[skip], unlearn_type, lora_rank, key))
    return jobs


def existing_rtt_keys(results_dir: str) -> set[str]:
    keys: set[str] = set()
    for path in sorted(Path(results_dir, "ft").glob("*.csv")):
        frame = pd.read_csv(path)
        if "rtt_key" in frame:
            keys.update(frame["rtt_key"].dropna().astype(str))
    return keys


def ensure_dataset(cfg: DictConfig, dataset: Datasets) -> None:
    """Write the made-up-facts dataset when it is asked for and absent; fail
    with the list of missing files otherwise (the paper's registry points at
    files that were never published)."""
    files = DATASETS[dataset]
    root = Path(cfg.data_root)
    if files.generated_dir and not (root / files.generated_dir).exists():
        spec = uc.RandomBdSpec(**OmegaConf.to_container(cfg.random_bd, resolve=True))
        log.info("writing made-up facts to %s (%d splits x %d facts)", root / files.generated_dir,
                 spec.num_splits, spec.facts_per_split)
        uc.write_random_bd_dataset(root / files.generated_dir, spec)
    missing = uc.missing_files(root, files.all_files())
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise uc.DataValidationError(f"dataset {dataset.name} is missing {len(missing)} file(s) under {root}: {shown}")
    uc.check_data_files(root, sorted(files.question_files()), sorted(files.text_files() - files.question_files()))


def validate_settings(cfg: DictConfig) -> None:
    """Checks that need no model or data: sizes, modes, device, wandb."""
    for key in ("unlearn.batch_size", "unlearn.val_batch_size", "ft.batch_size", "ft.val_batch_size"):
        _positive_ints([OmegaConf.select(cfg, key)], key)
    if cfg.wandb_mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"wandb_mode: {cfg.wandb_mode!r} is not allowed; use online, offline or disabled")
    for key in ("unlearn.optimizer", "ft.optimizer", "teach.optimizer"):
        if OmegaConf.select(cfg, key) not in uc.OPTIMIZERS:
            raise ConfigError(f"{key}: {OmegaConf.select(cfg, key)!r} is not allowed; use one of {sorted(uc.OPTIMIZERS)}")
    if cfg.just_eval and cfg.only_ft:
        raise ConfigError("just_eval and only_ft cannot both be set")
    if not isinstance(cfg.ft.num_splits, int) or cfg.ft.num_splits < 0:
        raise ConfigError(f"ft.num_splits: {cfg.ft.num_splits!r} is not allowed; use 0 or more")
    try:
        uc.resolve_device_policy(OmegaConf.to_container(cfg.device, resolve=True))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def teach_job(cfg: DictConfig, base_model: str) -> TeachJob | None:
    """The taught checkpoint is cached under a key of everything that decides it."""
    if not cfg.teach.enabled:
        return None
    dataset = parse_enum(Datasets, cfg.teach.dataset, "teach.dataset")
    ensure_dataset(cfg, dataset)
    files = DATASETS[dataset]
    data_key = uc.files_fingerprint(uc.data_file(cfg.data_root, f) for f in files.all_files())
    settings = {k: v for k, v in OmegaConf.to_container(cfg.teach, resolve=True).items() if k != "cpus"}
    key = uc.fingerprint(base_model, settings, cfg.data_seed, data_key)
    path = Path(cfg.models_dir) / "taught" / f"{model_name(base_model)}-{dataset.name}-{key}"
    return TeachJob(base_model, str(path), dataset)


def plan_sweep(cfg: DictConfig) -> Plan:
    """Every stage, unlearning run and RTT job of the sweep, checked (and any
    made-up data written) before any model loads."""
    validate_settings(cfg)
    methods = [parse_enum(UnlearnType, t, "unlearn.types", exclude=(UnlearnType.NOT_SPECIFIED,)) for t in cfg.unlearn.types]
    datasets = [parse_enum(Datasets, d, "datasets") for d in cfg.datasets]
    for dataset in datasets:
        if cfg.ft.num_splits > len(DATASETS[dataset].val_files):
            raise ConfigError(f"ft.num_splits: {cfg.ft.num_splits} is more than the {len(DATASETS[dataset].val_files)} "
                              f"val files of {dataset.name}")
    if UnlearnType.CUT in methods:
        check_cut_available()
    data_format = parse_enum(DataFormat, cfg.unlearn.data_format, "unlearn.data_format", exclude=(DataFormat.TF,))
    wrong_answer_methods = sorted(m.name for m in methods if m in (UnlearnType.WHP, UnlearnType.FWF))
    if data_format == DataFormat.MCQ and wrong_answer_methods:
        raise ConfigError(f"unlearn.data_format: MCQ is not allowed with {', '.join(wrong_answer_methods)}; "
                          "they train on their wrong-answer corpora (use CORPUS)")
    points = [p for m in methods for d in datasets for p in dataset_grid(cfg, m, d)]
    for dataset in datasets:
        ensure_dataset(cfg, dataset)
    base_model = uc.model_checkpoint_path(cfg.model_id, cfg.models_dir)
    teach = teach_job(cfg, base_model)
    plan = Plan(base_model, teach.model_path if teach else base_model, teach)
    if cfg.only_ft:
        plan.given_rtt = only_ft_jobs(cfg)
        return plan
    skip_rtt = cfg.dont_ft or cfg.just_eval or not cfg.unlearn.save_unlearn_model
    next_rtt = 0
    for index, point in enumerate(points):
        path = unlearned_model_path(cfg, point, plan.unlearn_from)
        jobs = [] if skip_rtt else rtt_jobs(cfg, path, point.dataset, "unlearned", next_rtt,
                                              point.unlearn_type.name, point.lora_rank)
        next_rtt += len(jobs)
        plan.runs.append(Run(index, point, plan.unlearn_from, path, tuple(jobs)))
    if cfg.baseline_rtt and not skip_rtt:
        done = existing_rtt_keys(cfg.results_dir)
        for dataset in datasets:
            jobs = rtt_jobs(cfg, plan.unlearn_from, dataset, "baseline", next_rtt)
            plan.baseline_rtt += [j for j in jobs if j.key not in done]
            next_rtt += len(jobs)
    return plan


def only_ft_jobs(cfg: DictConfig) -> list[RttJob]:
    """`only_ft`: RTT on given models, `ft_model_paths: [[path, DATASET], ...]`."""
    jobs: list[RttJob] = []
    for entry in cfg.ft_model_paths:
        if len(entry) != 2:
            raise ConfigError(f"ft_model_paths: {list(entry)!r} is not allowed; use [model_path, DATASET] pairs")
        path, dataset = str(entry[0]), parse_enum(Datasets, entry[1], "ft_model_paths")
        if not Path(path, "config.json").is_file():
            raise ConfigError(f"ft_model_paths: {path!r} is not a model folder (no config.json)")
        ensure_dataset(cfg, dataset)
        jobs += rtt_jobs(cfg, path, dataset, "given", len(jobs))
    if not jobs:
        raise ConfigError("only_ft=true needs ft_model_paths: [[model_path, DATASET], ...] and ft.num_splits > 0")
    return jobs


def check_cut_available() -> None:
    try:
        import rmu.unlearn_pipeline  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"unlearn.types: CUT needs rmu/unlearn_pipeline.py, which failed to import ({err})") from None


# --------------------------------------------------------------------------
# Unlearning methods: one registry entry each
# --------------------------------------------------------------------------


def _unlearn_corpus_main(**kwargs):
    return uc.main(**kwargs)


def _rmu_main(**kwargs):
    from rmu import unlearn_pipeline

    return unlearn_pipeline.main(**kwargs)


@dataclass(frozen=True)
class Method:
    entry: Callable[..., Any]
    extra_args: Callable[[GridPoint], dict]


METHODS: dict[UnlearnType, Method] = {
    UnlearnType.GD: Method(_unlearn_corpus_main, lambda p: {"unlearn_type": UnlearnType.GD}),
    UnlearnType.WHP: Method(_unlearn_corpus_main, lambda p: {"unlearn_type": UnlearnType.WHP}),
    UnlearnType.FWF: Method(_unlearn_corpus_main, lambda p: {"unlearn_type": UnlearnType.FWF}),
    # LoRA unlearning is gradient difference trained through LoRA adapters.
    UnlearnType.LORA: Method(_unlearn_corpus_main, lambda p: {"unlearn_type": UnlearnType.GD, "lora_rank": p.lora_rank}),
    UnlearnType.CUT: Method(_rmu_main, lambda p: {"steering_coeff": p.steering_coeff}),
}


def unlearn_kwargs(cfg: Mapping, run: Run, epochs: int | None = None, save: bool = True) -> dict:
    """Keyword arguments of a method's main() for one run (cfg as a plain dict)."""
    point, files, u = run.point, DATASETS[run.point.dataset], cfg["unlearn"]
    data_format = DataFormat[u["data_format"]]
    forget_files, retain_files = files.training_files(data_format)
    method_cfg = {k: v for k, v in u["types_config"][point.unlearn_type.name].items()
                  if k not in ("datasets_config", "loss_type")}
    retain_loss = u.get("retain_loss_type")
    return dict(
        train_files=forget_files, wrong_unlearn_files=files.wrong_unlearn_files,
        fixed_wrong_unlearn_files=files.fixed_wrong_unlearn_files, val_files=files.val_files,
        dev_set=files.dev_file, retain_files=retain_files, val_retain_files=files.val_retain_files,
        data_format=data_format,
        retain_dev_file=files.retain_dev_file, base_model=run.base_model, lr=point.lr,
        epochs=point.epochs if epochs is None else epochs, retain_coeff=point.retain_coeff,
        max_samples=point.max_samples, save_name=run.model_path if save else None, loss_type=point.loss_type,
        retain_loss_type=LossType[retain_loss] if retain_loss else None,
        name=Path(run.model_path).name, project_name=cfg["wandb_project_name"], wandb_mode=cfg["wandb_mode"],
        data_root=cfg["data_root"], data_seed=cfg["data_seed"], device=cfg["device"],
        batch_size=u["batch_size"], val_batch_size=u["val_batch_size"], warmup_steps=u["warmup_steps"],
        eval_every=u["eval_every"], k_shot=u["k_shot"], optimizer=u["optimizer"], freeze_layers=u["freeze_layers"],
        lora_alpha=u["lora_alpha"], lora_target_modules=u["lora_target_modules"], max_length=u["max_length"],
    ) | method_cfg | METHODS[point.unlearn_type].extra_args(point)  # a method's own settings win


# --------------------------------------------------------------------------
# Results: one CSV per finished run, written whole
# --------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.name
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


def unlearning_row(run: Run, result, cfg: Mapping) -> dict:
    point = run.point
    return {
        "model_path": run.model_path if result.save_name else "", "dataset": point.dataset,
        "unlearn_type": point.unlearn_type, "loss_type": point.loss_type, "lora_rank": point.lora_rank,
        "lr": point.lr, "epochs": point.epochs, "retain_coeff": point.retain_coeff,
        "steering_coeff": point.steering_coeff, "max_samples": point.max_samples,
        "forget_accs": result.forget_accs, "forget_accs_calibrated": result.forget_accs_calibrated,
        "retain_accs": result.retain_accs, "retain_accs_calibrated": result.retain_accs_calibrated,
        "trainable_params": result.trainable_params, "base_model": run.base_model, "save_name": result.save_name,
        "val_files": DATASETS[point.dataset].val_files, "project_name": cfg["wandb_project_name"],
        "data_seed": cfg["data_seed"], "just_eval": cfg["just_eval"],
    }


def rtt_row(job: RttJob, result, cfg: Mapping) -> dict:
    return {
        "base_model": job.base_model, "condition": job.condition, "dataset": job.dataset,
        "unlearn_type": job.unlearn_type, "lora_rank": job.lora_rank, "loss_type": job.loss_type,
        "lr": job.lr, "epochs": job.epochs, "skip_split": job.skip_split,
        "train_files": job.train_files, "val_files": [job.val_file],
        "forget_accs_local": result.forget_accs_local,
        "forget_accs_calibrated_local": result.forget_accs_calibrated_local,
        "retain_accs_local": result.retain_accs_local,
        "retain_accs_calibrated_local": result.retain_accs_calibrated_local,
        "rtt_key": job.key, "data_seed": cfg["data_seed"], "project_name": cfg["wandb_project_name"],
    }


# --------------------------------------------------------------------------
# Ray tasks
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    num_cpus: float
    num_gpus: float

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
    return Resources(float(cpus), gpus)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # A bar per checkpoint load (well under a second each) only buries the sweep's own bars.
    transformers.utils.logging.disable_progress_bar()
    # peft calls a transformers property deprecated for v6, once per LoRA run; nothing to act on here.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@ray.remote(num_cpus=1)
def unlearn(cfg: Mapping, run: Run, epochs: int | None = None, save: bool = True):
    configure_logging()
    return METHODS[run.point.unlearn_type].entry(**unlearn_kwargs(cfg, run, epochs, save))


def rtt_kwargs(cfg: Mapping, job: RttJob) -> dict:
    files, ft = DATASETS[job.dataset], cfg["ft"]
    return dict(
        train_files=job.train_files, val_files=[job.val_file],
        val_retain_files=files.val_retain_files if ft["eval_retain"] else (),
        dev_set=files.dev_file, base_model=job.base_model, lr=job.lr, epochs=job.epochs, loss_type=job.loss_type,
        batch_size=ft["batch_size"], val_batch_size=ft["val_batch_size"], warmup_steps=ft["warmup_steps"],
        optimizer=ft["optimizer"], k_shot=ft["k_shot"], data_root=cfg["data_root"], data_seed=cfg["data_seed"],
        device=cfg["device"], max_length=ft["max_length"], train_embeddings=ft["train_embeddings"], name=f"rtt-{job.condition}-{Path(job.base_model).name}-skip{job.skip_split}",
        project_name=cfg["wandb_project_name"], wandb_mode=cfg["wandb_mode"],
    )


@ray.remote(num_cpus=1)
def finetune(cfg: Mapping, job: RttJob) -> str:
    """One RTT run; writes its own CSV when it finishes."""
    configure_logging()
    result = finetune_corpus.main(**rtt_kwargs(cfg, job))
    return str(write_result_csv(Path(cfg["results_dir"]) / "ft", job.index, rtt_row(job, result, cfg)))


@ray.remote(num_cpus=0)
def main(cfg: Mapping, run: Run, resources: Resources) -> list[str]:
    """Unlearn, write the unlearning CSV, then run this model's RTT jobs."""
    epochs = 0 if cfg["just_eval"] else None
    save = cfg["unlearn"]["save_unlearn_model"] and not cfg["just_eval"]
    result = ray.get(unlearn.options(**resources.options()).remote(cfg, run, epochs, save))
    written = [str(write_result_csv(Path(cfg["results_dir"]) / "unlearning", run.index, unlearning_row(run, result, cfg)))]
    written += ray.get([finetune.options(**resources.options()).remote(cfg, job) for job in run.rtt])
    return written


@ray.remote(num_cpus=1)
def evaluate_forget_accuracy(cfg: Mapping, model_path: str, dataset: Datasets) -> float:
    """Mean MCQ accuracy of a model on a dataset's forget (val) files."""
    configure_logging()
    files = DATASETS[dataset]
    policy = uc.resolve_device_policy(cfg["device"])
    tokenizer, model = uc.load_tokenizer(model_path), uc.load_model(model_path, policy)
    evals, accs = uc.EvalSet.load(cfg["data_root"], files.val_files), uc.AccuracyLog()
    evals.evaluate(model, tokenizer, cfg["unlearn"]["val_batch_size"], 0, accs)
    return accs.mean_at(0)


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def start_ray(ray_cfg: Mapping) -> None:
    if ray.is_initialized():
        return
    if ray_cfg.get("address"):
        project = str(Path(__file__).resolve().parent)
        ray.init(address=ray_cfg["address"], runtime_env={
            "working_dir": project, "excludes": [".venv", ".git", "models", "data", "evals"]})
    else:
        # No runtime_env: local workers see the driver's sys.path, and tasks can
        # then use the workers Ray prestarts (each new worker imports torch anew).
        ray.init(num_cpus=ray_cfg.get("num_cpus"), include_dashboard=False, log_to_driver=True)


def run_all(refs: list, desc: str) -> list:
    """Wait for Ray tasks with a progress bar; return their results in order."""
    results: dict = {}
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results[done[0]] = ray.get(done[0])
            bar.update(1)
    return [results[r] for r in refs]


def teach(cfg: Mapping, job: TeachJob) -> None:
    configure_logging()
    files, t = DATASETS[job.dataset], cfg["teach"]
    finetune_corpus.main(
        train_files=files.val_files, extra_corpus_files=files.unlearn_files if t["with_corpus"] else (),
        val_files=files.val_files, dev_set=files.dev_file, base_model=job.base_model, lr=t["lr"],
        epochs=t["epochs"], batch_size=t["batch_size"], val_batch_size=cfg["unlearn"]["val_batch_size"],
        loss_type=LossType[t["loss_type"]], data_root=cfg["data_root"], data_seed=cfg["data_seed"],
        warmup_steps=t["warmup_steps"], eval_every=t["epochs"], optimizer=t["optimizer"], device=cfg["device"],
        train_embeddings=t["train_embeddings"], save_name=job.model_path, name="teach",
        project_name=cfg["wandb_project_name"], wandb_mode=cfg["wandb_mode"])


teach_task = ray.remote(num_cpus=1)(teach)


def preflight(cfg: DictConfig, plain: Mapping, plan: Plan, resources: Resources) -> None:
    """Refuse to "unlearn" facts the model never knew."""
    threshold = cfg.preflight.min_forget_acc
    if threshold is None or cfg.only_ft:
        return
    for dataset in {run.point.dataset for run in plan.runs}:
        acc = ray.get(evaluate_forget_accuracy.options(**resources.options()).remote(plain, plan.unlearn_from, dataset))
        log.info("preflight: %s knows %.3f of %s's forget facts", plan.unlearn_from, acc, dataset.name)
        if acc < threshold:
            raise ConfigError(f"preflight: {plan.unlearn_from} answers only {acc:.3f} of {dataset.name}'s forget questions "
                              f"(preflight.min_forget_acc={threshold}); teach it first (teach.enabled=true) "
                              "or lower the threshold")


def execute(cfg: DictConfig) -> Plan:
    """Validate everything, then: base model, teach (cached), preflight, sweep."""
    plan = plan_sweep(cfg)
    start_ray(cfg.ray)
    resources = task_resources(cfg.ray, ray.cluster_resources())
    plain = OmegaConf.to_container(cfg, resolve=True)
    uc.resolve_model_path(cfg.model_id, cfg.models_dir)
    if plan.teach and not Path(plan.teach.model_path, "config.json").is_file():
        log.info("teaching %s the facts of %s -> %s", plan.base_model, plan.teach.dataset.name, plan.teach.model_path)
        # One task alone: it may take more CPUs than a sweep task (teach.cpus).
        teach_resources = replace(resources, num_cpus=float(cfg.teach.cpus or resources.num_cpus))
        ray.get(teach_task.options(**teach_resources.options()).remote(plain, plan.teach))
    preflight(cfg, plain, plan, resources)
    refs = [main.remote(plain, run, resources) for run in plan.runs]
    refs += [finetune.options(**resources.options()).remote(plain, job) for job in plan.baseline_rtt + plan.given_rtt]
    log.info("sweep: %d unlearning runs, %d RTT runs", len(plan.runs), plan.rtt_count())
    run_all(refs, "sweep runs")
    return plan


@hydra.main(version_base=None, config_path=str(Path(__file__).resolve().parent / "conf"), config_name="default")
def run_pipeline(cfg: DictConfig) -> None:
    configure_logging()
    try:
        execute(cfg)
    except (ConfigError, uc.DataValidationError) as err:
        # Stop Ray first: its workers' forwarded output must not land after the error line.
        ray.shutdown()
        sys.stdout.flush()
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    # Run the importable module, not __main__, so the enums exist once (the
    # toolkit imports them from `pipeline`) and Ray ships tasks by reference.
    import pipeline

    pipeline.run_pipeline()
