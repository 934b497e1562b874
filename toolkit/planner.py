"""The plan: every job of the sweep with its settings and key, built once
from the sweep settings, with the jobs already finished marked."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

from toolkit.checkpoints import adapter_base, model_checkpoint_path
from toolkit.checks import check_folders, check_methods
from toolkit.data import data_file, files_fingerprint, fingerprint
from toolkit.datasets import DATASETS, FLOOR_DATASETS, DatasetFiles, ensure_dataset
from toolkit.grid import (
    GridPoint,
    dataset_grid,
    method_block,
    model_name,
    parse_enum,
    stop_target_of,
    unlearned_model_path,
    with_labels,
)
from toolkit.jobs import QuantJob, RttJob, Run, TeachJob, marker_key
from toolkit.names import QUANT_BITS, Datasets, LossType
from toolkit.probes import PROBE_REGISTRY, ProbeTarget
from toolkit.registry import METHODS, Method
from toolkit.results import TABLES, recorded_rows
from toolkit.settings import (
    POSITIVE_INTS,
    POSITIVE_NUMBERS,
    SOME_NAMES,
    Allowed,
    ConfigError,
    FinetuneSettings,
    LoraSettings,
    SaveSettings,
    StopRule,
    TrainSettings,
    UnlearnSettings,
    build_settings,
    distinct,
    importable,
    is_int,
    key_settings,
    train_settings,
)
from toolkit.sweep_settings import SweepSettings


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
    preflight: list[QuantJob] = field(default_factory=list)  # plain evaluations of the model to unlearn

    def rtt_count(self) -> int:
        return sum(len(r.rtt) for r in self.runs) + len(self.baseline_rtt) + len(self.floor_rtt) + len(self.given_rtt)

    def jobs(self) -> list:
        """Every job, each unlearning run before the jobs that need its model."""
        out: list = []
        for run in self.runs:
            out += [run, *run.rtt, *run.quant, *run.probes]
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

    def __init__(self, sweep: SweepSettings):
        self.sweep = sweep
        self.cfg = sweep.config
        self.data_keys: dict[Datasets, str] = {}
        self.index = 0

    def next_index(self) -> int:
        self.index += 1
        return self.index - 1

    def data_key(self, dataset: Datasets) -> str:
        if dataset not in self.data_keys:
            files = DATASETS[dataset].all_files()
            self.data_keys[dataset] = files_fingerprint(data_file(self.sweep.data_root, f) for f in files)
        return self.data_keys[dataset]

    def top(self) -> dict:
        """The top-level keys stage settings share, as the sweep decided them."""
        return {**self.cfg, "progress": self.sweep.progress, "device": self.sweep.device}

    # ---- unlearning

    def unlearn_settings(self, point: GridPoint, base_model: str, model_path: str) -> UnlearnSettings:
        section = self.cfg["unlearn"]
        method, block = METHODS[point.unlearn_type], method_block(self.cfg, point.unlearn_type)
        block_key = f"unlearn.types_config.{point.unlearn_type}"
        overrides = method_overrides(block, block_key, method)
        just_eval = self.sweep.just_eval
        train = train_settings({**section, **overrides}, self.top(), "unlearn", model=base_model, lr=point.lr,
                                  epochs=0 if just_eval else point.epochs, seed=point.seed,
                                  label=f"{point.label} unlearn")
        forget, retain = DATASETS[point.dataset].training_files(self.sweep.data_format, method.trains_on)
        lora = build_settings(LoraSettings, section, "unlearn", lora_rank=point.lora_rank) if method.lora else None
        own = None
        if method.settings is not None:
            values = {a.field: point.value(a.field) for a in method.axes if a.field != "lora_rank"}
            own = build_settings(method.settings, block, block_key, **values)
        save = build_settings(SaveSettings, section, "unlearn",
                                 path=model_path if section["save_unlearn_model"] and not just_eval else None)
        retain_loss = section["retain_loss_type"] if section["retain_loss_type"] is not None else point.loss_type
        return build_settings(
            UnlearnSettings, section, "unlearn", train=train,
            evals=DATASETS[point.dataset].evals(scoring=self.sweep.scoring),
            forget_files=forget, retain_files=retain, loss_type=point.loss_type, retain_loss_type=retain_loss,
            retain_coeff=point.retain_coeff, max_samples=point.max_samples, lora=lora,
            stop=build_settings(StopRule, section, "unlearn", stop_at_forget_acc=stop_target_of(self.cfg, point)),
            save=save, method=own)

    def run_key(self, point: GridPoint, settings: UnlearnSettings, upstream: str) -> str:
        return fingerprint("unlearn", point.unlearn_type, key_settings(settings), self.data_key(point.dataset),
                              upstream)

    # ---- RTT (and the adapter-relearning probe)

    def rtt_jobs(self, model_path: str, dataset: Datasets, condition: str, *, upstream: str, seeds: Sequence[int],
                 point: GridPoint | None = None, who: str = "", key_model: str | None = None) -> list[RttJob]:
        """RTT loss types x lrs x epochs x held-out splits x seeds for one model,
        then the same with a LoRA attacker when ft.lora_rtt is enabled."""
        ft = self.cfg["ft"]
        probes = [("rtt", ft, None)]
        if ft["lora_rtt"]["enabled"] and condition in ("unlearned", "baseline"):
            lora_cfg = ft["lora_rtt"]
            probes.append(("lora_rtt", {**ft, **{k: v for k, v in lora_cfg.items() if k in ("lrs", "epochs_lst")}},
                           build_settings(LoraSettings, lora_cfg, "ft.lora_rtt")))
        jobs = []
        loss_types = distinct([parse_enum(LossType, name, "ft.loss_types")
                               for name in SOME_NAMES.check(ft["loss_types"], "ft.loss_types")], "ft.loss_types",
                              ft["loss_types"])
        for probe, section, attacker in probes:
            key_prefix = "ft" if probe == "rtt" else "ft.lora_rtt"
            lrs = POSITIVE_NUMBERS.each(section["lrs"], f"{key_prefix}.lrs")
            epochs_lst = POSITIVE_INTS.each(section["epochs_lst"], f"{key_prefix}.epochs_lst")
            for loss_type in loss_types:
                for lr in lrs:
                    for epochs in epochs_lst:
                        # what tells this model's RTT runs apart, beside the held-out split
                        shown = ([loss_type.name] if len(loss_types) > 1 else []) + \
                                ([f"lr{lr:g}"] if len(lrs) > 1 else []) + ([f"e{epochs}"] if len(epochs_lst) > 1 else [])
                        for skip in range(self.sweep.num_splits):
                            for seed in seeds:
                                jobs.append(self.rtt_job(model_path, dataset, condition, loss_type, lr, epochs, skip,
                                                         seed, probe, attacker, upstream, point,
                                                         " ".join([who, probe, *shown]), key_model=key_model))
        return jobs

    def rtt_job(self, model_path, dataset, condition, loss_type, lr, epochs, skip, seed, probe, attacker, upstream,
                point, who, *, key_model: str | None = None) -> RttJob:
        """One RTT job; `key_model` names its model in the key (see `add_runs`), else its folder does."""
        ft, files = self.cfg["ft"], DATASETS[dataset]
        train_files = tuple(f for i, f in enumerate(files.val_files) if i != skip)
        label = f"{who} v{skip}" + (f" s{seed}" if point is None and condition in ("baseline", "never_taught") else "")
        train = train_settings(ft, self.top(), "ft", model=model_path, lr=lr, epochs=epochs, seed=seed,
                                  label=label.strip())
        settings = build_settings(
            FinetuneSettings, ft, "ft", train=train,
            evals=files.evals(ft["eval_retain"], [files.val_files[skip]], self.sweep.scoring),
            train_files=train_files,
            extra_corpus_files=(), loss_type=loss_type, lora=attacker, save=SaveSettings(None, "merged"))
        named = replace(settings, train=replace(settings.train, model=key_model)) if key_model else settings
        key = fingerprint("rtt", probe, condition, key_settings(named), self.data_key(dataset), upstream)
        return RttJob(self.next_index(), model_path, dataset, condition, loss_type, lr, epochs, skip, train_files,
                      files.val_files[skip], point.unlearn_type if point else "", point.lora_rank if point else 0,
                      key, settings, seed, probe, upstream, self.sweep.results_dir)

    # ---- quantization probe and plain evaluation

    def quant_jobs(self, model_path: str, dataset: Datasets, condition: str, upstream: str,
                   point: GridPoint | None, who: str, key_model: str | None = None) -> list[QuantJob]:
        quant = self.cfg["quant"]
        bits = Allowed(f"bits from {QUANT_BITS}", lambda v: v in QUANT_BITS).each(quant["bits"], "quant.bits",
                                                                                          empty_ok=True)
        blocksize = Allowed("a power of two >= 32", lambda v: is_int(v) and v >= 32 and v & (v - 1) == 0).check(
            quant["blocksize"], "quant.blocksize")
        jobs = []
        for b in bits:
            train = self.eval_settings(model_path, f"{who} quant{b}".strip())
            evals = DATASETS[dataset].evals(quant["eval_retain"], scoring=self.sweep.scoring)
            key = fingerprint("quant", b, blocksize, condition, key_model or model_path, key_settings(evals),
                                 self.data_key(dataset), upstream)
            jobs.append(QuantJob(self.next_index(), model_path, dataset, condition, b, evals, train, blocksize, key,
                                 upstream, point, self.sweep.results_dir))
        return jobs

    def eval_settings(self, model_path: str, label: str) -> TrainSettings:
        """TrainSettings for an evaluation with no training (its lr is unused)."""
        return train_settings(self.cfg["unlearn"], self.top(), "unlearn", model=model_path, lr=1.0, epochs=0,
                                 seed=self.sweep.seeds[0], label=label)

    # ---- teaching

    def teach_job(self, base_model: str) -> TeachJob | None:
        """The taught checkpoint is cached under a key of everything that decides it."""
        dataset = self.sweep.teach_dataset
        if dataset is None:
            return None
        files = DATASETS[dataset]
        unsaved = self.provisional_teach_settings(base_model, files, "")
        key = fingerprint("teach", key_settings(unsaved), self.data_key(dataset))
        path = Path(self.sweep.models_dir) / "taught" / f"{model_name(base_model)}-{dataset.name}-{key}"
        settings = self.provisional_teach_settings(base_model, files, str(path))
        return TeachJob(base_model, str(path), dataset, settings, key)

    def provisional_teach_settings(self, base_model: str, files: DatasetFiles, path: str) -> FinetuneSettings:
        teach = self.cfg["teach"]
        train = train_settings(teach, self.top(), "teach", model=base_model, label="teach",
                                  eval_every=POSITIVE_INTS.check(teach["epochs"], "teach.epochs"))
        return build_settings(
            FinetuneSettings, teach, "teach", train=train,
            evals=files.evals(with_retain=False, scoring=self.sweep.scoring),
            train_files=files.val_files, extra_corpus_files=files.unlearn_files if teach["with_corpus"] else (),
            lora=None, save=SaveSettings(path or None, "merged"))


def method_overrides(block: Mapping, key: str, method: Method) -> dict:
    """A method block may override shared training settings (CUT's own
    optimizer); any other key must be one of the method's own settings."""
    shared = {f.name for f in fields(TrainSettings)}
    own = {f.name for f in fields(method.settings)} if method.settings else set()
    axis_fields = {a.field for a in method.axes}
    unknown = set(block) - shared - own - {"loss_type", "datasets_config"}
    if unknown & axis_fields:
        raise ConfigError(f"{key}.{sorted(unknown & axis_fields)[0]} is swept by {method.axes[0].key}; set it there")
    if unknown:
        allowed = sorted(own | {"loss_type", "datasets_config", "optimizer", "batch_size", "warmup_steps"})
        raise ConfigError(f"{key}: {sorted(unknown)} not allowed; a method block may set {', '.join(allowed)}")
    return {k: v for k, v in block.items() if k in shared}


