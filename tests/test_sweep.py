"""Sweeps that survive: one failure stays one failure, a rerun finishes only
what is missing, a stale Ray cluster is ignored, every bad input is refused
in one line before any model loads, and progress stays readable in a log."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import (
    SMALL_DATA,
    assert_refused,
    config,
    pipeline_command,
    planned,
    rows,
    run_cli,
    run_sweep,
    smoketest_args,
)
from toolkit.planner import Plan

pytestmark = pytest.mark.usefixtures("ray_session")


def smoketest_plan(tiny, root, *extra) -> Plan:
    return planned(config(overrides=smoketest_args(tiny, root, *extra)[1:]))


def test_one_failing_run_stays_one_failure_and_a_rerun_finishes_only_what_is_missing(tiny_llama, tmp_path):
    args = smoketest_args(tiny_llama, tmp_path, "unlearn.lora_ranks=[1,2,4]", "ft.num_splits=1")
    rank2 = smoketest_plan(tiny_llama, tmp_path, "unlearn.lora_ranks=[1,2,4]", "ft.num_splits=1").runs[1]
    assert rank2.point.lora_rank == 2
    blocker = Path(rank2.model_path)  # a file where rank 2's checkpoint folder goes: saving it fails
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")

    first = run_sweep(args)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "sweep: 4 finished, 0 skipped (finished earlier), 1 failed, 1 not run (their unlearning failed)" in first.stdout
    assert f"failed: LORA r2 s0 unlearn ({rank2.model_path}): " in first.stdout
    failures = pd.read_csv(tmp_path / "evals" / "failures.csv")
    assert list(failures.stage) == ["unlearn"] and list(failures.run_key) == [rank2.key]
    assert sorted(rows(tmp_path, "unlearning").lora_rank) == [1, 4]
    assert sorted(rows(tmp_path, "ft").lora_rank) == [1, 4]  # the others' RTT ran

    blocker.unlink()
    second = run_sweep(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 job(s) finished earlier, skipped; 2 to run" in second.stdout
    assert "sweep: 2 finished, 4 skipped" in second.stdout
    unlearning, ft = rows(tmp_path, "unlearning"), rows(tmp_path, "ft")
    assert sorted(unlearning.lora_rank) == [1, 2, 4] and sorted(ft.lora_rank) == [1, 2, 4]
    assert unlearning.run_key.is_unique and ft.rtt_key.is_unique

    started = time.monotonic()
    third = run_sweep(args)
    assert third.returncode == 0 and "all 6 job(s) finished earlier; nothing to run" in third.stdout
    assert time.monotonic() - started < 30  # no Ray, no model: planning only

    stamps = {p.name for p in (tmp_path / "evals" / "unlearning").glob("*.csv")}
    forced = run_sweep([*args, "rerun=true"])
    assert forced.returncode == 0 and "sweep: 6 finished, 0 skipped" in forced.stdout
    assert len(rows(tmp_path, "unlearning")) == 3 and len(rows(tmp_path, "ft")) == 3  # replaced, not added
    assert not stamps & {p.name for p in (tmp_path / "evals" / "unlearning").glob("*.csv")}


def test_a_driver_killed_mid_sweep_and_rerun_leaves_no_duplicate_or_torn_rows(tiny_llama, tmp_path):
    args = smoketest_args(tiny_llama, tmp_path, "unlearn.lora_ranks=[1,2,4,8]", "ft.num_splits=2", "baseline_rtt=true")
    driver = subprocess.Popen(pipeline_command(args), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "evals" / "unlearning").glob("*.csv")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and every process it started
    driver.wait()
    done_before = len(list((tmp_path / "evals").rglob("*.csv")))
    assert 1 <= done_before < 4 + 8 + 2, "the kill came too late to test anything"

    again = run_sweep(args)
    assert again.returncode == 0, again.stderr[-3000:]
    unlearning, ft = rows(tmp_path, "unlearning"), rows(tmp_path, "ft")
    assert sorted(unlearning.lora_rank) == [1, 2, 4, 8] and unlearning.run_key.is_unique
    assert len(ft) == 4 * 2 + 2 and ft.rtt_key.is_unique  # 2 held-out splits per rank, and the baseline
    assert all(json.loads(v) for v in ft.forget_accs_local)  # whole rows, every one
    assert not list((tmp_path / "evals").rglob("*.tmp-*"))


def test_probes_of_flagged_runs_can_be_held_back_and_run_later(tiny_llama, tmp_path):
    """A retain floor of 1.0 flags every run at its first check: with
    probe_flagged_runs=false their RTT is not run, a rerun says so without
    starting anything, and switching it on runs just those probes."""
    args = smoketest_args(tiny_llama, tmp_path, "unlearn.lora_ranks=[1,2]", "ft.num_splits=1",
                      "unlearn.stop_at_forget_acc=0.0", "unlearn.stop_retain_floor=1.0")
    first = run_sweep([*args, "probe_flagged_runs=false"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert list(rows(tmp_path, "unlearning").stop_reason) == ["retain_floor"] * 2
    assert rows(tmp_path, "ft").empty
    assert "sweep: 2 finished, 0 skipped (finished earlier), 0 failed, 2 not run (probes of flagged runs" in first.stdout

    again = run_sweep([*args, "probe_flagged_runs=false"])
    assert again.returncode == 0 and "all 2 job(s) finished earlier; nothing to run" in again.stdout
    assert "2 probe(s) of flagged runs held back (probe_flagged_runs=false)" in again.stdout

    probed = run_sweep([*args, "probe_flagged_runs=true"])
    assert probed.returncode == 0, probed.stderr[-3000:]
    assert "sweep: 2 finished, 2 skipped (finished earlier)" in probed.stdout
    assert sorted(rows(tmp_path, "ft").lora_rank) == [1, 2] and len(rows(tmp_path, "unlearning")) == 2


def test_a_local_run_ignores_a_stale_ray_cluster_on_the_machine(tiny_llama, tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:6399")  # a `ray start --head` that died
    result = run_cli(smoketest_args(tiny_llama, tmp_path, "dont_ft=true"), cwd=tmp_path,
                     env={"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "127.0.0.1:6399"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(rows(tmp_path, "unlearning")) == 1


def test_progress_in_a_log_is_a_few_plain_lines_per_job(tiny_llama, tmp_path):
    result = run_cli(smoketest_args(tiny_llama, tmp_path, "unlearn.lora_ranks=[1,2]", "ft.num_splits=2",
                                "quant.bits=[4]"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = 2 + 2 * 2 + 2 + 1  # unlearning, RTT, quantization of each model and of the reference
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("[")]) == jobs  # one line per finished job
    assert len(lines) <= jobs + 12, "\n".join(lines)
    assert not any("pid=" in line or "repeated" in line or "Token authentication" in line for line in lines)


def test_a_finished_runs_probes_go_ahead_of_the_next_run_but_not_of_the_last(tiny_llama, tmp_path):
    """One task at a time: each run's RTT follows it, so whole rows arrive
    early rather than every RTT after the last unlearning run; the last run
    (the longest job left) goes ahead of the probes waiting then."""
    # one slot: each task takes both CPUs of the session's Ray instance
    result = run_sweep(smoketest_args(tiny_llama, tmp_path, "ray.cpus_per_task=2", "unlearn.lora_ranks=[1,2,4,8,16]",
                                  "ft.num_splits=1", "progress=lines"))
    assert result.returncode == 0, result.stderr[-3000:]
    done = [line.split("] ", 1)[1].split(":")[0] for line in result.stdout.splitlines() if line.startswith("[")]
    order = [label.split()[1] + (" unlearn" if "unlearn" in label else " rtt") for label in done]
    # ranks 8 and 16 are the last two rounds (one task at a time): they start before the probes waiting then
    assert order == ["r1 unlearn", "r1 rtt", "r2 unlearn", "r2 rtt", "r4 unlearn", "r8 unlearn", "r16 unlearn",
                     "r4 rtt", "r8 rtt", "r16 rtt"], done


# ---------------------------------------------------------------- every bad input, refused in one line


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, byte_level_tokenizer) -> Path:
    """A causal LM of another architecture: its projections are Conv1D, not Linear."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(byte_level_tokenizer),
                               n_positions=256)).save_pretrained(path)
    byte_level_tokenizer.save_pretrained(path)
    return path


