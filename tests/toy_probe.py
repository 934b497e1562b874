"""A probe added through the registry alone, from this file: one
`register_probe` call with its job builder and its runner (its measure in
the analysis and its place in the figure follow from its rows). Used by a
pipeline test as a plugin (`plugins=[toy_probe] probes=[noise]`): the
unlearned model scored after Gaussian noise of 1% of each linear weight's
spread, a perturbation probe (does a small random step bring answers back?)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from toolkit.data import fingerprint
from toolkit.datasets import DATASETS
from toolkit.jobs import QuantJob
from toolkit.probes import Probe, ProbeTarget, register_probe
from toolkit.score_probe import score_under
from toolkit.settings import key_settings

SCALE = 0.01


@dataclass(frozen=True)
class NoiseJob(QuantJob):
    """A quant-table job of its own type (the pipeline finds its runner by it)."""

    scale: float = SCALE


def noise_jobs(target: ProbeTarget) -> list[NoiseJob]:
    planner = target.planner
    evals = DATASETS[target.dataset].evals(False, scoring=planner.sweep.scoring)
    key = fingerprint("noise", SCALE, target.model_path, key_settings(evals), planner.data_key(target.dataset),
                      target.upstream)
    return [NoiseJob(planner.next_index(), target.model_path, target.dataset, "unlearned", None, evals,
                     planner.eval_settings(target.model_path, f"{target.label} noise"), key=key,
                     upstream=target.upstream, point=target.point, results_dir=planner.sweep.results_dir)]


def add_noise(model, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                weight = module.weight
                weight.add_(torch.randn(weight.shape, generator=generator) * scale * weight.float().std())


def run_noise(job: NoiseJob):
    return score_under(job, functools.partial(add_noise, scale=job.scale, seed=job.point.seed), "noise",
                       scale=job.scale)


register_probe("noise", Probe(jobs=noise_jobs, runner=run_noise, job_type=NoiseJob, marker="v"))
