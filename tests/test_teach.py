"""Teach stage (cached) and the pre-flight check that refuses to unlearn unknown facts."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import SMALL_DATA, config, planned, run_sweep


def test_taught_model_is_keyed_by_what_decides_it(tmp_path):
    base = [f"data_root={tmp_path}/data", f"models_dir={tmp_path}/m", "model_id=/x/tiny", "teach.enabled=true",
            *SMALL_DATA]
    plan = planned(config(overrides=base))
    again = planned(config(overrides=base))
    other_lr = planned(config(overrides=[*base, "teach.lr=3e-4"]))
    assert plan.teach and plan.teach.model_path == again.teach.model_path
    assert other_lr.teach.model_path != plan.teach.model_path
    assert plan.teach.model_path.startswith(f"{tmp_path}/m/taught/tiny-RANDOM_BD_ALL_SPLITS-")
    assert plan.unlearn_from == plan.teach.model_path
    assert {run.base_model for run in plan.runs} == {plan.teach.model_path}
    assert {job.base_model for job in plan.baseline_rtt} == set()  # smoketest: baseline_rtt=false
    no_teach = planned(config(overrides=[*base, "teach.enabled=false"]))
    assert no_teach.teach is None and no_teach.unlearn_from == "/x/tiny"


@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_preflight_refuses_a_model_that_does_not_know_the_facts(tiny_llama, tmp_path, ray_session, scoring):
    """The refusal names the scoring mode and the accuracy under it."""
    result = run_sweep(["--config-name=lora_smoketest", f"model_id={tiny_llama}", f"data_root={tmp_path}/data",
                      f"models_dir={tmp_path}/models", f"results_dir={tmp_path}/evals", "ray.num_cpus=2",
                      "preflight.min_forget_acc=0.9", f"scoring={scoring}", *SMALL_DATA])
    assert result.returncode == 2, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: preflight:") and " answers only 0." in last
    assert f"forget questions under {scoring} scoring (preflight.min_forget_acc=0.9)" in last
    assert "teach it first" in last
    assert not (tmp_path / "evals").exists() and not (tmp_path / "models" / "LORA").exists()


def test_teach_runs_once_and_is_reused(tiny_llama, tmp_path, ray_session):
    args = ["--config-name=lora_smoketest", f"model_id={tiny_llama}", f"data_root={tmp_path}/data",
            f"models_dir={tmp_path}/models", f"results_dir={tmp_path}/evals", "ray.num_cpus=2", "dont_ft=true",
            "teach.enabled=true", "teach.epochs=1", "teach.batch_size=8", *SMALL_DATA]
    first = run_sweep(args)
    assert first.returncode == 0, first.stderr[-3000:]
    taught = list((tmp_path / "models" / "taught").iterdir())
    assert len(taught) == 1 and (taught[0] / "model.safetensors").is_file()
    stamp = (taught[0] / "model.safetensors").stat().st_mtime_ns
    assert "teaching" in first.stderr + first.stdout
    second = run_sweep(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "teaching" not in second.stderr + second.stdout
    assert (taught[0] / "model.safetensors").stat().st_mtime_ns == stamp
    rows = pd.concat([pd.read_csv(p) for p in (tmp_path / "evals" / "unlearning").glob("*.csv")])
    assert len(rows) == 1 and set(rows.base_model) == {str(taught[0])}  # the rerun resumed: nothing twice
    assert not (tmp_path / "evals" / "ft").exists()  # dont_ft
