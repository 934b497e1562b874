"""Unlearn a model, then test whether the knowledge is really gone.

`python pipeline.py --config-name=NAME key=value ...` (Hydra). The driver
reads the sweep's settings and plans and checks the whole sweep before any
model loads (toolkit.sweep_settings, toolkit.planner, toolkit.checks), then
runs it as Ray tasks: teaching (cached), a pre-flight check, one unlearning
task per grid point, and after each the probes of its model: RTT on every
held-out split, the adapter-relearning RTT and the quantization probe.
Every finished job writes its own CSV row under `results_dir`; a rerun skips
what is finished; a failing job is recorded and the others go on.

Reading order: what each job does -> Ray -> the sweep -> the driver.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import socket
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import hydra
import ray
from omegaconf import DictConfig, OmegaConf

import finetune_corpus
import rmu.unlearn_pipeline  # noqa: F401 - registers CUT
import toolkit.merge_fidelity  # noqa: F401 - registers the merge-fidelity probes
import unlearn_corpus
from toolkit.cluster import check_reachable, check_shared_storage, start_ray
from toolkit.data import DataValidationError
from toolkit.device import resolve_device_policy
from toolkit.evaluation import mean_by_epoch
from toolkit.grid import get_log_range
from toolkit.jobs import JobReport, QuantJob, RttJob, Run, TeachJob, write_marker
from toolkit.model_checks import check_before_loading
from toolkit.models import resolve_model_path
from toolkit.planner import Plan, build_plan
from toolkit.probes import runner_for
from toolkit.quantize import quantize_weights
from toolkit.registry import METHODS
from toolkit.resources import Resources, check_fits, live_nodes, task_resources, wait_for_one
from toolkit.results import FAILURES, drop_superseded_rows, write_failures, write_row
from toolkit.rows import rtt_row, unlearning_row
from toolkit.score_probe import score_under
from toolkit.settings import NAMES, PROGRESS_MODES, ConfigError, first_line
from toolkit.sweep_settings import SweepSettings, resolve_progress

log = logging.getLogger("pipeline")

if not OmegaConf.has_resolver("get_log_range"):
    OmegaConf.register_new_resolver("get_log_range", get_log_range)


# --------------------------------------------------------------------------
# What each job does (in a Ray worker): train or score, then write its row
# --------------------------------------------------------------------------


def last_epoch(by_epoch: Mapping) -> Any:
    return by_epoch[max(by_epoch)] if by_epoch else float("nan")


def run_unlearning(run: Run) -> JobReport:
    result = unlearn_corpus.unlearn(run.settings, METHODS[run.point.unlearn_type].objective(run.settings))
    if result.save_name:
        write_marker(result.save_name, run.key)
    forget = mean_by_epoch(result.forget_accs)
    stop = f", stopped at step {result.stop.step} ({result.stop.reason})" if result.stop else ""
    return JobReport(run.key, f"forget {forget.get(0, float('nan')):.2f} -> {last_epoch(forget):.2f}{stop}",
                     last_epoch(forget), flagged=bool(result.stop and not result.stop.reached),
                     row=unlearning_row(run, result))


def run_rtt(job: RttJob) -> JobReport:
    result = finetune_corpus.finetune(job.settings)
    accs = result.forget_accs_local
    return JobReport(job.key, f"V {accs.get(0, float('nan')):.2f} -> {last_epoch(accs):.2f}", last_epoch(accs),
                     row=rtt_row(job, result))


def run_quant(job: QuantJob) -> JobReport:
    """Score a model's forget and retain files, its linear weights rounded to
    `bits` bits first (none: a plain evaluation, the pre-flight check)."""
    if job.bits is None:
        return score_under(job, None, "")
    return score_under(job, functools.partial(quantize_weights, bits=job.bits, blocksize=job.blocksize),
                       f"quant{job.bits}", bits=job.bits, blocksize=job.blocksize)


def run_teach(job: TeachJob) -> JobReport:
    result = finetune_corpus.finetune(job.settings)
    accs = result.forget_accs_local
    return JobReport(job.key, f"taught: forget {accs.get(0, float('nan')):.2f} -> {last_epoch(accs):.2f}",
                     last_epoch(accs))


RUNNERS = {Run: run_unlearning, RttJob: run_rtt, QuantJob: run_quant, TeachJob: run_teach}


def runner_of(job) -> Callable:
    """The runner of a job: the pipeline's own, or the one its probe registered (toolkit.probes)."""
    return RUNNERS.get(type(job)) or runner_for(type(job))