def largest_k_shot(cfg) -> int:
    """The most few-shot examples any stage asks of a dev file."""
    shots = [(cfg.get(stage) or {}).get("k_shot") for stage in ("teach", "unlearn", "ft")]
    return max([k for k in shots if isinstance(k, int) and not isinstance(k, bool)] + [0])  # bad values: refused as settings


def build_plan(sweep: SweepSettings) -> Plan:
    """Every stage and job of the sweep, checked (and any made-up data
    written) before any model loads, with the jobs already finished marked."""
    planner = Planner(sweep)
    quant_bits = sweep.config["quant"]["bits"]
    if quant_bits and not importable("bitsandbytes"):
        raise ConfigError(f"quant.bits: {quant_bits!r} needs the bitsandbytes package "
                          "(pip install bitsandbytes); or set quant.bits=[] to skip the quantization probe")
    for dataset in sweep.datasets:
        if sweep.num_splits > len(DATASETS[dataset].val_files):
            raise ConfigError(f"ft.num_splits: {sweep.num_splits} is more than the "
                              f"{len(DATASETS[dataset].val_files)} val files of {dataset.name}")
    check_methods(sweep)
    points = with_labels([p for name in sweep.methods for d in sweep.datasets
                          for p in dataset_grid(sweep.config, name, d) if p.seed in sweep.slice_seeds])
    check_folders(sweep, [*sweep.datasets, *filter(None, [sweep.teach_dataset])])
    for dataset in sweep.datasets:
        ensure_sweep_dataset(sweep, dataset)
        if dataset in FLOOR_DATASETS and sweep.never_taught_rtt:
            ensure_sweep_dataset(sweep, FLOOR_DATASETS[dataset])
    base_model = model_checkpoint_path(sweep.model_id, sweep.models_dir)
    teach = planner.teach_job(base_model)
    if teach:
        ensure_sweep_dataset(sweep, teach.dataset)
    plan = Plan(base_model, teach.model_path if teach else base_model, teach)
    recorded = recorded_rows(sweep.results_dir)  # with rerun=true too: the new rows replace these
    if sweep.only_ft:
        plan.given_rtt = only_ft_jobs(planner)
    else:
        add_runs(planner, plan, points)
    mark_finished(plan, recorded.keys, sweep.rerun)
    if not sweep.probe_flagged_runs:
        plan.held_back_runs = recorded.flagged & plan.finished
    if sweep.preflight_min_forget_acc is not None and not sweep.only_ft:
        plan.preflight = [QuantJob(0, plan.unlearn_from, dataset, "preflight", None,
                                   DATASETS[dataset].evals(with_retain=False, scoring=sweep.scoring),
                                   planner.eval_settings(plan.unlearn_from, "preflight"))
                          for dataset in sorted({run.point.dataset for run in plan.runs})]
    return plan


