"""pipeline.py: configuration, grid, validation, resources, results, end to end."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline
from conftest import (
    PAPER_DATA,
    ROOT,
    assert_refused,
    config,
    made_up_facts,
    planned,
    run_cli,
    run_sweep,
    smoketest_args,
    sweep_frames,
)
from rmu import unlearn_pipeline
from toolkit.data import DataValidationError, load_mcq, missing_files
from toolkit.datasets import DATASETS
from toolkit.device import cpu_features, cpu_model
from toolkit.facts import write_random_bd_dataset
from toolkit.grid import GridPoint, dataset_grid, get_log_range, unlearned_model_path
from toolkit.names import Datasets, LossType, UnlearnType
from toolkit.results import drop_superseded_rows, read_rows, recorded_rows, write_result_csv, write_row
from toolkit.rows import unlearning_row
from toolkit.settings import ConfigError
from unlearn_corpus import CorpusUnlearning, UnlearnResult


def test_get_log_range():
    assert get_log_range(1e-3, 1e3, 10) == pytest.approx([1e-3, 1e-2, 1e-1, 1, 10, 100])
    assert get_log_range(1, 10, 2) == [1, 2, 4, 8]


def test_default_config_resolves_the_paper_grid():
    cfg = config("default")
    gd = dataset_grid(pipeline.plain(cfg), UnlearnType.GD, Datasets.MMLU)
    assert sorted({p.retain_coeff for p in gd}) == pytest.approx([1e-3, 1e-2, 1e-1, 1, 10, 100])


def test_grid_adds_ranks_only_for_lora_and_scs_only_for_cut():
    cfg = config("default", ["unlearn.lora_ranks=[1,2,4]", "unlearn.cut_scs=[5,20]"])
    gd = dataset_grid(pipeline.plain(cfg), UnlearnType.GD, Datasets.RANDOM_BD_SAME_RETAIN)
    lora = dataset_grid(pipeline.plain(cfg), UnlearnType.LORA, Datasets.RANDOM_BD_SAME_RETAIN)
    cut = dataset_grid(pipeline.plain(cfg), UnlearnType.CUT, Datasets.RANDOM_BD_SAME_RETAIN)
    assert {p.lora_rank for p in gd} == {0} and {p.steering_coeff for p in gd} == {None}
    assert {p.lora_rank for p in lora} == {1, 2, 4} and {p.steering_coeff for p in lora} == {None}
    assert {p.steering_coeff for p in cut} == {5.0, 20.0} and {p.lora_rank for p in cut} == {0}
    lora_cfg = cfg.unlearn.types_config.LORA.datasets_config.RANDOM_BD_SAME_RETAIN
    per_rank = len(lora_cfg.lrs) * len(lora_cfg.epochs_lst) * len(get_log_range(*[1e-1, 1e2, 10]))
    assert len(lora) == 3 * per_rank


def test_model_path_names_the_rank():
    cfg = config(overrides=["models_dir=m", "wandb_project_name=p"])
    point = GridPoint(UnlearnType.LORA, Datasets.RANDOM_BD_SAME_RETAIN, LossType.CORPUS, 1e-4, 2, 1.0, 32, None, 8)
    assert unlearned_model_path(pipeline.plain(cfg), point, "/x/tiny") == \
        "m/LORA/RANDOM_BD_SAME_RETAIN/p/rank8-scnone-tiny-rc1.0-lr0.0001-epochs2-seed0"
    seeded = GridPoint(UnlearnType.LORA, Datasets.RANDOM_BD_SAME_RETAIN, LossType.CORPUS, 1e-4, 2, 1.0, 32, None, 8, 3)
    assert unlearned_model_path(pipeline.plain(cfg), seeded, "/x/tiny").endswith("-epochs2-seed3")


def test_lora_routes_to_gradient_difference_with_rank(tmp_path, shared_data):
    cfg = config(overrides=[f"data_root={shared_data}", PAPER_DATA, f"models_dir={tmp_path}", "model_id=/x/tiny"])
    plan = planned(cfg)
    run = plan.runs[0]
    objective = pipeline.METHODS[UnlearnType.LORA].objective(run.settings)
    # LoRA is the GD objective (ascent on the forget corpus) with LoRA settings of rank r.
    assert isinstance(objective, CorpusUnlearning) and objective.forget_sign == -1.0
    assert pipeline.METHODS[UnlearnType.GD].objective(run.settings).forget_sign == -1.0
    assert run.settings.lora.lora_rank == 4
    assert run.settings.save.path == run.model_path and run.settings.train.model == "/x/tiny"
    assert pipeline.METHODS[UnlearnType.CUT].objective is unlearn_pipeline.RmuObjective


def test_baseline_rtt_runs_once_per_dataset_and_setting(tmp_path, shared_data):
    cfg = config(overrides=[f"data_root={shared_data}", PAPER_DATA, f"models_dir={tmp_path}/m", f"results_dir={tmp_path}/r",
                            "model_id=/x/tiny", "baseline_rtt=true", "unlearn.lora_ranks=[1,2,4]",
                            "ft.num_splits=2", "ft.lrs=[1e-6,2e-6]"])
    plan = planned(cfg)
    assert len(plan.runs) == 3
    assert all(len(run.rtt) == 4 for run in plan.runs)  # 2 lrs x 2 held-out splits per rank
    assert len(plan.baseline_rtt) == 4  # not 4 x 3 ranks
    assert {j.base_model for j in plan.baseline_rtt} == {"/x/tiny"}
    assert len({j.index for run in plan.runs for j in run.rtt} | {j.index for j in plan.baseline_rtt}) == 16
    # A recorded baseline run is not run again.
    job = plan.baseline_rtt[0]
    write_result_csv(Path(tmp_path, "r", "ft"), 0, {"rtt_key": job.key, "condition": "baseline"})
    again = planned(cfg)
    assert len(again.pending_baseline_rtt) == 3 and job.key not in {j.key for j in again.pending_baseline_rtt}


BAD_VALUES = [
    ("scoring=logits", "scoring: 'logits' is not allowed; use one of letter, choice, choice_norm"),
    ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing: 'maybe' is not allowed; use true or false"),
    ("train.head_at_labels=sometimes", "train.head_at_labels: 'sometimes' is not allowed; use true or false"),
    ("train.lion_update=fast", "train.lion_update: 'fast' is not allowed; use one of auto, library, lean, compiled"),
    ("+train.pack=true", "train.pack is not a setting; the train section holds gradient_checkpointing, head_at_labels"),
    ("unlearn.stop_check_sample=-2", "unlearn.stop_check_sample: -2 is not allowed; use integers >= 0"),
    ("unlearn.stop_check_alpha=0", "unlearn.stop_check_alpha: 0 is not allowed; use a number in (0, 1)"),
    ("unlearn.types=[FOO]", "unlearn.types: 'FOO' is not allowed; use one of GD, WHP, FWF, LORA, CUT"),
    ("datasets=[NOPE]", "datasets: 'NOPE' is not allowed; use one of YEARS_MMLU_RETAIN"),
    ("unlearn.lora_ranks=[-4]", "unlearn.lora_ranks: -4 is not allowed; use positive integers"),
    ("unlearn.lora_ranks=[0]", "unlearn.lora_ranks: 0 is not allowed"),
    ("ft.num_splits=7", "ft.num_splits: 7 is more than the 5 val files of RANDOM_BD_SAME_RETAIN"),
    ("ft.num_splits=0", "ft.num_splits: 0 is not allowed; use a positive integer (to run no RTT, set dont_ft=true)"),
    ("device.device=cuda", "CUDA is not available"),
    ("wandb_mode=maybe", "wandb_mode: 'maybe' is not allowed"),
    ("+unlearn.types_config.LORA.datasets_config.RANDOM_BD_SAME_RETAIN.by_rank={4: {lrs: [-1e-3]}}",
     "RANDOM_BD_SAME_RETAIN.by_rank.4.lrs: -0.001 is not allowed; use positive numbers"),
    ("baseline_rtt_seeds=[7]", "baseline_rtt_seeds: [7] is not allowed; use seeds from seeds ([0])"),
    ("slice=[]", "slice: [] is not allowed; give at least one value"),
    ("slice=[3]", "slice: [3] is not allowed; use seeds from seeds ([0])"),
    # a list that names runs gives each value once (seeds always did)
    ("unlearn.lora_ranks=[4,4]", "unlearn.lora_ranks: [4, 4] is not allowed; give each value once (4 is given 2 times)"),
    ("seeds=[0,0]", "seeds: [0, 0] is not allowed; give each value once"),
    ("ft.lrs=[1e-5,0.00001]", "ft.lrs: [1e-05, 1e-05] is not allowed; give each value once"),
    ("ft.epochs_lst=[2,3,2]", "ft.epochs_lst: [2, 3, 2] is not allowed; give each value once (2 is given 2 times)"),
    ("unlearn.types_config.LORA.datasets_config.RANDOM_BD_SAME_RETAIN.rcs.add=[7,7.0]",
     "is not allowed; give each value once (7.0 is given 2 times)"),
    ("unlearn.types=[LORA,LORA]", "unlearn.types: ['LORA', 'LORA'] is not allowed; give each value once"),
    ("ft.loss_types=[QUESTION_LETTER_ANSWER,QUESTION_LETTER_ANSWER]", "ft.loss_types: ['QUESTION_LETTER_ANSWER', "),
    ("quant.bits=[4,4]", "quant.bits: [4, 4] is not allowed; give each value once"),
    # a resource no node can give
    ("ray.gpus_per_task=-1", "ray.gpus_per_task: -1 is not allowed; use auto or a number of GPUs >= 0"),
    ("probes=[nope]", "probes: 'nope' is not allowed; use a registered probe (merge_bf16, merge_fp16) or one that a "
                      "module named in plugins registers"),
    ("plugins=[no_such_plugin_module]", "plugins: 'no_such_plugin_module' cannot be imported (ModuleNotFoundError: "
                                        "No module named 'no_such_plugin_module')"),
    ("plugins=[broken_plugin]", "plugins: 'broken_plugin' cannot be imported (RuntimeError: "
                                "this plugin fails on import)"),
]


def smoketest_refusal_args(override, root: Path) -> list[str]:
    return ["--config-name=lora_smoketest", *([override] if override else []), f"models_dir={root}/models",
            f"data_root={root}/data", f"results_dir={root}/evals"]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o.split("=")[0] + o[-8:] for o, _ in BAD_VALUES])
def test_bad_values_are_refused_in_one_line_before_any_model_loads(override, message, tmp_path, monkeypatch):
    if override == "device.device=cuda" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    if override == "plugins=[broken_plugin]":
        (tmp_path / "plugins").mkdir()
        (tmp_path / "plugins" / "broken_plugin.py").write_text("raise RuntimeError('this plugin fails on import')\n")
        monkeypatch.syspath_prepend(tmp_path / "plugins")  # undone after the test, unlike a bare sys.path insert
    assert_refused(run_sweep(smoketest_refusal_args(override, tmp_path)), message, tmp_path)


@pytest.mark.parametrize("override, message", [BAD_VALUES[0], BAD_VALUES[-2]], ids=["unknown-method", "plugin"])
def test_a_refusal_through_the_cli_exits_2_with_one_error_line(override, message, tmp_path):
    """The exit-status contract of a real process (Hydra's own composition
    included): a plugin that does not import is no Hydra traceback."""
    result = run_cli(smoketest_refusal_args(override, tmp_path), cwd=tmp_path, timeout=120)
    assert_refused(result, message, tmp_path)
    assert "Traceback" not in result.stderr


def test_missing_paper_files_are_named(tmp_path):
    cfg = config(overrides=[f"data_root={tmp_path}", "datasets=[YEARS_MMLU_RETAIN]", "model_id=/x/tiny",
                            "unlearn.types_config.LORA.datasets_config.YEARS_MMLU_RETAIN.lrs=[1e-4]"])
    with pytest.raises(DataValidationError, match="YEARS_MMLU_RETAIN is missing 32 file.*dates-years-trimmed/corpus_split_0.jsonl"):
        planned(cfg)


MALFORMED_ROWS = [
    ("split_3", '{"question": "When?", "choices": ["1", "2", "3", "4"], "answer": 7}',
     "random_bd/split_3.jsonl:2: 'answer' must be an integer 0..3, got 7"),
    ("corpus_split_6", '{"text": "unterminated', "random_bd/corpus_split_6.jsonl:2: not valid JSON"),
    ("dev", '{"text": "a corpus row where questions belong"}', "random_bd/dev.jsonl:2: 'question' must be a non-empty "
                                                               "string"),
    # a choice left empty, the right answer listed twice, a JSON boolean for the answer, a row that is a list
    ("split_1", '{"question": "When?", "choices": ["1990", "", "1991", "1992"], "answer": 0}',
     "random_bd/split_1.jsonl:2: 'choices' must be non-empty strings or whole numbers, got '' in ['1990', '', "),
    ("split_2", '{"question": "When?", "choices": ["1990", "1991", "1990", "1992"], "answer": 0}',
     "random_bd/split_2.jsonl:2: 'choices' lists the right answer '1990' 2 times (A, C), so a model that picks its "
     "twin is scored wrong; fix the row, or set allow_repeated_answers=true"),
    ("split_4", '{"question": "When?", "choices": ["1990", "1991", "1993", "1992"], "answer": true}',
     "random_bd/split_4.jsonl:2: 'answer' must be an integer 0..3, got true"),
    ("corpus_split_1", '{"text": "  "}', "random_bd/corpus_split_1.jsonl:2: corpus rows need a non-empty string 'text' "
                                         "field, got \"  \""),
    ("split_5", '["When?", ["1990", "1991", "1993", "1992"], 0]',
     "random_bd/split_5.jsonl:2: a row must be a JSON object ({...}), got a list"),
    ("split_8", b'{"question": "When was Ren\xe9 born?", "choices": ["1", "2", "3", "4"], "answer": 0}',
     "random_bd/split_8.jsonl:2: not valid UTF-8 (byte 0xe9); save the file as UTF-8"),
]


def write_malformed_row(root: Path, name: str, line: str | bytes) -> None:
    write_random_bd_dataset(root / "data" / "random_bd", made_up_facts(num_splits=10, facts_per_split=4))
    path = root / "data" / "random_bd" / f"{name}.jsonl"
    rows = path.read_bytes().splitlines()
    line = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(b"\n".join([rows[0], line, *rows[2:]]) + b"\n")


@pytest.mark.parametrize("name, line, message", MALFORMED_ROWS, ids=[m[0] for m in MALFORMED_ROWS])
def test_a_malformed_data_row_is_refused_in_one_line_before_any_model_loads(name, line, message, tmp_path):
    write_malformed_row(tmp_path, name, line)
    assert_refused(run_sweep(smoketest_refusal_args(None, tmp_path)), message, tmp_path)


@pytest.mark.parametrize("case", [3, len(MALFORMED_ROWS) - 1], ids=["not-utf8", "a-list"])
def test_a_malformed_data_file_is_refused_through_the_cli(tmp_path, case):
    """No Hydra traceback (nor its HYDRA_FULL_ERROR line): one error line."""
    name, line, message = MALFORMED_ROWS[case]
    write_malformed_row(tmp_path, name, line)
    result = run_cli(smoketest_refusal_args(None, tmp_path), cwd=tmp_path, timeout=120)
    assert_refused(result, message, tmp_path)
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr


def test_the_papers_random_bd_is_refused_for_its_repeated_answers_unless_allowed(shared_data, tmp_path):
    """The paper's random_bd lists the right answer twice in some questions:
    named (file and line) unless the sweep says to score them as given."""
    overrides = [f"data_root={shared_data}", f"models_dir={tmp_path}", "model_id=/x/tiny"]
    with pytest.raises(DataValidationError, match=r"random_bd/split_0.jsonl:49: 'choices' lists the right answer "
                                                  r"'1972' 2 times \(B, C\)"):
        planned(config(overrides=overrides))
    assert planned(config(overrides=[*overrides, PAPER_DATA])).runs


def test_a_results_file_that_cannot_be_read_is_refused_in_one_line(tmp_path):
    """A file in a results folder that is no results row (not UTF-8, say) is
    named, not a pandas traceback; nothing else is written."""
    bad = tmp_path / "evals" / "ft" / "2026-01-01--num0.csv"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"rtt_key,condition\n\xff\xfe,baseline\n")
    result = run_sweep(smoketest_refusal_args(None, tmp_path))
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: results_dir: {bad} cannot be read as a results row (UnicodeDecodeError")
    assert not (tmp_path / "models").exists() and [p.name for p in (tmp_path / "evals").rglob("*") if p.is_file()] == [bad.name]


EMPTY_FILES = [("split_0", "random_bd/split_0.jsonl: the file has no rows; every split needs at least one question"),
               ("corpus_split_2", "random_bd/corpus_split_2.jsonl: the file has no rows; every split needs at least one row"),
               ("split_7", "random_bd/split_7.jsonl: the file has no rows")]


@pytest.mark.parametrize("name, message", EMPTY_FILES, ids=[m[0] for m in EMPTY_FILES])
def test_a_data_file_with_no_rows_is_refused_before_any_model_loads(name, message, tmp_path):
    """A forget split, its corpus or a retain split that is empty would run
    a sweep on no questions to exit 0."""
    write_random_bd_dataset(tmp_path / "data" / "random_bd", made_up_facts(num_splits=10, facts_per_split=4))
    (tmp_path / "data" / "random_bd" / f"{name}.jsonl").write_text("\n")
    assert_refused(run_sweep(smoketest_refusal_args(None, tmp_path)), message, tmp_path)


def test_a_dev_file_with_fewer_rows_than_k_shot_is_refused(tmp_path):
    write_random_bd_dataset(tmp_path / "data" / "random_bd", made_up_facts(num_splits=10, facts_per_split=4))
    rows = (tmp_path / "data" / "random_bd" / "dev.jsonl").read_text().splitlines()
    assert_refused(run_sweep(smoketest_refusal_args("unlearn.k_shot=" + str(len(rows) + 1), tmp_path)),
                   f"random_bd/dev.jsonl: {len(rows)} row(s), fewer than k_shot={len(rows) + 1} few-shot examples",
                   tmp_path)


def test_a_torn_results_row_is_refused_in_one_line(tmp_path):
    """A header and half a row (copied in while it was written elsewhere) is
    named; rows the pipeline writes are whole."""
    bad = tmp_path / "evals" / "unlearning" / "2026-01-01--num0.csv"
    bad.parent.mkdir(parents=True)
    bad.write_text("run_key,unlearn_type,lora_rank,lr\nabc,LORA\n")
    result = run_sweep(smoketest_refusal_args(None, tmp_path))
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line == (f"error: results_dir: {bad} is not a whole results row (line 2 does not have the header's 4 "
                    f"cells); move it out of {bad.parent}")


def test_unpublished_wmdp_files_fail_validation(shared_data):
    cfg = config(overrides=[f"data_root={shared_data}", PAPER_DATA, "datasets=[WMDP_MCQ_CORPUS]", "model_id=/x/tiny",
                            "unlearn.types_config.LORA.datasets_config.WMDP_MCQ_CORPUS.lrs=[1e-4]"])
    with pytest.raises(DataValidationError, match="wmdp-deduped/corpus_split_0.jsonl"):
        planned(cfg)


def test_registry_matches_the_paper_files(shared_data):
    for dataset in (Datasets.MMLU, Datasets.YEARS_MMLU_RETAIN, Datasets.RANDOM_BD_SAME_RETAIN, Datasets.RANDOM_BD_ALL_SPLITS):
        assert missing_files(shared_data, DATASETS[dataset].all_files()) == [], dataset
    bd = DATASETS[Datasets.RANDOM_BD_SAME_RETAIN]
    assert bd.retain_files == tuple(f"random_bd/corpus_split_{i}" for i in range(5, 10))


def test_absent_random_bd_is_generated(tmp_path):
    cfg = config(overrides=[f"data_root={tmp_path}/data", "model_id=/x/tiny", "random_bd.facts_per_split=4"])
    planned(cfg)
    rows = load_mcq(tmp_path / "data" / "random_bd" / "split_9.jsonl")
    assert len(rows) == 4


def test_result_csv_is_written_whole(tmp_path):
    row = {"lora_rank": 8, "unlearn_type": UnlearnType.LORA, "forget_accs": {"f": {0: 0.5, 1: 0.25}}}
    path = write_result_csv(tmp_path / "unlearning", 3, row)
    assert path.name.endswith("--num3.csv")
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    frame = pd.read_csv(path)
    assert frame.lora_rank[0] == 8 and frame.unlearn_type[0] == "LORA"
    assert json.loads(frame.forget_accs[0]) == {"f": {"0": 0.5, "1": 0.25}}


def test_recorded_keys_that_look_like_numbers_are_found_as_written(tmp_path):
    """A key such as "07270824e702" must not be read as a number, or its job
    would look unfinished and run again on every rerun."""
    keys = ["07270824e702", "000000000012", "abc123def456"]
    for i, key in enumerate(keys):
        write_result_csv(tmp_path / "unlearning", i, {"run_key": key, "stop_reason": "retain_floor"})
        write_result_csv(tmp_path / "quant", i, {"probe_key": key, "upstream_key": key})
    recorded = recorded_rows(tmp_path)
    assert sorted(recorded.keys["unlearn"]) == sorted(keys) and sorted(recorded.keys["quant"]) == sorted(keys)
    assert recorded.flagged == set(keys)


def test_a_row_reads_back_as_written(tmp_path):
    """The schema's reader gives back what the writer got: keys and commits as
    text however they look, dicts and lists, numbers, booleans, None."""
    row = {"run_key": "1234e5678901", "code_version": "000000000012", "lora_rank": 8, "lr": 1e-05,
           "forget_accs": {"f": {"0": 0.5}}, "val_files": ("a", "b"), "stop_reached": False, "steering_coeff": None,
           "dataset": Datasets.RANDOM_BD_SAME_RETAIN, "model_path": "models/x"}
    write_row(tmp_path, "unlearn", 0, row)
    [(path, back)] = list(read_rows(tmp_path, "unlearn"))
    assert path.parent == tmp_path / "unlearning"
    assert back == {**row, "val_files": ["a", "b"], "dataset": "RANDOM_BD_SAME_RETAIN"}
    assert isinstance(back["run_key"], str) and isinstance(back["lr"], float) and back["stop_reached"] is False


def test_a_key_written_twice_keeps_its_newest_row(tmp_path):
    first = write_result_csv(tmp_path / "ft", 0, {"rtt_key": "k1", "value": 1})
    other = write_result_csv(tmp_path / "ft", 1, {"rtt_key": "k2", "value": 2})
    newest = write_result_csv(tmp_path / "ft", 2, {"rtt_key": "k1", "value": 3})
    assert drop_superseded_rows(tmp_path) == 1
    assert sorted(p.name for p in (tmp_path / "ft").iterdir()) == sorted([other.name, newest.name])
    assert not first.exists()


def test_unlearning_row_carries_rank(tmp_path, shared_data):
    cfg = config(overrides=[f"data_root={shared_data}", PAPER_DATA, f"models_dir={tmp_path}/m", "model_id=/x/tiny",
                            "unlearn.lora_ranks=[16]", "seeds=[2]"])
    run = planned(cfg).runs[0]
    result = UnlearnResult(run.model_path, {}, {}, {}, {}, 123)
    row = unlearning_row(run, result)
    assert row["lora_rank"] == 16 and row["unlearn_type"] == UnlearnType.LORA and row["model_path"] == run.model_path
    assert row["seed"] == 2 and row["run_key"] == run.key


@pytest.mark.parametrize("cpus, gpus, nodes, expected", [
    (1, "auto", [{"CPU": 2}], pipeline.Resources(1, 0, 2)),
    (2, "auto", [{"CPU": 8, "GPU": 4}], pipeline.Resources(2, 1, 4)),
    (1, 0, [{"CPU": 8, "GPU": 4}], pipeline.Resources(1, 0, 8)),
    (2, 0.25, [{"CPU": 16, "GPU": 1}], pipeline.Resources(2, 0.25, 4)),  # GPU-bound
    (2, 0, [{"CPU": 3}, {"CPU": 2}], pipeline.Resources(2, 0, 2)),  # one task a node, not 5 // 2 across them
    (3, 0, [{"CPU": 2.5}], "ray.cpus_per_task: 3 is more than the 2.5 CPU"),
    # 4 CPUs in the cluster, but no node holds 3: Ray would queue the task for ever
    (3, 0, [{"CPU": 2}, {"CPU": 2}], "ray.cpus_per_task: 3 is more than the 2 CPU"),
    (2, 1, [{"CPU": 4}, {"CPU": 1, "GPU": 1}], r"ray: a task of 2 CPU\(s\) and 1 GPU\(s\) is more than any node"),
])
def test_task_resources(cpus, gpus, nodes, expected):
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            pipeline.task_resources(cpus, gpus, nodes)
    else:
        assert pipeline.task_resources(cpus, gpus, nodes) == expected


def test_task_never_asks_for_a_missing_gpu():
    with pytest.raises(ConfigError, match="ray.gpus_per_task: 1 is more than the 0 GPU"):
        pipeline.task_resources(1, 1, [{"CPU": 2}])


def test_lora_smoketest_end_to_end(merged_sweep, tiny_llama):
    """The issue's command on a tiny Llama: unlearning (rank 4) then RTT on 2
    splits plus baseline RTT, CSVs written, model folder plain; then analysis."""
    from transformers import AutoModelForCausalLM

    frames = sweep_frames(merged_sweep)
    unlearning = frames["unlearning"][frames["unlearning"].seed == 0]
    ft = frames["ft"][(frames["ft"].seed == 0) & (frames["ft"].probe == "rtt")]
    assert len(unlearning) == 1
    row = unlearning.iloc[0]
    assert row.lora_rank == 4 and row.unlearn_type == "LORA" and row.dataset == "RANDOM_BD_SAME_RETAIN"
    for column in ("model_path", "lr", "epochs", "retain_coeff", "steering_coeff", "max_samples", "forget_accs",
                   "forget_accs_calibrated", "retain_accs", "retain_accs_calibrated", "base_model", "save_name"):
        assert column in unlearning.columns
    assert sorted(ft.condition) == ["baseline", "baseline", "unlearned", "unlearned"]
    import torch

    for frame in (unlearning, ft):  # every row says where, how and by which code it ran, and where its time went
        assert set(frame.machine_cpu) == {cpu_model()} and set(frame.torch_version) == {torch.__version__}
        assert set(frame.machine_cpu_features.fillna("")) == {cpu_features()}  # what picks its kernels
        assert set(frame.device) == {"cpu"} and set(frame.dtype) == {"float32"}
        assert set(frame.bf16_autocast) == {False} and frame.code_version.str.len().min() >= 12  # the suite's path
        assert all({"load", "evaluate", "steps"} <= set(json.loads(p)) for p in frame.phase_seconds)
    assert "save" in json.loads(row.phase_seconds)
    # the weights it started from, as `sha1sum` names them (same key on another CPU need not mean same bits)
    assert row.start_weights == hashlib.sha1((Path(tiny_llama) / "model.safetensors").read_bytes()).hexdigest()[:12]
    unlearned = ft[ft.condition == "unlearned"]
    assert set(unlearned.base_model) == {row.model_path} and sorted(unlearned.skip_split) == [0, 1]
    assert all(json.loads(v) for v in frames["ft"].forget_accs_local)
    model_dir = Path(row.model_path)
    assert not any("adapter" in p.name for p in model_dir.iterdir())
    AutoModelForCausalLM.from_pretrained(model_dir)
    assert not list(merged_sweep.glob("outputs")), "hydra must not write outputs/"

    import analyze_recovery

    table = analyze_recovery.analyze(merged_sweep / "evals", analyze_recovery.Options())
    assert list(table.lora_rank) == [4] and not table.C.isna().any()
    assert (merged_sweep / "evals" / "recovery_vs_rank.png").stat().st_size > 0


def test_by_rank_overrides_lrs_and_rcs_for_listed_ranks_only():
    ds = "unlearn.types_config.LORA.datasets_config.RANDOM_BD_SAME_RETAIN"
    cfg = config(overrides=["unlearn.lora_ranks=[1,8,32]", f"{ds}.rcs.add=[1.0]",
                            f"+{ds}.by_rank={{1: {{lrs: [3e-3], rcs: [5.0]}}, 32: {{lrs: [5e-4, 1e-3]}}}}"])
    grid = dataset_grid(pipeline.plain(cfg), UnlearnType.LORA, Datasets.RANDOM_BD_SAME_RETAIN)
    assert sorted((p.lora_rank, p.lr, p.retain_coeff) for p in grid) == [
        (1, 3e-3, 5.0), (8, 1e-4, 1.0), (32, 5e-4, 1.0), (32, 1e-3, 1.0)]


@pytest.mark.parametrize("by_rank, message", [
    ("{-2: {lrs: [1e-3]}}", "by_rank: -2 is not allowed"),
    ("{4: {lr: [1e-3]}}", r"by_rank.4: \['lr'\] not allowed; a rank may set lrs and rcs"),
    ("{4: {rcs: [-1.0]}}", r"by_rank.4.rcs: \[-1.0\] is not allowed"),
])
def test_by_rank_refuses_bad_entries(by_rank, message):
    bad = config(overrides=[f"+unlearn.types_config.LORA.datasets_config.RANDOM_BD_SAME_RETAIN.by_rank={by_rank}"])
    with pytest.raises(ConfigError, match=message):
        dataset_grid(pipeline.plain(bad), UnlearnType.LORA, Datasets.RANDOM_BD_SAME_RETAIN)


def test_by_rank_is_refused_for_methods_without_ranks():
    gd = config(overrides=["+unlearn.types_config.GD.datasets_config.RANDOM_BD_SAME_RETAIN.by_rank={4: {lrs: [1e-3]}}"])
    with pytest.raises(ConfigError, match="RANDOM_BD_SAME_RETAIN.by_rank is not allowed for GD; only LORA"):
        dataset_grid(pipeline.plain(gd), UnlearnType.GD, Datasets.RANDOM_BD_SAME_RETAIN)


def test_the_study_plans_paired_seeds_and_the_demo_is_a_slice_of_it(tmp_path):
    """The study matches forgetting with the stop rule (one lr for every rank,
    no per-rank tuning), runs every rank at every seed on all five held-out
    splits, plans C on its baseline seeds and the floor once; the demo is
    seed 0 of it, job for job (the same keys)."""
    where = [f"data_root={tmp_path}/data", f"models_dir={tmp_path}/models"]
    cfg = config("rank_study", [*where, f"results_dir={tmp_path}/study"])
    plan = planned(cfg)
    ranks, seeds, splits = list(cfg.unlearn.lora_ranks), list(cfg.seeds), cfg.ft.num_splits
    assert len(seeds) >= 20 and ranks == [1, 8, 64] and splits == 5
    assert sorted((run.point.lora_rank, run.point.seed) for run in plan.runs) == sorted(
        (r, s) for r in ranks for s in seeds)
    assert len({run.model_path for run in plan.runs}) == len(plan.runs)  # a folder per rank and seed
    assert len({run.point.lr for run in plan.runs}) == 1 and len({run.point.retain_coeff for run in plan.runs}) == 1
    assert "by_rank" not in cfg.unlearn.types_config.LORA.datasets_config.RANDOM_BD_SAME_RETAIN
    stop = plan.runs[0].settings.stop
    assert stop.active and 0 < stop.stop_at_forget_acc < 1
    assert stop.stop_retain_floor is not None  # a run that breaks retain first is stopped and flagged
    assert all(run.settings.save.save_format == "adapter" for run in plan.runs)
    assert plan.teach is not None and plan.unlearn_from == plan.teach.model_path
    assert plan.base_model == str(tmp_path / "models" / "base" / "SmolLM2-135M-Instruct")
    assert cfg.preflight.min_forget_acc == 0.9
    assert all(len(run.rtt) == splits and {j.seed for j in run.rtt} == {run.point.seed} for run in plan.runs)
    # paired: every seed holds out the same splits at every rank
    assert {tuple(sorted(j.skip_split for j in run.rtt)) for run in plan.runs} == {tuple(range(splits))}
    assert sorted({j.seed for j in plan.baseline_rtt}) == list(cfg.baseline_rtt_seeds) == [0, 1, 2]
    assert len(plan.baseline_rtt) == splits * 3
    assert len(plan.floor_rtt) == splits and all(j.base_model == plan.base_model for j in plan.floor_rtt)
    assert (tmp_path / "data" / "random_bd" / "split_9.jsonl").is_file()
    assert not (tmp_path / "models").exists()  # planning loads and writes no model

    demo = planned(config("demo_taught", [*where, f"results_dir={tmp_path}/demo"]))
    seed13 = planned(config("rank_study", [*where, f"results_dir={tmp_path}/study", "slice=[13]"]))
    assert {run.point.seed for run in demo.runs} == {13} and len(demo.runs) == len(ranks)
    assert {j.skip_split for run in demo.runs for j in run.rtt} == {0, 1} and not demo.reference_quant
    # every demo job but its own C is one of seed 13's (its run keys, its RTT of splits 0 and 1), and those are
    # the study's; the study runs C on seeds 0-2 only
    own_c = {j.key for j in demo.baseline_rtt}
    assert len(own_c) == 2 and not own_c & {j.key for j in plan.jobs()}
    assert {j.key for j in demo.jobs()} - own_c < {j.key for j in seed13.jobs()} < {j.key for j in plan.jobs()}
    assert {run.key for run in demo.runs} == {run.key for run in seed13.runs}


def test_a_slice_runs_its_seeds_with_their_c_and_the_first_seeds_floor(tmp_path):
    where = [f"data_root={tmp_path}/data", f"models_dir={tmp_path}/models", f"results_dir={tmp_path}/evals"]
    whole = planned(config("rank_study", where))
    piece = planned(config("rank_study", [*where, "slice=[2,5]"]))
    assert {run.point.seed for run in piece.runs} == {2, 5}
    assert {j.seed for j in piece.baseline_rtt} == {2}  # of baseline_rtt_seeds [0, 1, 2], only 2 is in the slice
    assert {j.key for j in piece.floor_rtt} == {j.key for j in whole.floor_rtt}  # one floor for every slice
    assert {j.key for j in piece.jobs()} < {j.key for j in whole.jobs()}


def test_the_gpu_sweep_carries_the_studys_design():
    cfg = config("lora_rank_sweep", ["model_id=/x/tiny"])
    u = cfg.unlearn
    assert len(cfg.seeds) >= 3 and cfg.ft.num_splits == 5 and cfg.baseline_rtt
    assert set(cfg.baseline_rtt_seeds) < set(cfg.seeds)
    assert u.stop_at_forget_acc is not None and u.stop_retain_floor is not None
    assert u.lora_alpha is not None and not u.use_rslora  # alpha/r with alpha fixed: one pace at every rank
    for block in u.types_config.LORA.datasets_config.values():
        assert len(block.lrs) == 1 and "by_rank" not in block  # one lr for every rank


def test_method_settings_override_the_shared_ones(tmp_path, shared_data):
    cfg = config(overrides=[f"data_root={shared_data}", PAPER_DATA, f"models_dir={tmp_path}", "model_id=/x/tiny",
                            "unlearn.types=[CUT]", "unlearn.cut_scs=[7]", "unlearn.optimizer=lion"])
    settings = planned(cfg).runs[0].settings
    assert settings.train.optimizer == "adamw"  # types_config.CUT.optimizer beats unlearn.optimizer
    assert settings.method.steering_coeff == 7.0 and settings.method.param_names == ("mlp.down_proj.weight",)
    assert isinstance(settings.method, unlearn_pipeline.RmuSettings)


def test_a_method_added_through_the_registry_alone_runs_end_to_end(tiny_llama, methods_sweep):
    """tests/toy_method.py adds TOY with one registry row and one objective;
    its config block comes from the command line; nothing else knows it."""
    unlearning, ft = sweep_frames(methods_sweep).values()
    [row] = [r for _, r in unlearning.iterrows() if r.unlearn_type == "TOY"]
    assert row.unlearn_type == "TOY" and row.lora_rank == 0 and row.steps > 0
    from safetensors.torch import load_file

    before, after = load_file(Path(tiny_llama) / "model.safetensors"), load_file(Path(row.model_path) / "model.safetensors")
    assert any(not __import__("torch").equal(before[k], after[k]) for k in before)  # the toy objective trained
    toy_rtt = [r for _, r in ft.iterrows() if r.unlearn_type == "TOY"]
    assert [r.unlearn_type for r in toy_rtt] == ["TOY"] and toy_rtt[0].upstream_key == row.run_key
    source = (ROOT / "pipeline.py").read_text() + (ROOT / "unlearn_corpus.py").read_text()
    assert "TOY" not in source and "ForgetOnlyAscent" not in source
    assert "TOY" not in pipeline.METHODS  # the plugin's row went with its sweep


def test_an_unknown_method_lists_the_registry():
    with pytest.raises(ConfigError, match="unlearn.types: 'TOY2' is not allowed; use one of GD, WHP, FWF, LORA, CUT"):
        planned(config(overrides=["unlearn.types=[TOY2]", "model_id=/x/tiny"]))


def test_an_adapter_format_sweep_matches_a_merged_one(merged_sweep, adapter_sweep):
    """save_format=adapter keeps only the adapter folder; RTT loads base plus
    adapter and merges in memory; the results match a merged run's."""
    merged, adapter = sweep_frames(merged_sweep), sweep_frames(adapter_sweep)
    for seed in (0, 1):
        row = adapter["unlearning"][adapter["unlearning"].seed == seed].iloc[0]
        twin = merged["unlearning"][merged["unlearning"].seed == seed].iloc[0]
        assert row.save_format == "adapter" and twin.save_format == "merged"
        files = {p.name for p in Path(row.model_path).iterdir()}
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files
        for column in ("forget_accs", "retain_accs"):
            assert json.loads(row[column]) == json.loads(twin[column])

    def by_split(frame):
        return {(r.seed, r.probe, r.condition, r.skip_split): json.loads(r.forget_accs_local) for r in frame.itertuples()}

    ours, theirs = by_split(adapter["ft"]), by_split(merged["ft"])
    assert ours.keys() == theirs.keys() and all(
        abs(ours[s][e] - theirs[s][e]) <= 1e-6 for s in ours for e in ours[s])