# --------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------


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
def perform(job, progress: str, plugins: Sequence[str] = (), origin: str | None = None) -> JobReport:
    """Every Ray task: one job, run in the driver's working directory
    (`origin`) so that relative paths mean what they mean to the driver; its
    row comes back with the report and the driver writes it."""
    configure_logging(progress)
    import_plugins(plugins)
    use_assigned_cpus()
    with working_directory(origin):
        report = runner_of(job)(job)
    node = ray.get_runtime_context().get_node_id()
    return replace(report, node=node, row=None if report.row is None else {**report.row, "ray_node": node})


@contextlib.contextmanager
def working_directory(path: str | None):
    """Run in `path` (the driver's directory, on shared storage), then return."""
    if not path:
        yield
        return
    if not Path(path).is_dir():
        raise FileNotFoundError(f"the driver's directory {path} does not exist on node {socket.gethostname()}; "
                                "run the sweep from a folder on storage every node shares")
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


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
    """Modules that register methods (one registry row and an objective each)."""
    import importlib

    for module in NAMES.check(modules or [], "plugins"):
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - whatever the module raises, the setting is at fault
            raise ConfigError(f"plugins: {module!r} cannot be imported ({type(err).__name__}: {first_line(err)}); "
                              "name a module on the Python path (PYTHONPATH) that registers methods (toolkit.registry.register)") \
                from None


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
    sweep: SweepSettings
    finished: list = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    not_run: list = field(default_factory=list)
    skipped_flagged: list = field(default_factory=list)  # probes of flagged runs (probe_flagged_runs=false)

    def options(self) -> dict:
        return {**self.resources.options(), "max_retries": self.sweep.ray.max_retries, "retry_exceptions": False}

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

        bar = SweepProgress(self.sweep.progress, len(pending), len(self.plan.jobs()) - len(pending) - len(self.skipped_flagged))
        fill()
        while refs:
            done = wait_for_one(list(refs), self.resources)
            job = refs.pop(done)
            try:
                report = ray.get(done)
            except Exception as err:  # noqa: BLE001 - one failure stays one failure
                failure = self.record_failure(job, err)
                blocked = waiting.pop(job.key, [])
                self.not_run += [(dependent, job) for dependent in blocked]
                bar.update(job, f"FAILED {failure.error_type}: {failure.error}", 1 + len(blocked))
                fill()
                continue
            if report.row is not None:  # the driver writes every row: workers need no shared results folder
                write_row(job.results_dir, job.stage, job.index, report.row, job.replaces)
            self.finished.append((job, report))
            dependents = waiting.pop(job.key, [])
            if not self.sweep.probe_flagged_runs and report.flagged and dependents:
                self.skipped_flagged += dependents
                bar.update(job, f"{report.summary}; flagged, so its {len(dependents)} probe(s) are skipped "
                                "(probe_flagged_runs=false)", 1 + len(dependents))
            else:
                bar.update(job, report.summary)
                queue.probes.extend(dependents)
            fill()
        bar.close()

    def submit(self, job):
        return perform.options(**self.options(), name=job.label[:40]).remote(job, self.sweep.progress, self.sweep.plugins,
                                                                             os.getcwd())

    def record_failure(self, job, err: BaseException) -> Failure:
        """Keep the failure (failures.csv and its full traceback beside the results)."""
        error_type, line, detail = describe_error(err)
        failure = Failure(job, error_type, line, detail)
        self.failed.append(failure)
        write_failures(self.sweep.results_dir, [f.row() for f in self.failed], f"{job.stage}-{job.key}", detail)
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
        where = f"results: {self.sweep.results_dir}"
        if self.failed:
            where += f" (failures: {Path(self.sweep.results_dir) / FAILURES}; rerun the same command to retry them)"
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
# The driver: settings, plan, checks, teach, pre-flight, sweep, summary
# --------------------------------------------------------------------------


