"""A probe that scores a model's forget (and retain) files after a transform
of its weights: quantization, or a registered probe's own (tests/toy_probe.py).
Load, transform, score, and one row of the quant table."""

from __future__ import annotations

import math
from typing import Callable

from toolkit.device import resolve_device_policy
from toolkit.evaluation import Evaluator
from toolkit.jobs import JobReport, QuantJob
from toolkit.models import load_model, load_tokenizer
from toolkit.rows import score_row


def score_under(job: QuantJob, transform: Callable | None, probe: str, **columns) -> JobReport:
    """Score `job.model_path` after `transform(model)` (None: as saved, the
    pre-flight check); the row is written only where the job has a results folder."""
    policy = resolve_device_policy(job.train.device)
    tokenizer, model = load_tokenizer(job.model_path), load_model(job.model_path, policy)
    if transform is not None:
        transform(model)
    evaluator = Evaluator.build(tokenizer, job.evals, job.train.data_root, job.train.k_shot, job.train.val_batch_size,
                                policy, job.train.head_at_labels)
    forget, retain = evaluator(model, 0)
    scored = f"forget {forget:.2f}" + ("" if math.isnan(retain) else f", retain {retain:.2f}")
    row = score_row(job, evaluator, probe, **columns) if job.results_dir else None
    return JobReport(job.key, scored, forget, row=row)