def test_the_adapter_relearning_probe_writes_its_rows(merged_sweep):
    """ft.lora_rtt: RTT whose attacker trains a LoRA adapter, same held-out
    splits, its rows marked probe=lora_rtt beside the full RTT's."""
    frames = sweep_frames(merged_sweep)
    ft = frames["ft"][(frames["ft"].condition == "unlearned") & (frames["ft"].seed == 0)
                      & (frames["ft"].skip_split == 0)]
    assert sorted(ft.probe) == ["lora_rtt", "rtt"]
    attacker = ft[ft.probe == "lora_rtt"].iloc[0]
    assert attacker.skip_split == 0 and attacker.epochs == 1
    assert set(json.loads(attacker.forget_accs_local)) == {"0", "1"}  # before the attack and after its epoch
    assert attacker.rtt_key != ft[ft.probe == "rtt"].iloc[0].rtt_key


def test_the_never_taught_floor_is_planned_once_per_dataset_and_rtt_setting(tmp_path):
    cfg = config("rank_study", [f"data_root={tmp_path}/data", f"models_dir={tmp_path}/models",
                                f"results_dir={tmp_path}/evals", "unlearn.lora_ranks=[1,4]", "seeds=[0,1]",
                                "baseline_rtt_seeds=null", "ft.lrs=[1e-4,3e-4]"])
    plan = planned(cfg)
    splits = range(cfg.ft.num_splits)
    assert len(plan.runs) == 4
    # Once per RTT setting (lr x held-out split), not per rank or seed; from the model before teaching.
    assert sorted((j.lr, j.skip_split) for j in plan.floor_rtt) == sorted((lr, s) for lr in (1e-4, 3e-4) for s in splits)
    assert {j.condition for j in plan.floor_rtt} == {"never_taught"} and {j.seed for j in plan.floor_rtt} == {0}
    assert len(plan.baseline_rtt) == 2 * 2 * len(splits)  # C: per seed as well