def plain(cfg: Mapping | DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def read_settings(cfg: Mapping | DictConfig) -> SweepSettings:
    """The sweep's settings, once, after the plugins that may add methods."""
    config = plain(cfg)
    import_plugins(config["plugins"])
    return SweepSettings.read(config)


def run_one(job, resources: Resources, sweep: SweepSettings):
    ref = perform.options(**resources.options()).remote(job, sweep.progress, sweep.plugins, os.getcwd())
    return ray.get(wait_for_one([ref], resources))


def preflight(sweep: SweepSettings, plan: Plan, resources: Resources) -> None:
    """Refuse to "unlearn" facts the model never knew."""
    threshold = sweep.preflight_min_forget_acc
    for job in plan.preflight if plan.pending() else []:
        acc = run_one(job, resources, sweep).value
        log.info("preflight: %s knows %.3f of %s's forget facts (%s scoring)", plan.unlearn_from, acc, job.dataset.name,
                 sweep.scoring)
        if acc < threshold:
            raise ConfigError(f"preflight: {plan.unlearn_from} answers only {acc:.3f} of {job.dataset.name}'s forget "
                              f"questions under {sweep.scoring} scoring (preflight.min_forget_acc={threshold}); teach it "
                              "first (teach.enabled=true), score another way (scoring=choice) or lower the threshold")


def execute(cfg: DictConfig | Mapping) -> Sweep | None:
    """Check everything, then: base model, teach (cached), pre-flight, sweep."""
    sweep = read_settings(cfg)
    plan = build_plan(sweep)
    check_before_loading(sweep, plan)
    if not plan.pending():
        held = len(plan.held_back_jobs())
        print(f"sweep: all {len(plan.jobs()) - held} job(s) finished earlier; nothing to run "
              f"(rerun=true runs them again)"
              + (f"; {held} probe(s) of flagged runs held back (probe_flagged_runs=false)" if held else "")
              + f". results: {sweep.results_dir}", flush=True)
        return None
    if sweep.ray.address:
        check_reachable(sweep.ray.address)  # refused in seconds, even where this process already runs Ray
    start_ray(sweep.ray, sweep.progress)
    if sweep.ray.address:
        nodes = check_shared_storage(os.getcwd(), sweep.data_root, sweep.models_dir)
        print(f"ray: {nodes} node(s) share this folder, {sweep.data_root} and {sweep.models_dir}", flush=True)
    node_resources = live_nodes()
    resources = task_resources(sweep.ray.cpus_per_task, sweep.ray.gpus_per_task, node_resources)
    if sweep.teach_cpus:  # a bad value whether or not this sweep teaches
        check_fits(sweep.teach_cpus, resources.num_gpus, node_resources, "teach.cpus")
    resolve_model_path(sweep.model_id, sweep.models_dir)
    if plan.teach and not Path(plan.teach.model_path, "config.json").is_file():
        print(f"teaching {plan.base_model} the facts of {plan.teach.dataset.name} -> {plan.teach.model_path}",
              flush=True)
        # One task alone: it may take more CPUs than a sweep task (teach.cpus).
        teach_resources = replace(resources, num_cpus=float(sweep.teach_cpus or resources.num_cpus))
        report = run_one(plan.teach, teach_resources, sweep)
        print(f"teach: {report.summary}", flush=True)
    preflight(sweep, plan, resources)
    runner = Sweep(plan, resources, sweep)
    policy = resolve_device_policy(sweep.device)
    # The numeric path is part of every key: a slice on another path runs other jobs than the published ones.
    print(f"numeric path: {policy.device}, {str(policy.dtype).removeprefix('torch.')} weights, bf16 autocast "
          f"{'on' if policy.autocast_dtype is not None else 'off'}", flush=True)
    print(f"sweep: {len(plan.runs)} unlearning run(s), {plan.rtt_count()} RTT run(s), "
          f"{sum(len(r.quant) for r in plan.runs) + len(plan.reference_quant)} quantization probe(s)"
          + (f", {others} other probe(s)" if (others := sum(len(r.probes) for r in plan.runs)) else "") + "; "
          f"{len(plan.pending())} job(s) to run", flush=True)
    runner.run()
    drop_superseded_rows(sweep.results_dir)
    return runner


def drive(cfg: DictConfig | Mapping) -> int:
    """The whole command on a composed config: 0 when every job finished, 1
    when one failed, 2 when the input was refused (one `error:` line on
    stderr, before any model loads). Ray is shut down only if this call
    started it (tests share one instance across sweeps)."""
    config = plain(cfg)
    progress = resolve_progress(config.get("progress", "auto")) if config.get("progress") in PROGRESS_MODES else "lines"
    configure_logging(progress)
    ray_was_up = ray.is_initialized()

    def stop_ray() -> None:
        # Before the error line: workers' forwarded output must not land after it.
        if not ray_was_up:
            ray.shutdown()

    try:
        runner = execute(config)
    except (ConfigError, DataValidationError) as err:
        stop_ray()
        sys.stdout.flush()
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except ray.exceptions.RayError as err:
        error_type, line, _ = describe_error(err)
        stop_ray()
        print(f"error: {error_type}: {line}", file=sys.stderr, flush=True)
        return 1
    if runner is None:
        return 0
    summary = runner.summary()
    stop_ray()
    print(summary, flush=True)
    return 1 if runner.failed else 0


@hydra.main(version_base=None, config_path=str(Path(__file__).resolve().parent / "conf"), config_name="default")
def run_pipeline(cfg: DictConfig) -> None:
    code = drive(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    run_pipeline()