BAD_INPUTS = [
    # empty sweep lists
    ("unlearn.lora_ranks=[]", "unlearn.lora_ranks: [] is not allowed; give at least one value"),
    ("seeds=[]", "seeds: [] is not allowed; give at least one value"),
    ("datasets=[]", "datasets: [] is not allowed"),
    ("unlearn.types=[]", "unlearn.types: [] is not allowed"),
    ("unlearn.types_config.LORA.datasets_config.RANDOM_BD_SAME_RETAIN.lrs=[]",
     "RANDOM_BD_SAME_RETAIN.lrs: [] is not allowed; give at least one value"),
    ("ft.lrs=[]", "ft.lrs: [] is not allowed"),
    # numbers outside their range
    ("unlearn.lora_alpha=-1", "unlearn.lora_alpha: -1 is not allowed; use null or a positive number"),
    ("unlearn.warmup_steps=-1", "unlearn.warmup_steps: -1 is not allowed; use integers >= 0"),
    ("unlearn.eval_every=0", "unlearn.eval_every: 0 is not allowed; use positive integers"),
    ("random_bd.facts_per_split=0", "random_bd.facts_per_split: 0 is not allowed; use positive integers"),
    ("unlearn.stop_at_forget_acc=1.5", "unlearn.stop_at_forget_acc: 1.5 is not allowed; use null, a number in [0, 1], or a "
                                       "list of such numbers"),
    ("unlearn.stop_check_every=0", "unlearn.stop_check_every: 0 is not allowed; use positive integers"),
    ("unlearn.stop_retain_floor=-0.1", "unlearn.stop_retain_floor: -0.1 is not allowed"),
    ("seeds=[-1]", "seeds: -1 is not allowed; use integers >= 0"),
    ("ray.max_retries=-2", "ray.max_retries: -2 is not allowed"),
    ("probe_flagged_runs=maybe", "probe_flagged_runs: 'maybe' is not allowed; use true or false"),
    # the model, its architecture, what a method cannot use
    ("model_id=/no/such/model", "model_id: '/no/such/model' is not allowed; use an embedded alias"),
    ("unlearn.lora_target_modules=[foo_proj]",
     "unlearn.lora_target_modules: ['foo_proj'] is not allowed; this llama model's modules that LoRA can target "
     "(linear and Conv1D layers) are"),
    ("GPT2", "is not allowed; this gpt2 model's modules that LoRA can target (linear and Conv1D layers) are "
             "['c_attn', 'c_fc', 'c_proj', 'lm_head']"),
    ("CORRUPT_WEIGHTS", "is not allowed; its weights file model.safetensors is damaged (Error while deserializing header: incomplete metadata"),
    ("unlearn.types=[CUT] unlearn.freeze_layers=[[0,1]]", "unlearn.freeze_layers: [[0, 1]] is not allowed with CUT"),
    ("unlearn.freeze_layers=[[0,9]]", "unlearn.freeze_layers: [[0, 9]] is not allowed; the model has 3 decoder layers"),
    # folders that cannot be written, a cluster that cannot be reached
    ("RESULTS_UNDER_A_FILE", "is a file, not a folder"),
    ("ray.address=127.0.0.1:9", "ray.address: '127.0.0.1:9' cannot be reached"),
    # a task no node can hold would wait for ever: refused before Ray starts any work
    ("ray.cpus_per_task=4096", "ray.cpus_per_task: 4096 is more than the "),
    ("teach.cpus=4096", "teach.cpus: a task of 4096 CPU(s) is more than any node of the Ray cluster has ("),
]