def test_two_seeds_give_two_model_folders_and_analysis_counts_both(merged_sweep):
    import analyze_recovery

    frames = sweep_frames(merged_sweep)
    unlearning = frames["unlearning"]
    assert sorted(unlearning.seed) == [0, 1] and unlearning.model_path.nunique() == 2
    assert all(Path(p).is_dir() and f"-seed{s}-" in p for p, s in zip(unlearning.model_path, unlearning.seed))
    unlearned = frames["ft"][(frames["ft"].condition == "unlearned") & (frames["ft"].probe == "rtt")]
    assert sorted(unlearned.seed) == [0, 0, 1, 1]
    table = analyze_recovery.analyze(merged_sweep / "evals", analyze_recovery.Options(bootstrap=200), out_dir=merged_sweep / "two-seeds")
    assert list(table.n_seeds) == [2] and list(table.n) == [2 * 2]  # seeds x held-out splits


def test_the_demo_is_a_slice_of_the_second_editions_published_rows(tmp_path):
    """Run keys are a contract with the published rows: a change that moves a
    key (a renamed setting, another fingerprint) would make every published
    row look unfinished and the demo no longer a slice of the study. The
    demo's nine jobs (ranks 1 and 64 and the full reference on seed 0, RTT at
    lr 1e-5 on held-out splits 0 and 1) are all published rows of
    results/rank_study_speed, on the study's path (fp32 on any CPU)."""
    published = ROOT / "results" / "rank_study_speed"
    cfg = config("demo_cpu", [f"data_root={tmp_path}/data", f"results_dir={published}"])
    assert cfg.device.bf16_autocast is False  # the exact path, as the study: the same keys on every CPU
    plan = planned(cfg)
    assert [run.label for run in plan.runs] == ["LORA r1 s0 unlearn", "LORA r64 s0 unlearn", "GD s0 unlearn"]
    assert len(plan.jobs()) == 9 and plan.pending() == []
    assert {(j.skip_split, j.lr) for run in plan.runs for j in run.rtt} == {(0, 1e-5), (1, 1e-5)}
    assert not plan.baseline_rtt and not plan.floor_rtt and not plan.reference_quant