def add_runs(planner: Planner, plan: Plan, points: list[GridPoint]) -> None:
    sweep = planner.sweep
    upstream = plan.teach.key if plan.teach else plan.base_model
    run_rtt = sweep.rtt_on and sweep.saves_models
    for point in points:
        # The model's folder is its descriptive name (the first edition's folder) and its run key, so sweeps
        # that differ only in a setting the name leaves out (lora_alpha, say) never share a folder; its probes'
        # keys name the model by the descriptive name and the run key (`upstream`), as the published keys do.
        name = unlearned_model_path(sweep.config, point, plan.unlearn_from)
        settings = planner.unlearn_settings(point, plan.unlearn_from, name)
        key = planner.run_key(point, settings, upstream)
        path = f"{name}-{key}"
        if settings.save.path:  # the folder is not part of the key
            settings = replace(settings, save=replace(settings.save, path=path))
        rtt = planner.rtt_jobs(path, point.dataset, "unlearned", upstream=key, seeds=[point.seed], point=point,
                               who=point.label, key_model=name) if run_rtt else []
        quant = planner.quant_jobs(path, point.dataset, "unlearned", key, point, point.label,
                                   key_model=name) if sweep.saves_models else []
        target = ProbeTarget(planner, path, point.dataset, key, point, point.label)
        probes = [job for probe in sweep.probes for job in PROBE_REGISTRY[probe].jobs(target)] if sweep.saves_models else []
        plan.runs.append(Run(planner.next_index(), point, plan.unlearn_from, path, tuple(rtt), settings, key,
                             sweep.results_dir, tuple(quant), probes=tuple(probes)))
    for dataset in sweep.datasets:
        if run_rtt and sweep.baseline_rtt:
            plan.baseline_rtt += planner.rtt_jobs(plan.unlearn_from, dataset, "baseline", upstream=upstream,
                                                  seeds=sweep.baseline_seeds, who="C")
        if run_rtt and sweep.never_taught_rtt and (plan.teach or dataset in FLOOR_DATASETS):
            # The floor: what RTT on T gives on V from a model that never knew V (once, for the first seed):
            # the model before teaching, or for pretraining facts RTT on their remapped twin.
            model, floor_data = (plan.base_model, dataset) if plan.teach else (plan.unlearn_from, FLOOR_DATASETS[dataset])
            plan.floor_rtt += planner.rtt_jobs(model, floor_data, "never_taught", upstream=model,
                                               seeds=sweep.slice_seeds if sweep.floor_every_seed else sweep.seeds[:1],
                                               who="floor")
        if sweep.saves_models and plan.runs:
            plan.reference_quant += planner.quant_jobs(plan.unlearn_from, dataset, "reference", upstream, None, "ref")


