"""Sweep-level settings, read once from the composed config and checked
there: what runs (methods, datasets, seeds, slice), where (folders), which
modes, Ray and progress. The stage sections (`unlearn`, `ft`, `teach`,
`quant`) become typed stage settings in the planner."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

from toolkit.facts import RandomBdSpec
from toolkit.grid import parse_enum, parse_name
from toolkit.names import DataFormat, Datasets
from toolkit.probes import plannable
from toolkit.registry import METHODS
from toolkit.settings import (
    BOOLEAN,
    FRACTION_OR_NULL,
    NAMES,
    NON_NEGATIVE_INTS,
    POSITIVE_INTS,
    POSITIVE_NUMBERS,
    PROGRESS_MODES,
    SCORING,
    SOME_NAMES,
    WANDB_MODES,
    Allowed,
    ConfigError,
    build_settings,
    distinct,
    is_number,
    one_of,
)

FLAGS = ("just_eval", "dont_ft", "only_ft", "baseline_rtt", "never_taught_rtt", "probe_flagged_runs", "rerun")


def resolve_progress(mode: str) -> str:
    mode = one_of(*PROGRESS_MODES).check(mode, "progress")
    if mode == "auto":
        return "bars" if sys.stderr.isatty() else "lines"
    return mode


def read_probes(names) -> list[str]:
    """`probes:`, each a probe a plugin registered (toolkit.probes.register_probe), each once."""
    allowed = plannable()
    for name in NAMES.check(names, "probes"):
        if name not in allowed:
            raise ConfigError(f"probes: {name!r} is not allowed; use a registered probe ({', '.join(allowed)}) or "
                              "one that a module named in plugins registers (toolkit.probes.register_probe)")
    return list(distinct(names, "probes"))


def seeds_subset(cfg: Mapping, key: str) -> list[int]:
    """`cfg[key]`, a non-empty list of seeds from `seeds`, or all of them when null."""
    chosen = cfg[key]
    if chosen is None:
        return list(cfg["seeds"])
    NON_NEGATIVE_INTS.each(chosen, key)
    strays = [s for s in chosen if s not in cfg["seeds"]]
    if strays:
        raise ConfigError(f"{key}: {strays!r} is not allowed; use seeds from seeds ({list(cfg['seeds'])!r}) "
                          "or null for all of them")
    return [s for s in cfg["seeds"] if s in chosen]


@dataclass(frozen=True)
class RaySettings:
    address: str | None  # null: a private local instance; "auto" or host:port: join a cluster
    num_cpus: int | None
    cpus_per_task: float
    gpus_per_task: Any  # "auto" or a number
    max_retries: int


@dataclass(frozen=True)
class SweepSettings:
    """The sweep's own settings, each checked once; `config` keeps the composed
    config as plain data for the stage sections."""

    config: dict
    methods: tuple[str, ...]
    datasets: tuple[Datasets, ...]
    seeds: tuple[int, ...]
    slice_seeds: tuple[int, ...]  # the seeds this invocation runs (`slice`, else all)
    baseline_seeds: tuple[int, ...]  # the seeds of this slice whose C runs
    data_format: DataFormat
    model_id: str
    data_root: str
    models_dir: str
    results_dir: str
    wandb_project_name: str
    progress: str  # resolved: bars, lines or off
    plugins: tuple[str, ...]
    just_eval: bool
    dont_ft: bool
    only_ft: bool
    baseline_rtt: bool
    never_taught_rtt: bool
    probe_flagged_runs: bool
    rerun: bool
    num_splits: int
    preflight_min_forget_acc: float | None
    teach_dataset: Datasets | None  # None: teaching is off
    teach_cpus: float | None
    random_bd: RandomBdSpec
    ray: RaySettings
    device: dict  # device.*, with bf16_autocast decided once for every job (it measures this machine)
    scoring: str = "letter"  # how every question is scored (toolkit.settings.SCORING_MODES)
    allow_repeated_answers: bool = False  # score questions that list their right answer twice, as given
    probes: tuple[str, ...] = ()  # registered probes (toolkit.probes) run on every unlearned model
    floor_every_seed: bool = False  # the floor on each seed of the slice (else once, on the first seed)

    @property
    def rtt_on(self) -> bool:
        return not (self.dont_ft or self.just_eval)

    @property
    def saves_models(self) -> bool:
        return not self.just_eval and self.config["unlearn"]["save_unlearn_model"]

    @classmethod
    def read(cls, cfg: Mapping) -> "SweepSettings":
        """Check every sweep-level key of a plain config (plugins already imported)."""
        flags = {flag: BOOLEAN.check(cfg[flag], flag) for flag in FLAGS}
        if flags["just_eval"] and flags["only_ft"]:
            raise ConfigError("just_eval and only_ft cannot both be set")
        num_splits = NON_NEGATIVE_INTS.check(cfg["ft"]["num_splits"], "ft.num_splits")
        if num_splits == 0 and not (flags["dont_ft"] or flags["just_eval"]):
            raise ConfigError("ft.num_splits: 0 is not allowed; use a positive integer (to run no RTT, set dont_ft=true)")
        NON_NEGATIVE_INTS.each(cfg["seeds"], "seeds")
        in_slice = seeds_subset(cfg, "slice")
        baseline = [s for s in seeds_subset(cfg, "baseline_rtt_seeds") if s in in_slice]
        preflight = FRACTION_OR_NULL.check(cfg["preflight"]["min_forget_acc"], "preflight.min_forget_acc")
        ray = cls.read_ray(cfg["ray"])
        teach_cpus = cfg["teach"]["cpus"]
        if teach_cpus is not None:
            POSITIVE_NUMBERS.check(teach_cpus, "teach.cpus")
        random_bd = build_settings(RandomBdSpec, cfg["random_bd"], "random_bd")
        random_bd.check_capacity()
        one_of(*WANDB_MODES).check(cfg["wandb_mode"], "wandb_mode")
        device = dict(cfg["device"])
        from toolkit.device import resolve_device_policy  # torch: the policy measures this machine

        policy = resolve_device_policy(device)
        if device.get("bf16_autocast") == "auto":
            device["bf16_autocast"] = policy.autocast_dtype is not None
        plugins = NAMES.check(cfg["plugins"] or [], "plugins")
        types = cfg["unlearn"]["types"]
        methods = [parse_name(t, "unlearn.types", METHODS) for t in types] if types else []
        if not methods:
            raise ConfigError("unlearn.types: [] is not allowed; give at least one of " + ", ".join(METHODS))
        datasets = [parse_enum(Datasets, d, "datasets") for d in SOME_NAMES.check(cfg["datasets"], "datasets")]
        distinct(datasets, "datasets", cfg["datasets"])
        distinct(methods, "unlearn.types", types)
        data_format = parse_enum(DataFormat, cfg["unlearn"]["data_format"], "unlearn.data_format")
        teach = parse_enum(Datasets, cfg["teach"]["dataset"], "teach.dataset") if cfg["teach"]["enabled"] else None
        return cls(
            dict(cfg), tuple(methods), tuple(datasets), tuple(cfg["seeds"]), tuple(in_slice), tuple(baseline),
            data_format, cfg["model_id"], cfg["data_root"], cfg["models_dir"], cfg["results_dir"],
            cfg["wandb_project_name"], resolve_progress(cfg["progress"]), plugins, **flags, num_splits=num_splits,
            preflight_min_forget_acc=preflight, teach_dataset=teach, teach_cpus=teach_cpus, random_bd=random_bd,
            ray=ray, device=device, scoring=SCORING.check(cfg.get("scoring", "letter"), "scoring"),
            allow_repeated_answers=BOOLEAN.check(cfg.get("allow_repeated_answers", False), "allow_repeated_answers"),
            probes=tuple(read_probes(cfg.get("probes") or [])),
            floor_every_seed=BOOLEAN.check(cfg.get("floor_every_seed", False), "floor_every_seed"))

    @staticmethod
    def read_ray(ray: Mapping) -> RaySettings:
        num_cpus = ray["num_cpus"]
        if num_cpus is not None:
            POSITIVE_INTS.check(num_cpus, "ray.num_cpus")
        return RaySettings(ray["address"], num_cpus, POSITIVE_NUMBERS.check(ray["cpus_per_task"], "ray.cpus_per_task"),
                           GPUS.check(ray.get("gpus_per_task", "auto"), "ray.gpus_per_task"),
                           NON_NEGATIVE_INTS.check(ray["max_retries"], "ray.max_retries"))


GPUS = Allowed("auto or a number of GPUs >= 0", lambda v: v in ("auto", None) or (is_number(v) and v >= 0))