@pytest.mark.parametrize("seed", [0, 1])
def test_the_second_edition_plans_exactly_the_published_rows_of_each_seed(tmp_path, seed):
    """The study runs a seed a slice at a time over many sessions and
    machines: every job of a published seed (five arms, RTT at two lrs on
    five held-out splits, C, the floor, the quantization and merge probes)
    finds its row under the key it was written with, so a later slice's
    code reruns nothing of it and pairs with it."""
    published = ROOT / "results" / "rank_study_speed"
    plan = planned(config("rank_study_speed", [f"data_root={tmp_path}/data", f"results_dir={published}",
                                               f"slice=[{seed}]"]))
    assert len(plan.runs) == 5 and len(plan.jobs()) == 97
    assert [job.label for job in plan.pending()] == []


def test_the_numeric_path_slice_is_the_published_seed_0_on_the_other_path(tmp_path):
    """conf/rank_study_speed_bf16.yaml measures the path effect by pairing
    each arm with its fp32 twin: with the path set back to fp32, every one of
    its jobs is a published row of seed 0 (five arms, both lrs, five splits);
    under bf16 autocast none is, so it runs them all, into its own folder."""
    from omegaconf import OmegaConf

    published = ROOT / "results" / "rank_study_speed"
    overrides = [f"data_root={tmp_path}/data", f"results_dir={published}"]
    # the suite composes every config on one path unless told; the file itself asks for bf16 autocast
    assert OmegaConf.load(ROOT / "conf" / "rank_study_speed_bf16.yaml").device.bf16_autocast is True
    fp32 = planned(config("rank_study_speed_bf16", [*overrides, "device.bf16_autocast=false"]))
    assert len(fp32.runs) == 5 and len(fp32.jobs()) == 55 and fp32.pending() == []
    bf16 = planned(config("rank_study_speed_bf16", [*overrides, "device.bf16_autocast=true"]))
    assert len(bf16.pending()) == 55


