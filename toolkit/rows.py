"""A finished job's result row: its settings, its measures and where it
ran (provenance), in the columns of the results schema (toolkit.results).
Built in the Ray worker that ran the job."""

from __future__ import annotations

from typing import TYPE_CHECKING

from toolkit.checkpoints import weights_digest
from toolkit.device import provenance, resolve_device_policy
from toolkit.evaluation import Evaluator
from toolkit.jobs import QuantJob, RttJob, Run

if TYPE_CHECKING:  # the stage modules import the toolkit, never the other way round
    from finetune_corpus import FinetuneResult
    from unlearn_corpus import UnlearnResult


def stop_columns(run: Run, result: UnlearnResult) -> dict:
    rule, stop = run.settings.stop, result.stop
    return {"stop_target": rule.stop_at_forget_acc, "stop_retain_floor": rule.stop_retain_floor,
            "stop_step": stop.step if stop else None, "stop_reached": stop.reached if stop else None,
            "stop_reason": stop.reason if stop else None, "stop_forget_acc": stop.forget_acc if stop else None,
            "stop_retain_acc": stop.retain_acc if stop else None,
            # how the checks counted: 0 = every question; else a random sample per file first (confidence 1 - alpha)
            "stop_check_sample": rule.stop_check_sample,
            "stop_check_alpha": rule.stop_check_alpha if rule.stop_check_sample else None}


def unlearning_row(run: Run, result: UnlearnResult) -> dict:
    point, settings = run.point, run.settings
    return {
        "model_path": run.model_path if result.save_name else "", "dataset": point.dataset,
        "unlearn_type": point.unlearn_type, "loss_type": point.loss_type, "lora_rank": point.lora_rank,
        "lr": point.lr, "epochs": point.epochs, "retain_coeff": point.retain_coeff,
        "steering_coeff": point.steering_coeff, "max_samples": point.max_samples,
        **({"sweep_axes": [k for k, _ in point.axes], **dict(point.axes)} if point.axes else {}),
        "forget_accs": result.forget_accs, "forget_accs_calibrated": result.forget_accs_calibrated,
        "retain_accs": result.retain_accs, "retain_accs_calibrated": result.retain_accs_calibrated,
        "forget_correct": result.forget_correct, "trainable_params": result.trainable_params,
        "base_model": run.base_model, "start_weights": weights_digest(run.base_model),
        "save_name": result.save_name, "save_format": result.save_format,
        "val_files": settings.evals.val_files, "scoring": settings.evals.scoring, "project_name": settings.train.wandb_project_name,
        "data_seed": point.seed, "seed": point.seed, "just_eval": settings.train.epochs == 0, "steps": result.steps,
        **stop_columns(run, result), "seconds": round(result.seconds, 1), "phase_seconds": result.phase_seconds,
        "run_key": run.key, **result.update,
        **provenance(resolve_device_policy(settings.train.device)),
    }


def rtt_row(job: RttJob, result: FinetuneResult) -> dict:
    lora = job.settings.lora
    return {
        "base_model": job.base_model, "condition": job.condition, "dataset": job.dataset,
        "unlearn_type": job.unlearn_type, "lora_rank": job.lora_rank, "loss_type": job.loss_type,
        "lr": job.lr, "epochs": job.epochs, "skip_split": job.skip_split,
        "train_files": job.train_files, "val_files": [job.val_file], "scoring": job.settings.evals.scoring,
        "forget_accs_local": result.forget_accs_local,
        "forget_accs_calibrated_local": result.forget_accs_calibrated_local,
        "retain_accs_local": result.retain_accs_local,
        "retain_accs_calibrated_local": result.retain_accs_calibrated_local,
        "forget_correct_local": result.forget_correct_local, "probe": job.probe,
        "attacker_rank": lora.lora_rank if lora else 0, "upstream_key": job.upstream,
        "rtt_key": job.key, "data_seed": job.seed, "seed": job.seed,
        **({"budget": job.settings.budget, "forget_accs_by_step": result.forget_accs_by_step,
            "forget_correct_by_step": result.forget_correct_by_step} if result.forget_accs_by_step else {}),
        **({"retain_accs_by_step": result.retain_accs_by_step} if result.retain_accs_by_step else {}),
        "project_name": job.settings.train.wandb_project_name, "seconds": round(result.seconds, 1),
        "phase_seconds": result.phase_seconds, **provenance(resolve_device_policy(job.settings.train.device)),
    }


def score_row(job: QuantJob, evaluator: Evaluator, probe: str, **columns) -> dict:
    """A row of the quant table: the model's forget (and retain) files
    scored under a probe (quantization, or a registered probe's transform)."""
    point = job.point
    return {
        "model_path": job.model_path, "condition": job.condition, "dataset": job.dataset, "probe": probe, **columns,
        "unlearn_type": point.unlearn_type if point else "", "lora_rank": point.lora_rank if point else 0,
        "seed": point.seed if point else None, "scoring": evaluator.mode, "forget_accs": evaluator.forget_log.accs,
        "forget_correct": evaluator.forget_log.correct, "retain_accs": evaluator.retain_log.accs,
        "upstream_key": job.upstream, "probe_key": job.key,
        **provenance(resolve_device_policy(job.train.device)),
    }


def quant_row(job: QuantJob, evaluator: Evaluator) -> dict:
    return score_row(job, evaluator, f"quant{job.bits}", bits=job.bits, blocksize=job.blocksize)