def mark_finished(plan: Plan, recorded: Mapping[str, Mapping[str, list[str]]], rerun: bool) -> None:
    """A job is finished when its row exists (and, for a run that saves a
    model its probes still need, the model folder carries its key)."""
    rows = {stage: recorded.get(stage, {}) for stage in TABLES}
    for i, run in enumerate(plan.runs):
        have_row = run.key in rows["unlearn"]
        probes_pending = [j for j in (*run.rtt, *run.quant, *run.probes) if j.key not in rows[j.stage]]
        model_ok = not run.model_needed or marker_key(run.model_path) == run.key
        if have_row and (model_ok or not probes_pending):
            plan.finished.add(run.key)
        plan.runs[i] = replace(run, replaces=tuple(rows["unlearn"].get(run.key, ())),
                               rtt=_with_earlier_rows(run.rtt, rows), quant=_with_earlier_rows(run.quant, rows),
                               probes=_with_earlier_rows(run.probes, rows))
    for job_list in (plan.baseline_rtt, plan.floor_rtt, plan.given_rtt, plan.reference_quant):
        job_list[:] = _with_earlier_rows(job_list, rows)
    for run in plan.runs:
        for job in (*run.rtt, *run.quant, *run.probes):
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


def ensure_sweep_dataset(sweep: SweepSettings, dataset: Datasets) -> None:
    ensure_dataset(sweep.data_root, dataset, sweep.random_bd, largest_k_shot(sweep.config),
                   sweep.allow_repeated_answers)


def only_ft_jobs(planner: Planner) -> list[RttJob]:
    """`only_ft`: RTT on given models, `ft_model_paths: [[path, DATASET], ...]`."""
    jobs: list[RttJob] = []
    for entry in planner.cfg["ft_model_paths"]:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ConfigError(f"ft_model_paths: {entry!r} is not allowed; use [model_path, DATASET] pairs")
        path, dataset = str(entry[0]), parse_enum(Datasets, entry[1], "ft_model_paths")
        if not (Path(path, "config.json").is_file() or adapter_base(path)):
            raise ConfigError(f"ft_model_paths: {path!r} is not a model folder (no config.json)")
        ensure_sweep_dataset(planner.sweep, dataset)
        jobs += planner.rtt_jobs(path, dataset, "given", upstream=path, seeds=planner.sweep.seeds[:1],
                                 who=model_name(path)[:24])
    if not jobs:
        raise ConfigError("only_ft=true needs ft_model_paths: [[model_path, DATASET], ...] and ft.num_splits > 0")
    return jobs