def test_the_first_editions_demo_plans_exactly_the_published_rows_of_its_seed(tmp_path):
    """The same contract for the first edition's demo (conf/demo_taught.yaml).
    The published rows ran with bf16 autocast, and the numeric path is part of
    a key, so the path is given (on a CPU without fast bf16 it runs fp32,
    other keys, and is compared by prediction interval only). Only its C is
    its own: the study ran C on seeds 0-2."""
    published = ROOT / "results" / "rank_study"
    plan = planned(config("demo_taught", [f"data_root={tmp_path}/data", f"results_dir={published}",
                                       "device.bf16_autocast=true"]))
    assert len(plan.jobs()) == 13
    assert [job.label for job in plan.pending()] == ["C rtt v0 s13", "C rtt v1 s13"]


@pytest.mark.parametrize("seed", [0, 3])
def test_the_pretraining_study_plans_exactly_its_published_rows(tmp_path, seed):
    """The same contract for the second half: every job of a published seed
    (its runs, RTT, C and floor) finds its row under the key it was written
    with, so a rerun of the study runs nothing."""
    published = ROOT / "results" / "rank_study_pretrained"
    plan = planned(config("rank_study_pretrained", [f"data_root={tmp_path}/data", f"results_dir={published}",
                                                    "device.bf16_autocast=true", f"slice=[{seed}]"]))
    assert len(plan.jobs()) == (53 if seed == 0 else 43) and plan.pending() == []