@pytest.mark.parametrize("override, message", BAD_INPUTS, ids=[o.split("=")[0] for o, _ in BAD_INPUTS])
def test_every_bad_input_is_refused_in_one_line_before_any_model_loads(override, message, tiny_llama, gpt2_folder,
                                                                        tmp_path):
    assert_refused(run_sweep(bad_input_args(override, tiny_llama, gpt2_folder, tmp_path)), message, tmp_path)


def test_a_bad_input_through_the_cli_exits_2_with_one_error_line(tiny_llama, gpt2_folder, tmp_path):
    override, message = BAD_INPUTS[0]
    assert_refused(run_cli(bad_input_args(override, tiny_llama, gpt2_folder, tmp_path), cwd=tmp_path, timeout=300),
                   message, tmp_path)


def bad_input_args(override, tiny_llama, gpt2_folder, tmp_path) -> list[str]:
    extra = override.split()
    if override == "GPT2":
        extra = [f"model_id={gpt2_folder}"]
    if override == "CORRUPT_WEIGHTS":  # a download cut short
        damaged = tmp_path / "damaged-llama"
        shutil.copytree(tiny_llama, damaged)
        weights = damaged / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        extra = [f"model_id={damaged}"]
    if override == "RESULTS_UNDER_A_FILE":
        (tmp_path / "a-file").write_text("")
        extra = [f"results_dir={tmp_path}/a-file/evals"]
    model = [a for a in extra if a.startswith("model_id=")] or [f"model_id={tiny_llama}"]
    rest = [a for a in extra if not a.startswith("model_id=") and not a.startswith("results_dir=")]
    results = [a for a in extra if a.startswith("results_dir=")] or [f"results_dir={tmp_path}/evals"]
    return ["--config-name=lora_smoketest", *model, *SMALL_DATA, *rest, *results,
            f"models_dir={tmp_path}/models", f"data_root={tmp_path}/data"]


