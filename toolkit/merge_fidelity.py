"""The merge-fidelity probe, for users who follow the seed plan on a GPU:
there the LoRA update is merged into bf16 weights and saved as bf16, while
the study keeps fp32. A LoRA update here is 1-3% of a weight, about one
bf16 rounding step, so storing the merged model in 16 bits can round part
of the unlearning away. The probe scores the unlearned model after rounding
every weight to bf16 (`merge_bf16`) or fp16 (`merge_fp16`), as such a
checkpoint stores it; its measure, `merge_bf16_recovered` = (probe - A) /
(base - A), is the share of the forgetting the rounding undoes. Two rows
of the probe registry (toolkit.probes); run with `probes=[merge_bf16,merge_fp16]`."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from toolkit.data import fingerprint
from toolkit.datasets import DATASETS
from toolkit.jobs import QuantJob
from toolkit.probes import Probe, ProbeTarget, register_probe
from toolkit.settings import key_settings

CAST_PROBES = {"merge_bf16": "bfloat16", "merge_fp16": "float16"}


@dataclass(frozen=True)
class CastJob(QuantJob):
    """Score a model with its weights rounded to `dtype` (a quant-table row named `probe`)."""

    probe: str = "merge_bf16"
    dtype: str = "bfloat16"


def cast_jobs(probe: str, target: ProbeTarget) -> list[CastJob]:
    planner, dtype = target.planner, CAST_PROBES[probe]
    evals = DATASETS[target.dataset].evals(False, scoring=planner.sweep.scoring)
    key = fingerprint("cast", dtype, key_settings(evals), planner.data_key(target.dataset), target.upstream)
    return [CastJob(planner.next_index(), target.model_path, target.dataset, "unlearned", None, evals,
                    planner.eval_settings(target.model_path, f"{target.label} {probe}"), key=key,
                    upstream=target.upstream, point=target.point, results_dir=planner.sweep.results_dir,
                    probe=probe, dtype=dtype)]


def round_weights(model, dtype: str) -> None:
    """Every parameter rounded to `dtype` and back: what a checkpoint saved in `dtype` holds."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(getattr(torch, dtype)).to(param.dtype))


def run_cast(job: CastJob):
    from toolkit.score_probe import score_under  # torch: only in the worker

    return score_under(job, functools.partial(round_weights, dtype=job.dtype), job.probe, cast_dtype=job.dtype)


for _name, _marker in zip(CAST_PROBES, ("1", "2")):
    register_probe(_name, Probe(jobs=functools.partial(cast_jobs, _name), runner=run_cast, job_type=CastJob,
                                marker=_marker))