def test_job_labels_tell_the_jobs_of_a_sweep_apart(tmp_path):
    """On the default grid one rank has three lrs and three retain
    coefficients, and RTT three lrs: every job prints a label of its own
    (progress lines and failures name the job, not just its method)."""
    plan = planned(config("default", [f"data_root={tmp_path}/data", f"models_dir={tmp_path}/m",
                                                  f"results_dir={tmp_path}/r", "unlearn.lora_ranks=[4]",
                                                  "ft.num_splits=2"]))
    labels = [job.label for job in plan.jobs()]
    assert len(plan.runs) == 9 and len(set(labels)) == len(labels)
    assert "LORA r4 lr0.001 rc10 s0 unlearn" in labels and "LORA r4 lr0.001 rc10 s0 rtt lr1e-06 v1" in labels
    study = planned(config("demo_taught", [f"data_root={tmp_path}/data", f"results_dir={tmp_path}/r2"]))
    assert [run.label for run in study.runs] == ["LORA r1 s13 unlearn", "LORA r8 s13 unlearn", "LORA r64 s13 unlearn"]


def test_pretraining_facts_take_their_floor_from_rtt_on_the_remapped_twin(tmp_path):
    from toolkit.names import Datasets

    cfg = config("rank_study_pretrained", [f"data_root={tmp_path}/data", f"models_dir={tmp_path}/m",
                                           f"results_dir={tmp_path}/r", "model_id=/x/tiny", "slice=[0]",
                                           "preflight.min_forget_acc=null"])
    plan = planned(cfg)
    assert {run.point.lora_rank for run in plan.runs} == {1, 8, 64} and not plan.teach
    # the floor: RTT from the model before unlearning, on the same questions with answers remapped
    assert plan.floor_rtt and {j.dataset for j in plan.floor_rtt} == {Datasets.WORLD_FACTS_REMAPPED}
    assert {j.base_model for j in plan.floor_rtt} == {"/x/tiny"} and {j.condition for j in plan.floor_rtt} == {"never_taught"}
    assert all(j.settings.evals.scoring == "choice" for run in plan.runs for j in run.rtt)
    assert len(plan.runs[0].rtt) == 5 * 2  # the paper's attacker: every held-out split x 2 lrs, 6 epochs each
    assert (tmp_path / "data" / "world_facts_remapped" / "split_0.jsonl").is_file()