def test_a_wait_for_a_task_no_live_node_can_run_ends_in_a_clear_error(ray_session):
    """The check before a wait covers the nodes at the start; a node that
    leaves mid-sweep is caught by the wait itself: a task that no live node
    can hold ends the wait with one clear line instead of a hang."""
    import ray

    from toolkit.resources import Resources, wait_for_one
    from toolkit.settings import ConfigError

    ref = ray.remote(num_cpus=4096)(lambda: 1).remote()  # Ray queues it: no node has 4096 CPUs
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError, match=r"ray: a task of 4096 CPU\(s\) is more than any node of the Ray "
                                              r"cluster has \(2 CPU/0 GPU\).*have left the cluster"):
            wait_for_one([ref], Resources(4096, 0), poll_s=0.2)
    finally:
        ray.cancel(ref, force=True)
    assert time.monotonic() - started < 10
    finished = ray.remote(num_cpus=1)(lambda: 7).remote()
    assert ray.get(wait_for_one([finished], Resources(1, 0), poll_s=0.2)) == 7


def test_lora_targets_auto_lets_another_family_through_the_checks(gpt2_folder, tmp_path):
    """The GPT-2 model the default Llama names refuse (above) passes every
    check before loading with unlearn.lora_target_modules=auto."""
    import pipeline
    from toolkit.model_checks import check_before_loading
    from toolkit.planner import build_plan

    args = bad_input_args("unlearn.lora_target_modules=auto", gpt2_folder, gpt2_folder, tmp_path)
    name = [a.split("=", 1)[1] for a in args if a.startswith("--config-name=")][0]
    sweep = pipeline.read_settings(config(name, [a for a in args if not a.startswith("--config-name=")]))
    plan = build_plan(sweep)
    check_before_loading(sweep, plan)
    assert plan.runs[0].settings.lora.lora_target_modules == "auto"