def test_the_pretraining_study_runs_end_to_end_under_choice_scoring(tiny_llama, tmp_path, ray_session):
    """The second half's config on a tiny Llama, shortened: LoRA unlearning,
    RTT, C, the floor on the remapped twin, the adapter-relearning and 4-bit
    probes, all scored by choice likelihood; every row says so, LoRA rows carry
    their update size, and the analysis reads it all under both attackers."""
    import analyze_recovery

    result = run_sweep(["--config-name=rank_study_pretrained", f"model_id={tiny_llama}", f"data_root={tmp_path}/data",
                        f"models_dir={tmp_path}/models", f"results_dir={tmp_path}/r", "slice=[0]", "ray.num_cpus=2",
                        "preflight.min_forget_acc=null", "unlearn.lora_ranks=[1,4]", "unlearn.stop_at_forget_acc=null",
                        "unlearn.stop_retain_floor=null",
                        "unlearn.types_config.LORA.datasets_config.WORLD_FACTS_KNOWN.epochs_lst=[1]",
                        "ft.num_splits=2", "ft.lrs=[1e-4]", "ft.epochs_lst=[2]", "quant.bits=[4]",
                        "ft.lora_rtt.enabled=true", "ft.lora_rtt.lora_rank=2", "ft.lora_rtt.epochs_lst=[1]"])
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    results = analyze_recovery.load_results(tmp_path / "r")
    for frame in (results.unlearning, results.rtt, results.quant):
        assert len(frame) and set(frame.scoring) == {"choice"}
    assert sorted(results.unlearning.lora_rank) == [1, 4] and (results.unlearning.update_rel_norm > 0).all()
    conditions = results.rtt.groupby(["condition", "dataset"]).size().to_dict()
    # per held-out split (2): C with its LoRA probe, the floor, and each rank's (2) RTT with its LoRA probe
    assert conditions == {("baseline", "WORLD_FACTS_KNOWN"): 2 * 2, ("never_taught", "WORLD_FACTS_REMAPPED"): 2,
                          ("unlearned", "WORLD_FACTS_KNOWN"): 2 * 2 * 2}
    table = analyze_recovery.analyze(tmp_path / "r", analyze_recovery.Options(bootstrap=200),
                                     stream=open("/dev/null", "w"), attackers=("paper", "cross_fitted"))
    assert len(table) == 4 and set(table.attacker) == {"paper", "cross_fitted"}
    for column in ("B", "C", "floor", "lora_rtt_recovered", "quant4_recovered", "update_rel_norm"):
        assert table[column].notna().all(), column



# a step large enough that the tiny model's answers move (base != A), so recovery ratios are defined
FORGETS = "unlearn.types_config.LORA.datasets_config.RANDOM_BD_SAME_RETAIN.lrs=[0.03]"


def test_a_probe_added_through_the_registry_alone_runs_end_to_end(tiny_llama, tmp_path, ray_session, monkeypatch):
    """tests/toy_probe.py adds the `noise` probe with one registry row (its job
    builder, its runner, its marker); nothing else knows it. It runs on each
    unlearned model after the run, a rerun finds it finished, and its measure
    is in the analysis table and drawn in the figure."""
    import importlib
    import sys

    import analyze_recovery
    from toolkit import plots
    from toolkit.probes import PROBE_REGISTRY

    # 12 facts a split (60 forget questions): base and A cannot tie by chance as on 4
    args = smoketest_args(tiny_llama, tmp_path, "plugins=[toy_probe]", "probes=[noise]", "seeds=[0,1]", FORGETS,
                          "ft.num_splits=2", "random_bd.facts_per_split=12", "random_bd.num_dev=2",
                          data_root=tmp_path / "data")
    result = run_sweep(args)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    assert "2 unlearning run(s), 4 RTT run(s), 0 quantization probe(s), 2 other probe(s)" in result.stdout
    results = analyze_recovery.load_results(tmp_path / "evals")
    noise = results.quant[results.quant.probe == "noise"]
    assert len(noise) == 2 and set(noise.upstream_key) == set(results.unlearning.run_key)
    assert set(noise.scale) == {0.01} and all(set(accs) == set(row.val_files) for accs, (_, row) in
                                              zip(noise.forget_accs, results.unlearning.iterrows()))
    drawn = []
    original = plots._errorbar
    monkeypatch.setattr(plots, "_errorbar", lambda ax, group, measure, *a, **kw: (drawn.append((measure, kw.get(
        "marker"))), original(ax, group, measure, *a, **kw))[1])
    # where its plugin is imported, the analysis takes the probe's marker from its row (else a marker of its own)
    registered = dict(PROBE_REGISTRY)
    importlib.import_module("toy_probe")
    try:
        table = analyze_recovery.analyze(tmp_path / "evals", analyze_recovery.Options(bootstrap=200),
                                         stream=(printed := io.StringIO()))
    finally:
        PROBE_REGISTRY.clear()
        PROBE_REGISTRY.update(registered)
        sys.modules.pop("toy_probe", None)
    assert table.noise.notna().all() and table.noise_recovered.notna().all(), table[["base", "A", "noise", "B"]]
    assert "noise recovered" in printed.getvalue()
    assert ("noise_recovered", "v") in drawn
    assert "finished earlier; nothing to run" in run_sweep(args).stdout
    source = "".join((ROOT / name).read_text() for name in ("pipeline.py", "analyze_recovery.py"))
    assert "noise" not in source and "NoiseJob" not in source


def test_a_model_folder_is_derived_from_its_run_key(tmp_path):
    """Two sweeps that differ only in a setting the folder's name leaves out
    (lora_alpha) save to two folders; the run key ends the folder's name."""
    where = [f"data_root={tmp_path}/data", f"models_dir={tmp_path}/m", "model_id=/x/tiny"]
    [plain_run], [alpha_run] = (planned(config(overrides=[*where, "unlearn.lora_ranks=[4]", *extra])).runs[:1]
                                for extra in ([], ["unlearn.lora_alpha=4"]))
    assert plain_run.key != alpha_run.key and plain_run.model_path != alpha_run.model_path
    assert plain_run.model_path.endswith(f"-{plain_run.key}") and alpha_run.settings.save.path == alpha_run.model_path
    assert all(job.base_model == alpha_run.model_path for job in alpha_run.rtt)


def test_a_method_declares_its_own_sweep_axis_and_the_grid_rows_and_analysis_follow(tmp_path):
    """TOYSCALE (tests/toy_method.py) declares one axis, `unlearn.toy_scales`,
    in its registry row, and nothing else: the grid has a run per value, each
    with its own key, label and folder, its settings carry the value, its row
    names the axis, and the analysis keeps the values apart."""
    import importlib
    import sys

    import analyze_recovery
    import pipeline
    from toolkit.rows import unlearning_row
    from unlearn_corpus import UnlearnResult

    before = dict(pipeline.METHODS)
    try:
        importlib.import_module("toy_method")
        block = "{loss_type: CORPUS, datasets_config: {RANDOM_BD_SAME_RETAIN: {epochs_lst: [1], lrs: [1e-3], rcs: [0.0]}}}"
        plan = planned(config(overrides=[f"data_root={tmp_path}/data", f"models_dir={tmp_path}/m", "model_id=/x/tiny",
                                         "plugins=[toy_method]", "unlearn.types=[TOYSCALE]", "+unlearn.toy_scales=[0.5,2]",
                                         f"+unlearn.types_config.TOYSCALE={block}"]))
        assert [run.label for run in plan.runs] == ["TOYSCALE ascent_scale0.5 s0 unlearn", "TOYSCALE ascent_scale2 s0 unlearn"]
        assert [run.settings.method.ascent_scale for run in plan.runs] == [0.5, 2.0]
        assert len({run.key for run in plan.runs}) == 2 and len({run.model_path for run in plan.runs}) == 2
        for i, run in enumerate(plan.runs):
            row = unlearning_row(run, UnlearnResult(run.model_path, {f: {0: 0.8, 1: 0.3 + 0.2 * i} for f in
                                                                     run.settings.evals.val_files}, {}, {}, {}, 1))
            assert row["sweep_axes"] == ["ascent_scale"] and row["ascent_scale"] == run.settings.method.ascent_scale
            write_result_csv(tmp_path / "r" / "unlearning", i, {**row, "val_files": list(run.settings.evals.val_files)})
    finally:
        pipeline.METHODS.clear()
        pipeline.METHODS.update(before)
        sys.modules.pop("toy_method", None)
    table = analyze_recovery.analyze(tmp_path / "r", analyze_recovery.Options(bootstrap=200),
                                     stream=(printed := io.StringIO()))
    assert list(table.axis_ascent_scale) == [0.5, 2.0] and list(table.A.round(2)) == [0.3, 0.5]
    assert "ascent_scale" in printed.getvalue().splitlines()[0]


def test_the_stop_rule_takes_several_targets_each_a_run_of_its_own(tmp_path):
    """unlearn.stop_at_forget_acc=[0.4, 0.3]: every setting runs to each depth
    of forgetting (its own key, label, folder and stop rule; its row says
    which); one target in a list plans exactly what the number plans."""
    where = [f"data_root={tmp_path}/data", f"models_dir={tmp_path}/m", "model_id=/x/tiny", "unlearn.lora_ranks=[4]",
             "unlearn.types_config.LORA.datasets_config.RANDOM_BD_SAME_RETAIN.lrs=[1e-3]",
             "unlearn.types_config.LORA.datasets_config.RANDOM_BD_SAME_RETAIN.rcs={range: [], add: [1.0]}"]
    deep = planned(config(overrides=[*where, "unlearn.stop_at_forget_acc=[0.4,0.3]"]))
    assert [run.settings.stop.stop_at_forget_acc for run in deep.runs] == [0.4, 0.3]
    assert [run.label for run in deep.runs] == ["LORA r4 stop0.4 s0 unlearn", "LORA r4 stop0.3 s0 unlearn"]
    assert len({run.key for run in deep.runs}) == 2 and "-stop0.3-seed0-" in deep.runs[1].model_path
    one, number = (planned(config(overrides=[*where, f"unlearn.stop_at_forget_acc={v}"])) for v in ("[0.3]", "0.3"))
    assert [(r.key, r.model_path, r.label) for r in one.runs] == [(r.key, r.model_path, r.label) for r in number.runs]
    assert number.runs[0].key == deep.runs[1].key  # the same run, whichever way it was asked for
    with pytest.raises(ConfigError, match=r"unlearn.stop_at_forget_acc: 1.5 is not allowed; use null, a number in "
                                          r"\[0, 1\], or a list"):
        planned(config(overrides=[*where, "unlearn.stop_at_forget_acc=[0.4,1.5]"]))
    with pytest.raises(ConfigError, match="give each value once"):
        planned(config(overrides=[*where, "unlearn.stop_at_forget_acc=[0.3,0.3]"]))


@pytest.mark.parametrize("sweep", ["merged_sweep", "adapter_sweep"])
def test_rtt_starts_from_the_model_the_unlearning_row_measured(sweep, request):
    """On the suite's path (fp32), merged or adapter: RTT's V accuracy before
    its first step is A, the unlearning row's last accuracy, on every split."""
    import analyze_recovery
    from toolkit.units import step0_check

    lines = step0_check(analyze_recovery.load_results(request.getfixturevalue(sweep) / "evals"))
    assert lines == ["step-0 check: RTT's V accuracy before its first step equals A on 4 of 4 held-out splits"]


def test_the_merge_fidelity_probe_scores_the_model_as_a_16_bit_checkpoint_stores_it(tiny_llama, tmp_path,
                                                                                      ray_session):
    """probes=[merge_bf16,merge_fp16]: each unlearned model scored with every
    weight rounded to bf16 and to fp16, a quant-table row each, per rank,
    and a measure each in the analysis table."""
    import analyze_recovery

    result = run_sweep(smoketest_args(tiny_llama, tmp_path, "probes=[merge_bf16,merge_fp16]", "unlearn.lora_ranks=[2,4]",
                                      "ft.num_splits=1", FORGETS))
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    results = analyze_recovery.load_results(tmp_path / "evals")
    rows = results.quant.sort_values(["lora_rank", "probe"])
    assert list(zip(rows.lora_rank, rows.probe, rows.cast_dtype)) == [
        (2, "merge_bf16", "bfloat16"), (2, "merge_fp16", "float16"), (4, "merge_bf16", "bfloat16"),
        (4, "merge_fp16", "float16")]
    table = analyze_recovery.analyze(tmp_path / "evals", analyze_recovery.Options(bootstrap=200),
                                     stream=io.StringIO())
    assert list(table.lora_rank) == [2, 4] and table.merge_bf16.notna().all() and table.merge_fp16.notna().all()


GD_GRID = "unlearn.types_config.GD.datasets_config.RANDOM_BD_SAME_RETAIN"


def test_rtt_scored_along_its_budget_end_to_end(tiny_llama, tmp_path, ray_session):
    """A rank sweep with the full-parameter reference (GD), RTT scored along
    its budget, the merge-fidelity and 4-bit probes: every RTT row holds V at
    steps 0, 1, 2, 4, ... and at each epoch's end, with each question's
    correctness, the epoch-end values equal to the per-epoch ones (one
    scoring); the full run's update is measured against its starting weights;
    the analysis gives the curve measures with CIs for every arm and draws
    the curves."""
    import analyze_recovery

    result = run_sweep(smoketest_args(tiny_llama, tmp_path, "ft.budget=log2", "ft.epochs_lst=[2]", "ft.num_splits=2",
                                      "seeds=[0]", FORGETS, "unlearn.types=[LORA,GD]", "unlearn.lora_ranks=[1,4]",
                                      f"{GD_GRID}.lrs=[1e-2]", f"{GD_GRID}.epochs_lst=[1]",
                                      f"{GD_GRID}.rcs={{range: [], add: [1.0]}}", "probes=[merge_bf16,merge_fp16]",
                                      "quant.bits=[4]", "random_bd.facts_per_split=12", "random_bd.num_dev=2",
                                      data_root=tmp_path / "data"))
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    results = analyze_recovery.load_results(tmp_path / "evals")
    rtt = results.rtt[results.rtt.condition == "unlearned"]
    assert len(rtt) == 3 * 2 and set(rtt.budget) == {"log2"}
    full = results.unlearning[results.unlearning.unlearn_type == "GD"].iloc[0]
    assert full.update_rel_norm > 0 and full.update_eff_rank > 1 and "q_proj" in full.update_by_module
    assert sorted(results.quant.probe) == ["merge_bf16"] * 3 + ["merge_fp16"] * 3 + ["quant4"] * 4
    for _, row in rtt.iterrows():
        by_step = {int(s): acc for s, acc in row.forget_accs_by_step.items()}
        per_epoch = {int(e): acc for e, acc in row.forget_accs_local.items()}
        # 12 steps an epoch (T: 4 splits of 12 questions, batches of 4), 2 epochs: powers of two and epoch ends
        assert sorted(by_step) == [0, 1, 2, 4, 8, 12, 16, 24]
        assert by_step[0] == per_epoch[0] and by_step[12] == per_epoch[1] and by_step[24] == per_epoch[2]
        assert all(len(bits) == 12 for bits in row.forget_correct_by_step.values())
    printed = io.StringIO()
    table = analyze_recovery.analyze(tmp_path / "evals", analyze_recovery.Options(bootstrap=200), stream=printed)
    assert list(zip(table.unlearn_type, table.lora_rank)) == [("GD", 0), ("LORA", 1), ("LORA", 4)]
    # the curve reads the schedule's steps only: the epoch ends (12, 24) fall elsewhere on splits of other sizes
    assert all(list(steps) == [0, 1, 2, 4, 8, 16] for steps in table.budget_steps)
    # a random tiny model forgets by chance: the curve is defined wherever unlearning removed something (base != A)
    removed = ~np.isclose(table.base, table.A)
    assert removed.any() and table.recovery_auc[removed].notna().all() and table.recovery_auc_lo[removed].notna().all()
    assert table.merge_bf16.notna().all() and table.quant4.notna().all()
    assert "AUC (log steps)" in printed.getvalue() and "at full fine-tuning minus rank 1" in printed.getvalue()
    from PIL import Image

    assert Image.open(tmp_path / "evals" / "recovery_vs_rank.png").size[0] > 2000  # the curves' panel


def test_the_floor_can_run_on_every_seed_and_each_seed_reads_its_own(tmp_path):
    """floor_every_seed=true: the floor's RTT on each seed of the slice (the
    published studies keep one, on the first seed: their plans unchanged)."""
    where = [f"data_root={tmp_path}/data", f"models_dir={tmp_path}/m", f"results_dir={tmp_path}/r", "model_id=/x/tiny",
             "seeds=[0,1,2]", "preflight.min_forget_acc=null"]
    one = planned(config("rank_study_pretrained", where))
    every = planned(config("rank_study_pretrained", [*where, "floor_every_seed=true"]))
    sliced = planned(config("rank_study_pretrained", [*where, "floor_every_seed=true", "slice=[2]"]))
    assert {j.seed for j in one.floor_rtt} == {0} and {j.seed for j in every.floor_rtt} == {0, 1, 2}
    assert {j.seed for j in sliced.floor_rtt} == {2}
    assert {j.key for j in one.floor_rtt} < {j.key for j in every.floor_rtt}  # seed 0's are the same jobs
    labels = [j.label for j in every.floor_rtt]
    assert len(set(labels)) == len(labels) and "floor rtt lr3e-06 v0 s1" in labels
    with pytest.raises(ConfigError, match="floor_every_seed: 'yes' is not allowed; use true or false"):
        planned(config("rank_study_pretrained", [*where, "floor_every_seed=yes"]))
