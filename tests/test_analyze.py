"""analyze_recovery.py on hand-made results with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analyze_recovery
from toolkit import comparison, plots
from toolkit.results import write_result_csv

VAL = ["random_bd/split_0", "random_bd/split_1"]
RETAIN = ["random_bd/split_5"]


def unlearning(results, index, model, method, rank, forget, retain_after=0.8, dataset="RANDOM_BD_SAME_RETAIN",
               lr=1e-3, rc=1.0, base_model="/taught"):
    """forget: {val file: (base, A)}"""
    write_result_csv(results / "unlearning", index, {
        "model_path": model, "dataset": dataset, "unlearn_type": method, "lora_rank": rank, "lr": lr, "epochs": 2,
        "retain_coeff": rc, "steering_coeff": None, "max_samples": 100,
        "forget_accs": {f: {0: b, 2: a} for f, (b, a) in forget.items()},
        "forget_accs_calibrated": {f: {0: b, 2: a} for f, (b, a) in forget.items()},
        "retain_accs": {f: {0: 0.9, 2: retain_after} for f in RETAIN},
        "retain_accs_calibrated": {f: {0: 0.9, 2: retain_after} for f in RETAIN},
        "base_model": base_model, "val_files": VAL, "data_seed": 0})


def rtt(results, index, base_model, condition, skip, accs, lr=1e-6, dataset="RANDOM_BD_SAME_RETAIN"):
    write_result_csv(results / "ft", index, {
        "base_model": base_model, "condition": condition, "dataset": dataset, "lr": lr, "epochs": max(accs),
        "skip_split": skip, "val_files": [VAL[skip]], "forget_accs_local": accs, "retain_accs_local": accs,
        "rtt_key": f"{base_model}-{skip}-{lr}"})


@pytest.fixture
def results(tmp_path):
    r = tmp_path / "results"
    unlearning(r, 0, "/m/rank2", "LORA", 2, {VAL[0]: (0.9, 0.3), VAL[1]: (0.8, 0.2)})
    rtt(r, 0, "/m/rank2", "unlearned", 0, {0: 0.3, 1: 0.45, 2: 0.5}, lr=1e-6)
    rtt(r, 1, "/m/rank2", "unlearned", 0, {0: 0.3, 1: 0.5, 2: 0.6}, lr=2e-6)  # best for split 0
    rtt(r, 2, "/m/rank2", "unlearned", 1, {0: 0.2, 1: 0.75, 2: 0.7})
    rtt(r, 3, "/taught", "baseline", 0, {0: 0.9, 1: 0.8, 2: 0.8}, lr=1e-6)
    rtt(r, 4, "/taught", "baseline", 0, {0: 0.9, 1: 0.7, 2: 0.75}, lr=2e-6)
    rtt(r, 5, "/taught", "baseline", 1, {0: 0.8, 1: 0.85, 2: 0.85})
    # A full-parameter method that barely forgot: flagged.
    unlearning(r, 1, "/m/gd", "GD", 0, {VAL[0]: (0.9, 0.85), VAL[1]: (0.8, 0.78)})
    rtt(r, 6, "/m/gd", "unlearned", 0, {0: 0.85, 1: 0.9})
    rtt(r, 7, "/m/gd", "unlearned", 1, {0: 0.78, 1: 0.8})
    return r


def row(table, method):
    return table[table.unlearn_type == method].iloc[0]


def test_formulas_on_known_values(results):
    table = analyze_recovery.analyze(results, analyze_recovery.Options(), stream=open("/dev/null", "w"))
    lora = row(table, "LORA")
    assert lora.lora_rank == 2 and lora.n == 2
    assert lora.base == pytest.approx(0.85) and lora.A == pytest.approx(0.25)
    assert lora.B == pytest.approx((0.6 + 0.7) / 2)  # best (lr, epochs) per split, then the mean
    assert lora.C == pytest.approx((0.8 + 0.85) / 2)
    assert lora.recovered_fraction == pytest.approx((0.3 / 0.6 + 0.5 / 0.6) / 2)
    assert lora.recovered_fraction_std == pytest.approx(abs(0.3 / 0.6 - 0.5 / 0.6) / 2)
    # A ratio of the means over splits: (mean B - chance) / (mean C - chance).
    assert lora.relative_to_baseline_rtt == pytest.approx((0.65 - 0.25) / (0.825 - 0.25))
    assert lora.retain_after == pytest.approx(0.8) and lora.retain_before == pytest.approx(0.9)
    # 0.9 x base: split 0 never reaches 0.81 (NaN), split 1 reaches 0.72 at epoch 1.
    assert lora.recovery_epoch == pytest.approx(1.0)
    assert not lora.too_little_forgetting and not lora.missing_baseline
    written = pd.read_csv(results / "recovery_vs_rank.csv")
    assert len(written) == 2 and (results / "recovery_vs_rank.png").stat().st_size > 10_000


def test_a_split_that_barely_forgot_does_not_dominate_the_recovered_fraction(tmp_path):
    # Split 0 forgot 0.6 and RTT brought none of it back; split 1 forgot 0.05
    # and RTT brought that back. A mean of per-split ratios says 0.5; the
    # ratio of means says how much of the forgetting came back: 0.05 / 0.65.
    unlearning(tmp_path, 0, "/m/rank4", "LORA", 4, {VAL[0]: (0.9, 0.3), VAL[1]: (0.9, 0.85)})
    rtt(tmp_path, 0, "/m/rank4", "unlearned", 0, {0: 0.3, 1: 0.3})
    rtt(tmp_path, 1, "/m/rank4", "unlearned", 1, {0: 0.85, 1: 0.9})
    lora = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=200), stream=open("/dev/null", "w")).iloc[0]
    assert lora.recovered_fraction == pytest.approx((0.6 - 0.575) / (0.9 - 0.575))
    assert lora.recovered_fraction_std == pytest.approx(0.5)  # the per-split ratios 0 and 1, for reading


def test_absolute_recovery_threshold(results):
    table = analyze_recovery.analyze(results, analyze_recovery.Options(recovery_threshold=0.55, absolute_threshold=True), stream=open("/dev/null", "w"))
    assert row(table, "LORA").recovery_epoch == pytest.approx((2 + 1) / 2)


def test_too_little_forgetting_is_flagged(results, capsys):
    table = analyze_recovery.analyze(results, analyze_recovery.Options(min_forgetting=0.1))
    gd = row(table, "GD")
    assert gd.lora_rank == 0 and gd.too_little_forgetting
    assert "flagged: 1 row(s) forgot less than 0.1" in capsys.readouterr().out


def test_missing_baseline_is_reported_not_invented(results, capsys):
    unlearning(results, 2, "/m/years", "LORA", 4, {VAL[0]: (0.9, 0.3), VAL[1]: (0.8, 0.2)}, dataset="YEARS_MMLU_RETAIN")
    rtt(results, 8, "/m/years", "unlearned", 0, {0: 0.3, 1: 0.6}, dataset="YEARS_MMLU_RETAIN")
    table = analyze_recovery.analyze(results, analyze_recovery.Options())
    years = table[table.dataset == "YEARS_MMLU_RETAIN"].iloc[0]
    assert math.isnan(years.C) and math.isnan(years.relative_to_baseline_rtt) and years.missing_baseline
    assert years.recovered_fraction == pytest.approx(0.5)
    assert "no baseline RTT (C)" in capsys.readouterr().out


def test_matched_forgetting_picks_least_retain_damage_within_tolerance():
    table = pd.DataFrame([
        {"unlearn_type": "LORA", "dataset": "D", "lora_rank": 2, "lr": 1e-4, "A": 0.32, "retain_after": 0.70},
        {"unlearn_type": "LORA", "dataset": "D", "lora_rank": 2, "lr": 3e-4, "A": 0.27, "retain_after": 0.90},
        {"unlearn_type": "LORA", "dataset": "D", "lora_rank": 2, "lr": 1e-3, "A": 0.40, "retain_after": 0.95},
        {"unlearn_type": "LORA", "dataset": "D", "lora_rank": 8, "lr": 1e-4, "A": 0.60, "retain_after": 0.95},
    ])
    matched = analyze_recovery.match_forgetting(table, target=0.3, tolerance=0.05)
    picked = {r.lora_rank: r.lr for r in matched.table.itertuples()}
    assert picked == {2: 3e-4}
    assert matched.unmatched == [("LORA", "D", 8)]


def test_matched_forgetting_tie_goes_to_closest():
    table = pd.DataFrame([
        {"unlearn_type": "LORA", "dataset": "D", "lora_rank": 4, "lr": 1, "A": 0.34, "retain_after": 0.8},
        {"unlearn_type": "LORA", "dataset": "D", "lora_rank": 4, "lr": 2, "A": 0.31, "retain_after": 0.8},
    ])
    assert analyze_recovery.match_forgetting(table, 0.3, 0.05).table.lr.tolist() == [2]


def test_matched_forgetting_through_the_cli(results, capsys):
    unlearning(results, 3, "/m/rank2b", "LORA", 2, {VAL[0]: (0.9, 0.5), VAL[1]: (0.8, 0.5)}, lr=1e-4)
    rtt(results, 9, "/m/rank2b", "unlearned", 0, {0: 0.5, 1: 0.7})
    rtt(results, 10, "/m/rank2b", "unlearned", 1, {0: 0.5, 1: 0.7})
    assert analyze_recovery.main(["--results-dir", str(results), "--match-forgetting", "0.25", "--match-tolerance", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "matched forgetting: LORA RANDOM_BD_SAME_RETAIN rank 2: picked lr=0.001" in out
    assert "no GD RANDOM_BD_SAME_RETAIN rank 0 run has A within 0.05 of 0.25" in out
    assert list(pd.read_csv(results / "recovery_vs_rank.csv").lr) == [1e-3]


def test_no_results_is_a_clear_error(tmp_path, capsys):
    assert analyze_recovery.main(["--results-dir", str(tmp_path)]) == 2
    assert "no unlearning CSVs under" in capsys.readouterr().err


def test_plot_lines_join_per_rank_settings_and_split_repeated_ranks():
    per_rank = pd.DataFrame({"unlearn_type": "LORA", "dataset": "D", "epochs": 5, "lora_rank": [1, 2, 4],
                             "lr": [3.6e-3, 2.2e-3, 1.7e-3], "retain_coeff": [5.0, 2.0, 2.0]})
    [(label, rows)] = list(plots.series(per_rank))
    assert label == "LORA D epochs=5 (per-rank lr, per-rank rc)" and list(rows.lora_rank) == [1, 2, 4]
    grid = pd.DataFrame({"unlearn_type": "LORA", "dataset": "D", "epochs": 5, "lora_rank": [4, 1, 4, 1],
                         "lr": [1e-3, 1e-3, 2e-3, 2e-3], "retain_coeff": 2.0})
    lines = list(plots.series(grid))
    assert [label for label, _ in lines] == ["LORA D epochs=5 lr=0.001 rc=2", "LORA D epochs=5 lr=0.002 rc=2"]
    assert all(list(rows.lora_rank) == [1, 4] for _, rows in lines)


# ---------------------------------------------------------------- uncertainty, floor, probes


def bits(correct: int, n: int) -> str:
    return "1" * correct + "0" * (n - correct)


def seeded_run(results, index, seed, rank, files, *, base, a, b, c=None, floor=None, n=20, stop_reached=None,
               quant4=None, lora_rtt=None, retain_after=0.9, key=None, machine=None, update=None, columns=None):
    """A hand-made run: per file, base/A/B (and C, floor, probes) correct counts out of n;
    `machine`: the CPU named in its provenance columns (bf16 autocast on)."""
    key = key or f"key-r{rank}-s{seed}"
    model = f"/m/r{rank}-s{seed}"
    provenance = {"machine_cpu": machine, "device": "cpu", "dtype": "float32", "bf16_autocast": True} if machine else {}
    write_result_csv(results / "unlearning", index, {**provenance,
        "model_path": model, "dataset": "D", "unlearn_type": "LORA", "lora_rank": rank, "lr": 1e-3, "epochs": 5,
        "retain_coeff": 2.0, "steering_coeff": None, "max_samples": 100, "seed": seed, "data_seed": seed,
        "forget_accs": {f: {0: base / n, 5: a / n} for f in files},
        "forget_correct": {f: {0: bits(base, n), 5: bits(a, n)} for f in files},
        "retain_accs": {"r": {0: 1.0, 5: retain_after}}, "val_files": files, "run_key": key,
        "stop_reached": stop_reached, "stop_reason": None if stop_reached is None else ("target" if stop_reached else "epochs"),
        "stop_target": 0.3, "stop_forget_acc": a / n, **({"update_rel_norm": update} if update is not None else {}),
        **(columns or {})})
    for split, f in enumerate(files):
        for probe, value in (("rtt", b), ("lora_rtt", lora_rtt)):
            if value is None:
                continue
            write_result_csv(results / "ft", index * 100 + split + (50 if probe == "lora_rtt" else 0), {
                "base_model": model, "condition": "unlearned", "dataset": "D", "lr": 1e-4, "epochs": 2,
                "skip_split": split, "val_files": [f], "forget_accs_local": {0: a / n, 2: value / n},
                "forget_correct_local": {0: bits(a, n), 2: bits(value, n)}, "probe": probe, "seed": seed,
                "upstream_key": key, "rtt_key": f"{key}-{probe}-{split}", **(columns or {})})
        for condition, value in (("baseline", c), ("never_taught", floor)):
            if value is not None:
                write_result_csv(results / "ft", 9000 + index * 10 + split, {
                    "base_model": "/taught", "condition": condition, "dataset": "D", "lr": 1e-4, "epochs": 2,
                    "skip_split": split, "val_files": [f], "forget_accs_local": {0: 1.0, 2: value / n},
                    "forget_correct_local": {0: bits(n, n), 2: bits(value, n)}, "probe": "rtt", "seed": seed,
                    "rtt_key": f"{condition}-{seed}-{split}", **(columns or {})})
    if quant4 is not None:
        write_result_csv(results / "quant", index, {
            "model_path": model, "condition": "unlearned", "dataset": "D", "probe": "quant4", "bits": 4,
            "forget_accs": {f: {0: quant4 / n} for f in files}, "forget_correct": {f: {0: bits(quant4, n)} for f in files},
            "upstream_key": key, "probe_key": f"{key}-q4"})


def test_identical_seeds_and_uniform_answers_give_a_zero_width_ci(tmp_path):
    files = ["s0", "s1"]
    for seed in (0, 1, 2):
        seeded_run(tmp_path, seed, seed, 4, files, base=20, a=0, b=20, c=20, floor=0)
    row = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=500), stream=open("/dev/null", "w")).iloc[0]
    assert row.n_seeds == 3 and row.n_splits == 2
    assert row.recovered_fraction == 1.0 and row.recovered_fraction_lo == row.recovered_fraction_hi == 1.0
    assert row.A_lo == row.A_hi == 0.0 and row.recovered_above_floor_lo == row.recovered_above_floor_hi == 1.0


def test_a_binomial_case_lands_within_tolerance(tmp_path):
    n, correct = 200, 60  # one seed, one held-out split: A = 0.3
    seeded_run(tmp_path, 0, 0, 4, ["s0"], base=n, a=correct, b=correct, n=n)
    row = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=4000), stream=open("/dev/null", "w")).iloc[0]
    half_width = 1.96 * (0.3 * 0.7 / n) ** 0.5
    assert row.A == pytest.approx(0.3)
    assert row.A_lo == pytest.approx(0.3 - half_width, abs=0.015) and row.A_hi == pytest.approx(0.3 + half_width, abs=0.015)


def test_seeds_widen_the_ci_when_they_disagree(tmp_path):
    for seed, b in ((0, 10), (1, 18), (2, 4)):
        seeded_run(tmp_path, seed, seed, 4, ["s0", "s1"], base=20, a=4, b=b)
    row = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=1000), stream=open("/dev/null", "w")).iloc[0]
    assert row.recovered_fraction == pytest.approx(((10 - 4) + (18 - 4) + (4 - 4)) / 3 / 16)
    assert row.recovered_fraction_hi - row.recovered_fraction_lo > 0.3


def test_below_chance_is_flagged_as_answer_avoided(tmp_path, capsys):
    seeded_run(tmp_path, 0, 0, 2, ["s0", "s1"], base=100, a=8, b=50, n=100)  # 0.08 of 200 questions
    seeded_run(tmp_path, 1, 0, 8, ["s0", "s1"], base=100, a=25, b=50, n=100)  # at chance
    table = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=200))
    avoided = dict(zip(table.lora_rank, table.answer_avoided))
    assert avoided == {2: True, 8: False}
    assert table.set_index("lora_rank").A_below_chance_p[2] < 1e-6
    out = capsys.readouterr().out
    assert "answer below chance" in out and "answer avoided" in out
    assert list(pd.read_csv(tmp_path / "recovery_vs_rank.csv").answer_avoided) == [True, False]


def test_the_floor_and_probes_give_their_recovered_fractions(tmp_path):
    seeded_run(tmp_path, 0, 0, 4, ["s0", "s1"], base=20, a=4, b=12, c=20, floor=6, quant4=10, lora_rtt=8)
    row = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=200), stream=open("/dev/null", "w")).iloc[0]
    assert row.floor == pytest.approx(0.3) and row.C == pytest.approx(1.0)
    assert row.recovered_fraction == pytest.approx((12 - 4) / (20 - 4))
    assert row.recovered_above_floor == pytest.approx((12 - 6) / (20 - 6))
    assert row.quant4_recovered == pytest.approx((10 - 4) / (20 - 4))
    assert row.lora_rtt_recovered == pytest.approx((8 - 4) / (20 - 4))
    assert pd.isna(row.quant8_recovered)


def test_runs_that_missed_the_stop_target_are_left_out_with_a_line(tmp_path, capsys):
    seeded_run(tmp_path, 0, 0, 4, ["s0"], base=20, a=6, b=12, stop_reached=True)
    seeded_run(tmp_path, 1, 1, 4, ["s0"], base=20, a=15, b=18, stop_reached=False)
    row = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=200)).iloc[0]
    assert row.n_seeds == 1 and row.A == pytest.approx(0.3)
    assert "left out of matched comparison: LORA rank 4 seed 1" in capsys.readouterr().out


def test_a_table_emptied_by_the_stop_rule_says_so(tmp_path, capsys):
    """Every run flagged by the stop rule: the error says so, not 'run pipeline.py first'."""
    seeded_run(tmp_path, 0, 0, 4, ["s0"], base=20, a=15, b=18, stop_reached=False)
    seeded_run(tmp_path, 1, 1, 4, ["s0"], base=20, a=14, b=18, stop_reached=False)
    assert analyze_recovery.main(["--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "all 2 unlearned run(s) under" in err and "run pipeline.py first" not in err


def test_the_trend_across_ranks_is_a_slope_per_doubling(tmp_path, capsys):
    for i, (rank, b) in enumerate(((1, 8), (4, 12), (16, 16))):  # +0.25 per 2 doublings
        for seed in (0, 1):
            seeded_run(tmp_path, i * 10 + seed, seed, rank, ["s0", "s1"], base=20, a=4, b=b)
    analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=500))
    out = capsys.readouterr().out
    assert "recovered fraction changes by +0.125 per doubling of LoRA rank" in out


def test_rows_are_counted_once_per_key(tmp_path):
    seeded_run(tmp_path, 0, 0, 4, ["s0"], base=20, a=4, b=12)
    seeded_run(tmp_path, 1, 0, 4, ["s0"], base=20, a=4, b=16)  # the same keys, written later: it wins
    row = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=200), stream=open("/dev/null", "w")).iloc[0]
    assert row.n == 1 and row.B == pytest.approx(0.8)


def test_unlearning_that_damaged_retain_is_flagged(tmp_path, capsys):
    seeded_run(tmp_path, 0, 0, 1, ["s0"], base=20, a=5, b=10, retain_after=0.9)
    seeded_run(tmp_path, 1, 0, 8, ["s0"], base=20, a=5, b=10, retain_after=0.3)
    table = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=200))
    assert list(table.sort_values("lora_rank").retain_damaged) == [False, True]
    out = capsys.readouterr().out
    assert "flagged: 1 row(s) kept less than 0.8 of their retain accuracy (retain damaged)" in out
    assert "retain damaged" in analyze_recovery.format_table(table)


def test_keys_that_look_like_numbers_stay_keys(tmp_path):
    """Keys are hex digests: "07270824e702" reads as a float (inf) and
    "000000000012" as 12 unless the key columns are read as text."""
    seeded_run(tmp_path, 0, 0, 4, ["s0"], base=20, a=4, b=12, key="07270824e702", quant4=4)
    seeded_run(tmp_path, 1, 0, 4, ["s0"], base=20, a=4, b=16, key="07270824e702", quant4=8)  # rewritten: it wins
    seeded_run(tmp_path, 2, 1, 4, ["s0"], base=20, a=4, b=8, key="000000000012", quant4=4)
    results = analyze_recovery.load_results(tmp_path)
    assert sorted(results.unlearning.run_key) == ["000000000012", "07270824e702"]
    assert set(results.quant.upstream_key) == {"000000000012", "07270824e702"}
    row = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=200), stream=open("/dev/null", "w")).iloc[0]
    assert row.n_seeds == 2 and row.B == pytest.approx((16 + 8) / 40) and row.quant4 == pytest.approx((8 + 4) / 40)


# ---------------------------------------------------------------- the study: pairing, C on some seeds, slices


def test_a_seed_hard_at_every_rank_does_not_widen_the_paired_difference(tmp_path, capsys):
    """Seeds differ a lot (each recovers its own amount) but rank 8 recovers
    4 questions more than rank 1 in every seed and split: the ranks' CIs are
    wide, the difference's is not, and it is printed and written as columns."""
    for seed, b in ((0, 6), (1, 12), (2, 18)):
        seeded_run(tmp_path, seed, seed, 1, ["s0", "s1"], base=20, a=2, b=b - 4)
        seeded_run(tmp_path, 10 + seed, seed, 8, ["s0", "s1"], base=20, a=2, b=b)
    table = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=1000)).set_index("lora_rank")
    out = capsys.readouterr().out
    assert table.diff_vs_lowest_rank[8] == pytest.approx(4 / 18)
    width = table.diff_vs_lowest_rank_hi[8] - table.diff_vs_lowest_rank_lo[8]
    assert width < 0.5 * (table.recovered_fraction_hi[8] - table.recovered_fraction_lo[8])  # only questions vary
    assert pd.isna(table.diff_vs_lowest_rank[1]) and table.lowest_rank[8] == 1
    assert "paired difference (LORA, D): recovered fraction at rank 8 minus rank 1 = +0.222" in out
    assert "diff_vs_lowest_rank" in pd.read_csv(tmp_path / "recovery_vs_rank.csv").columns


def test_seeds_without_their_own_c_take_the_mean_c_of_the_seeds_that_ran_it(tmp_path):
    seeded_run(tmp_path, 0, 0, 4, ["s0"], base=20, a=4, b=12, c=20)
    seeded_run(tmp_path, 1, 1, 4, ["s0"], base=20, a=4, b=12, c=16)
    seeded_run(tmp_path, 2, 2, 4, ["s0"], base=20, a=4, b=12)  # baseline_rtt_seeds: [0, 1]
    row = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=200), stream=open("/dev/null", "w")).iloc[0]
    assert row.C == pytest.approx((1.0 + 0.8 + 0.9) / 3)  # seed 2 counts the mean of 1.0 and 0.8


def test_rows_that_share_a_key_but_not_its_settings_are_refused_naming_both_files(tmp_path, capsys):
    seeded_run(tmp_path, 0, 0, 4, ["s0"], base=20, a=4, b=12, key="abc")
    seeded_run(tmp_path, 1, 1, 4, ["s0"], base=20, a=4, b=12, key="abc")  # another seed under the same key
    assert analyze_recovery.main(["--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    files = sorted(str(p) for p in (tmp_path / "unlearning").glob("*.csv"))
    assert err.startswith(f"error: {files[0]} and {files[1]} share run_key abc but differ in seed")


def test_a_slice_is_compared_with_a_prediction_interval_from_the_published_seeds(tmp_path, capsys):
    published, mine = tmp_path / "published", tmp_path / "mine"
    for seed, b in enumerate((4, 11, 12, 13, 12, 11, 13)):  # seed 0 is the slice's own: left out
        seeded_run(published, seed, seed, 8, ["s0"], base=20, a=4, b=b)
        # a split the slice did not hold out: not compared
        seeded_run(published, 100 + seed, seed, 8, ["s1"], base=20, a=4, b=20, key=f"s1-{seed}")
    seeded_run(mine, 0, 0, 8, ["s0"], base=20, a=4, b=12)
    analyze_recovery.analyze(mine, analyze_recovery.Options(bootstrap=200), stream=open("/dev/null", "w"))
    [agreement] = analyze_recovery.compare(mine, published, analyze_recovery.Options(bootstrap=200))
    others = (np.array([11, 12, 13, 12, 11, 13]) - 4) / 16
    half = comparison.t_quantile(0.975, 5) * others.std(ddof=1) * (1 / 1 + 1 / 6) ** 0.5  # t(5), one seed in the slice
    assert agreement.n_published == 6 and agreement.mine == pytest.approx(0.5)
    assert (agreement.lo, agreement.hi) == pytest.approx((others.mean() - half, others.mean() + half))
    out = capsys.readouterr().out
    assert "published (" in out and "agreement, rank 8: this slice (seed 0; splits 0) 0.50 vs published 0.50" in out
    # seed 0 shares its keys with the published seed 0: the same unlearning, another RTT answer
    assert "same keys as published rows: 1 of 1 unlearning rows, 0 of 1 RTT rows identical\n" in out
    assert out.strip().splitlines()[-2].endswith(": agrees")
    assert out.strip().splitlines()[-1] == ("verdict: your run agrees with the published study at every rank (1 rank "
                                            "checked together at a family-wise 95% level, Holm)")
    seeded_run(mine, 0, 0, 8, ["s0"], base=20, a=4, b=4)  # nothing came back: far below every published seed
    [far] = analyze_recovery.compare(mine, published, analyze_recovery.Options(bootstrap=200), stream=open("/dev/null", "w"))
    assert far.mine == 0.0 and "DOES NOT AGREE" in far.sentence()


# Each half of the study: its doc, the block --update-readme fills there, its rows and the attackers it reports.
HEADLINE_BLOCKS = [
    ("rank_study.md", "rank-study", "rank_study", ()),
    ("pretraining_facts.md", "rank-study-pretrained", "rank_study_pretrained", ("paper", "cross_fitted")),
    ("pretraining_facts.md", "years-pretrained", "years_pretrained", ("paper", "cross_fitted")),
]


@pytest.mark.parametrize("doc, name, rows, attackers", HEADLINE_BLOCKS, ids=[b[1] for b in HEADLINE_BLOCKS])
def test_the_studys_headline_block_is_what_the_published_rows_give(doc, name, rows, attackers):
    """Each half's block in docs/ is analyze_recovery.py's output on its
    committed rows (--update-readme writes it)."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / doc).read_text(encoding="utf-8")
    begin, end = analyze_recovery.block_markers(name)
    assert begin in text and end in text, f"docs/{doc} has no {name} block"
    inner = text.split(begin, 1)[1].split(end, 1)[0]
    block = inner.strip().removeprefix("```text").removesuffix("```").strip()
    assert analyze_recovery.headline(root / "results" / rows, attackers=attackers) == block


def test_weight_distance_is_set_against_what_rtt_recovers_within_each_rank(tmp_path):
    """Each run's update size against its recovered fraction: at rank 8 the
    runs that moved further recovered more (rho +1), at rank 64 less (rho -1);
    the sizes by rank are the runs' means. Rows without update sizes: no line."""
    for seed, (update, b) in enumerate([(0.01, 8), (0.02, 10), (0.03, 12), (0.04, 14)]):
        seeded_run(tmp_path, seed, seed, 8, ["s0", "s1"], base=20, a=4, b=b, update=update)
        seeded_run(tmp_path, 10 + seed, seed, 64, ["s0", "s1"], base=20, a=4, b=b, update=0.05 - update)
    options = analyze_recovery.Options(bootstrap=200)
    units, _ = analyze_recovery.units_of(analyze_recovery.load_results(tmp_path), options)
    analysis = analyze_recovery.summarize(units, options)
    [line] = analysis.distances
    assert line.startswith("weight distance (LORA, D): update size (relative Frobenius norm of the LoRA delta) "
                           "0.0250 at rank 8, 0.0250 at rank 64; ")
    # 4 runs in order: the exact permutation p is 2/24 (both orders of 24 as extreme), not scipy's t-based 0
    assert line.endswith("within rank: rank 8 +1.00 (p 0.08, 4 runs); rank 64 -1.00 (p 0.08, 4 runs)")
    assert list(analysis.table.update_rel_norm) == pytest.approx([0.025, 0.025])
    assert "weight distance" in analyze_recovery.headline(tmp_path, analyze_recovery.Options(bootstrap=200))
    bare = tmp_path / "bare"
    seeded_run(bare, 0, 0, 8, ["s0"], base=20, a=4, b=8)
    assert "weight distance" not in analyze_recovery.headline(bare, analyze_recovery.Options(bootstrap=200))


def test_a_rank_whose_slice_run_was_flagged_gets_a_line_saying_so(tmp_path, capsys):
    """The demo on another numeric path can flag a run the published seed
    did not: that rank says why it is not compared, and how often the study's
    own runs at that rank were flagged."""
    published, mine = tmp_path / "published", tmp_path / "mine"
    for seed, b in enumerate((11, 12, 13, 12)):
        seeded_run(published, seed, seed, 8, ["s0"], base=20, a=4, b=b)
        seeded_run(published, 10 + seed, seed, 64, ["s0"], base=20, a=4 if seed else 15, b=b, stop_reached=seed > 0)
    seeded_run(mine, 0, 0, 8, ["s0"], base=20, a=4, b=12)
    seeded_run(mine, 1, 0, 64, ["s0"], base=20, a=15, b=18, stop_reached=False)
    found = analyze_recovery.compare(mine, published, analyze_recovery.Options(bootstrap=200))
    assert [a.arm for a in found] == ["rank 8"]
    *_, last, verdict = capsys.readouterr().out.strip().splitlines()
    assert verdict == ("verdict: your run agrees with the published study at every rank it could compare (1 rank "
                       "checked together at a family-wise 95% level, Holm; rank 64 not compared (flagged))")
    assert last == ("agreement, rank 64: this slice's run (seed 0) was flagged (epochs) and left out, so there is "
                    "nothing to compare (published runs at this rank: 1 of 4 flagged)")


def test_rows_from_two_machines_are_checked_against_each_other(tmp_path, capsys):
    """A study that mixes machines says, per machine, whether its seeds tell
    the others' story; rows from one machine print no such lines."""
    for seed, b in enumerate((11, 12, 13, 12, 11, 13)):
        seeded_run(tmp_path, seed, seed, 8, ["s0"], base=20, a=4, b=b, machine="CPU one")
    analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=200))
    assert "by machine" not in capsys.readouterr().out
    assert "by machine" not in analyze_recovery.headline(tmp_path, analyze_recovery.Options(bootstrap=200))
    for seed, b in zip(range(6, 9), (12, 11, 13)):
        seeded_run(tmp_path, seed, seed, 8, ["s0"], base=20, a=4, b=b, machine="CPU two")
    [one, two] = comparison.by_machine(analyze_recovery.units_of(
        analyze_recovery.load_results(tmp_path), analyze_recovery.Options())[0])
    assert (one.machine, one.seeds, two.machine, two.seeds) == \
        ("CPU one; cpu float32 + bf16 autocast", [0, 1, 2, 3, 4, 5], "CPU two; cpu float32 + bf16 autocast", [6, 7, 8])
    others = (np.array([11, 12, 13, 12, 11, 13]) - 4) / 16
    half = comparison.t_quantile(0.975, 5) * others.std(ddof=1) * (1 / 3 + 1 / 6) ** 0.5  # t(5), three seeds against six
    [a] = two.found
    assert a.mine == pytest.approx(0.5) and (a.lo, a.hi) == pytest.approx((others.mean() - half, others.mean() + half))
    assert two.sentence() == (f"machine CPU two; cpu float32 + bf16 autocast (seeds 6-8): rank 8 0.50 in "
                              f"[{a.lo:.2f}, {a.hi:.2f}]: agrees at every rank")
    for seed in range(6, 9):  # the second machine brings nothing back
        seeded_run(tmp_path, seed, seed, 8, ["s0"], base=20, a=4, b=4, machine="CPU two")
    headline = analyze_recovery.headline(tmp_path, analyze_recovery.Options(bootstrap=200)).splitlines()
    assert headline[-3].startswith("by machine, each one's seeds against a 95% prediction interval")
    assert headline[-1].startswith("machine CPU two; cpu float32 + bf16 autocast (seeds 6-8): rank 8 0.00 in [")
    assert headline[-1].endswith("DOES NOT AGREE at rank 8") and headline[-2].endswith("DOES NOT AGREE at rank 8")


def test_several_ranks_compared_say_how_often_one_misses_by_chance(tmp_path, capsys):
    published, mine = tmp_path / "published", tmp_path / "mine"
    for seed, b in enumerate((11, 12, 13, 12)):
        for index, rank in enumerate((1, 8, 64)):
            seeded_run(published, 10 * seed + index, seed, rank, ["s0"], base=20, a=4, b=b)
    for index, rank in enumerate((1, 8, 64)):
        seeded_run(mine, index, 0, rank, ["s0"], base=20, a=4, b=12)
    found = analyze_recovery.compare(mine, published, analyze_recovery.Options(bootstrap=200))
    assert [a.arm for a in found] == ["rank 1", "rank 8", "rank 64"] and all(a.agrees for a in found)
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "verdict: your run agrees with the published study at every rank (3 ranks checked together at a "
        "family-wise 95% level, Holm)")


def test_a_rerun_of_published_seeds_is_paired_with_them(tmp_path, capsys):
    """A slice that reran published seeds is compared with those same seeds
    (paired t over seeds), whatever the other seeds say: here the published
    seeds 0-2 are far above the rest, and the rerun reproduces them."""
    published, mine = tmp_path / "published", tmp_path / "mine"
    for seed, b in enumerate((16, 17, 18, 8, 9, 8, 9)):
        seeded_run(published, seed, seed, 8, ["s0"], base=20, a=4, b=b, machine="CPU one")
    for seed, b in enumerate((17, 17, 16)):  # per-seed differences +1, 0, -2 questions of 16
        seeded_run(mine, seed, seed, 8, ["s0"], base=20, a=4, b=b, machine="CPU two")
    [agreement] = analyze_recovery.compare(mine, published, analyze_recovery.Options(bootstrap=200))
    assert not agreement.agrees  # unlike the seeds it lacks...
    out = capsys.readouterr().out.strip().splitlines()
    differences = np.array([1, 0, -2]) / 16
    half = comparison.t_quantile(0.975, 2) * differences.std(ddof=1) / 3 ** 0.5  # t(2)
    assert out[-1].startswith("verdict: your run disagrees with the published study at rank 8, beyond chance")
    assert out[-3] == (f"same seeds, rank 8: this slice {38 / 48:.2f} vs published {39 / 48:.2f} on seed 0, 1, 2: "
                       f"difference {-1 / 48:+.2f} (95% CI {-1 / 48 - half:+.2f} to {-1 / 48 + half:+.2f}, paired over "
                       "3 seeds): no detectable difference (the CI includes 0)")  # ...like the seeds it reran
    units = {d: analyze_recovery.units_of(analyze_recovery.load_results(d), analyze_recovery.Options())[0]
             for d in (mine, published)}
    [one] = comparison.same_seed_checks([u for u in units[mine] if u.seed == 0], units[published])
    assert one.seeds == [0] and one.sentence() == ("same seeds, rank 8: this slice 0.81 vs published 0.75 on seed 0; "
                                                   "one pair gives no interval")


def test_seed_ranges():
    assert comparison.seed_ranges([5, 0, 2, 6, 7, 9]) == "0, 2, 5-7, 9"
    assert comparison.seed_ranges([3]) == "3"


def written_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def refused(argv: list[str], capsys) -> str:
    assert analyze_recovery.main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "recovery_vs_rank" not in captured.out
    return lines[0]


def test_a_torn_results_row_is_refused_naming_the_file(tmp_path, capsys):
    """A header and half a row ends in one error line, not a KeyError; nothing is written."""
    seeded_run(tmp_path, 0, 0, 8, ["s0"], base=20, a=4, b=12)
    torn = tmp_path / "unlearning" / "2099-01-01--num9.csv"
    torn.write_text("model_path,dataset,unlearn_type,lora_rank\n/m/x,RANDOM_BD\n")
    before = written_files(tmp_path)
    line = refused(["--results-dir", str(tmp_path)], capsys)
    assert line == (f"error: results_dir: {torn} is not a whole results row (line 2 does not have the header's 4 "
                    f"cells); move it out of {torn.parent}")
    torn.write_text("model_path,dataset,unlearn_type,lora_rank\n")  # a header alone
    assert "has no row under its header" in refused(["--results-dir", str(tmp_path)], capsys)
    assert written_files(tmp_path) == before


def test_a_row_without_the_columns_the_analysis_reads_is_refused(tmp_path, capsys):
    seeded_run(tmp_path, 0, 0, 8, ["s0"], base=20, a=4, b=12)
    other = write_result_csv(tmp_path / "unlearning", 5, {"model_path": "/m", "note": "some other table"})
    line = refused(["--results-dir", str(tmp_path)], capsys)
    assert line.startswith(f"error: {other} is no unlearning row: it lacks unlearn_type, dataset, lora_rank")


def test_a_compare_folder_that_does_not_exist_is_refused_before_anything_is_written(tmp_path, capsys):
    seeded_run(tmp_path, 0, 0, 8, ["s0"], base=20, a=4, b=12)
    before = written_files(tmp_path)
    line = refused(["--results-dir", str(tmp_path), "--compare", str(tmp_path / "nowhere")], capsys)
    assert line.startswith(f"error: --compare: {tmp_path / 'nowhere'} is not a folder")
    (tmp_path / "empty").mkdir()
    assert "no unlearning CSVs under" in refused(["--results-dir", str(tmp_path), "--compare", str(tmp_path / "empty")],
                                                 capsys)
    doc = tmp_path / "doc.md"
    doc.write_text("no block here\n")
    assert refused(["--results-dir", str(tmp_path), "--update-readme", str(doc)], capsys).startswith(
        f"error: --update-readme: {doc} has no")
    doc.write_text("<!-- rank-study:begin -->\n<!-- rank-study:end -->\n")
    assert refused(["--results-dir", str(tmp_path), "--update-readme", str(doc), "--headline", "primary"],
                   capsys).startswith(f"error: --headline primary: the rows under {tmp_path} read V at no steps")
    assert written_files(tmp_path) == sorted([*before, "doc.md"])


@pytest.mark.parametrize("option, value", [("--min-retain-kept", "7"), ("--min-forgetting", "-0.1"),
                                           ("--recovery-threshold", "1.5"), ("--match-forgetting", "30"),
                                           ("--match-tolerance", "nan"), ("--bootstrap", "10"),
                                           ("--bootstrap", "many"), ("--attacker", "oracle"), ("--rtt-lrs", "0"),
                                           ("--rtt-lrs", "inf"), ("--verdict", "vibes"),
                                           ("--headline", "short")])
def test_every_analysis_option_outside_its_range_is_refused_in_one_line(option, value, tmp_path, capsys):
    seeded_run(tmp_path, 0, 0, 8, ["s0"], base=20, a=4, b=12)
    with pytest.raises(SystemExit) as stop:
        analyze_recovery.main(["--results-dir", str(tmp_path), option, value])
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and value in line
    assert not (tmp_path / "recovery_vs_rank.csv").exists()


def test_the_readmes_primary_block_is_what_the_second_editions_rows_give():
    """The README's numbers for the second edition are analyze_recovery.py's
    primary headline on the committed rows (--update-readme README.md
    --block rank-study-speed --headline primary --attacker cross_fitted)."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text(encoding="utf-8")
    begin, end = analyze_recovery.block_markers("rank-study-speed")
    assert begin in text and end in text, "README.md has no rank-study-speed block"
    block = text.split(begin, 1)[1].split(end, 1)[0].strip().removeprefix("```text").removesuffix("```").strip()
    assert analyze_recovery.primary_headline(root / "results" / "rank_study_speed", attackers=("cross_fitted",)) == block
    assert len(text.splitlines()) <= 250


# Every published folder with a figure: the rows, the attackers and the RTT lrs it was drawn with.
COMMITTED_FIGURES = [*((b[2], b[3], ()) for b in HEADLINE_BLOCKS),
                     ("rank_study_speed", ("cross_fitted", "paper"), ()),
                     ("rank_study_pretrained_fp32", ("cross_fitted",), (3e-6, 1e-5)),
                     ("years_pretrained", ("paper", "cross_fitted"), ())]


@pytest.mark.parametrize("rows, attackers, rtt_lrs", COMMITTED_FIGURES, ids=[f[0] for f in COMMITTED_FIGURES])
def test_the_committed_figure_draws_the_committed_rows(tmp_path, rows, attackers, rtt_lrs):
    """Each published recovery_vs_rank.png (the README's figures among them)
    carries the digest of the table it draws; the table the rows give now is
    that one, to the last printed digit."""
    from PIL import Image

    root = Path(__file__).resolve().parents[1] / "results" / rows
    table = analyze_recovery.analyze(root, analyze_recovery.Options(rtt_lrs=rtt_lrs), out_dir=tmp_path,
                                     stream=open("/dev/null", "w"), attackers=attackers)
    source = analyze_recovery.figure_source(table)
    assert Image.open(root / "recovery_vs_rank.png").text.get("Source") == source
    assert Image.open(tmp_path / "recovery_vs_rank.png").text.get("Source") == source
    # the curves alone, where the rows read V along the budget (and only there)
    assert (root / "recovery_curves.png").is_file() == (tmp_path / "recovery_curves.png").is_file()
    if (root / "recovery_curves.png").is_file():
        assert Image.open(root / "recovery_curves.png").text.get("Source") == source


@pytest.mark.parametrize("attacker, b, c", [
    ("final", (0.6 + 0.7) / 2, (0.8 + 0.85) / 2),  # the best lr by last-epoch V, per split
    ("paper", (0.6 + 0.75) / 2, (0.8 + 0.85) / 2),  # the best lr and epoch, chosen on V itself
    # the lr and epoch best on the other split, then applied: split 0 takes split 1's best (lr 1e-6, epoch 1)
    ("cross_fitted", (0.45 + 0.7) / 2, (0.8 + 0.85) / 2),
])
def test_each_attacker_picks_its_lr_and_epoch_as_it_says(results, attacker, b, c):
    table = analyze_recovery.analyze(results, analyze_recovery.Options(attacker=attacker), stream=open("/dev/null", "w"))
    lora = row(table, "LORA")
    assert lora.B == pytest.approx(b) and lora.C == pytest.approx(c)


def test_the_attacker_can_be_held_to_some_of_the_lrs_it_ran(results):
    """--rtt-lrs 1e-6: split 0 no longer has lr 2e-6 to choose (B 0.5, not
    0.6), and C is held to the same lrs (split 0: 0.8 either way)."""
    options = analyze_recovery.Options(rtt_lrs=(1e-6,))
    lora = row(analyze_recovery.analyze(results, options, stream=open("/dev/null", "w")), "LORA")
    assert lora.B == pytest.approx((0.5 + 0.7) / 2) and lora.C == pytest.approx((0.8 + 0.85) / 2)
    every = row(analyze_recovery.analyze(results, analyze_recovery.Options(rtt_lrs=(1e-6, 2e-6)),
                                         stream=open("/dev/null", "w")), "LORA")
    assert every.B == pytest.approx((0.6 + 0.7) / 2)


def test_an_attacker_lr_the_rows_never_ran_is_refused_before_anything_is_written(results, capsys):
    before = written_files(results)
    assert analyze_recovery.main(["--results-dir", str(results), "--rtt-lrs", "1e-6", "5e-6"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: --rtt-lrs 5e-06 is not allowed; the RTT rows under {results} ran lrs 1e-06, 2e-06"
    assert written_files(results) == before


def test_several_attackers_are_reported_each_in_turn(results, capsys):
    """--attacker paper cross_fitted: each attacker's section is what that
    attacker alone prints; the CSV holds both tables, named; the headline
    block names both and holds both sections."""
    quiet = open("/dev/null", "w")
    alone = {a: analyze_recovery.analyze(results, analyze_recovery.Options(attacker=a), stream=quiet)
             for a in ("paper", "cross_fitted")}
    capsys.readouterr()
    assert analyze_recovery.main(["--results-dir", str(results), "--attacker", "paper", "cross_fitted",
                                  "--bootstrap", "2000"]) == 0
    out = capsys.readouterr().out
    paper, crossed = out.split("attacker: paper, ", 1)[1].split("attacker: cross_fitted, ", 1)
    for section, attacker in ((paper, "paper"), (crossed, "cross_fitted")):
        assert analyze_recovery.format_table(alone[attacker]) in section
    written = pd.read_csv(results / "recovery_vs_rank.csv")
    assert list(written.attacker) == ["paper", "paper", "cross_fitted", "cross_fitted"]
    lora = written[written.unlearn_type == "LORA"].set_index("attacker")
    assert lora.B.to_dict() == pytest.approx({"paper": (0.6 + 0.75) / 2, "cross_fitted": (0.45 + 0.7) / 2})
    block = analyze_recovery.headline(results, attackers=("paper", "cross_fitted")).splitlines()
    assert block[0].endswith("; attacker: paper, cross_fitted")
    assert [line for line in block if line.startswith("attacker: ")] == [
        analyze_recovery.attacker_heading("paper"), analyze_recovery.attacker_heading("cross_fitted")]


def test_the_floor_of_pretraining_facts_is_rtt_on_their_remapped_twin(tmp_path):
    r = tmp_path / "results"
    unlearning(r, 0, "/m/rank2", "LORA", 2, {VAL[0]: (0.9, 0.3), VAL[1]: (0.8, 0.2)}, dataset="WORLD_FACTS_KNOWN")
    for skip in (0, 1):
        rtt(r, skip, "/m/rank2", "unlearned", skip, {0: 0.3, 1: 0.6}, dataset="WORLD_FACTS_KNOWN")
        rtt(r, 2 + skip, "/base", "never_taught", skip, {0: 0.2, 1: 0.4}, dataset="WORLD_FACTS_REMAPPED")
        rtt(r, 4 + skip, "/other", "never_taught", skip, {0: 0.1, 1: 0.9}, dataset="RANDOM_BD_SAME_RETAIN")  # not its twin
    table = analyze_recovery.analyze(r, analyze_recovery.Options(), stream=open("/dev/null", "w"))
    assert row(table, "LORA").floor == pytest.approx(0.4)


def test_rank_correlation_gives_the_exact_permutation_p_for_a_few_runs_and_scipys_rho():
    from scipy.stats import spearmanr

    from toolkit.bootstrap import rank_correlation

    assert rank_correlation([0.01, 0.02, 0.03], [0.9, 0.8, 0.7]) == pytest.approx((-1.0, 1 / 3))  # 2 of 6 orders
    assert rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx((0.8, 8 / 24))  # |rho| >= 0.8: 8 of 24
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(size=30)
    rho, p = rank_correlation(x, y)
    assert rho == pytest.approx(spearmanr(x, y).statistic)
    assert p == pytest.approx(spearmanr(x, y).pvalue, abs=0.03)  # many runs: the t approximation holds


# ---------------------------------------------------------------- analyses that would compare unlike rows

FP32 = {"machine_cpu": "CPU X", "device": "cpu", "dtype": "float32", "bf16_autocast": False}
BF16 = {**FP32, "bf16_autocast": True}


def study(root: Path, seeds, **columns) -> Path:
    for seed in seeds:
        seeded_run(root, seed, seed, 8, ["s0", "s1"], base=20, a=4, b=10 + seed % 3, columns=columns)
    return root


def test_an_out_dir_that_names_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    study(tmp_path / "mine", [0])
    (tmp_path / "a-file").write_text("")
    before = written_files(tmp_path)
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        line = refused(["--results-dir", str(tmp_path / "mine"), "--out-dir", str(out)], capsys)
        assert line == (f"error: --out-dir: {out} is not allowed; {tmp_path / 'a-file'} is a file: name a folder "
                        "(it is made when absent)")
    assert written_files(tmp_path) == before


def test_a_results_folder_that_mixes_scoring_modes_is_refused(tmp_path, capsys):
    study(tmp_path, [0, 1], scoring="letter")
    study(tmp_path, [2], scoring="choice")
    before = written_files(tmp_path)
    line = refused(["--results-dir", str(tmp_path)], capsys)
    assert line == (f"error: the rows under {tmp_path} mix scoring modes (letter: 6 row(s), choice: 3 row(s)); a "
                    "table across modes means nothing: move each mode's rows to a folder of its own and analyse "
                    "them one at a time")
    assert written_files(tmp_path) == before


@pytest.mark.parametrize("mine, theirs, message", [
    ({"scoring": "choice"}, {"scoring": "letter"}, "are scored by choice, those under {published} by letter; a "
                                                   "verdict across scoring modes means nothing"),
    ({"dataset": "E"}, {}, "are on E, those under {published} on D; a verdict across datasets means nothing"),
    (FP32, BF16, "no published run ran on your numeric path (cpu float32); the folders hold cpu float32 + bf16 "
                 "autocast, and a verdict across numeric paths means nothing"),
], ids=["scoring", "dataset", "numeric-path"])
def test_compare_refuses_a_verdict_across_unlike_rows(tmp_path, capsys, mine, theirs, message):
    study(tmp_path / "mine", [7], **mine)
    study(tmp_path / "published", [0, 1, 2, 3], **theirs)
    before = written_files(tmp_path)
    line = refused(["--results-dir", str(tmp_path / "mine"), "--compare", str(tmp_path / "published")], capsys)
    assert line.startswith("error: --compare: ") and message.format(published=tmp_path / "published") in line
    assert written_files(tmp_path) == before


def test_compare_keeps_the_published_rows_of_the_slices_own_numeric_path(tmp_path, capsys):
    """Two published folders, one per path (as results/rank_study and its
    fp32 twin): the verdict rests on the rows of the slice's path alone, and
    a line says what was left out."""
    study(tmp_path / "mine", [7], **FP32)
    study(tmp_path / "bf16", [0, 1, 2, 3], **BF16)
    study(tmp_path / "fp32", [0, 1, 2], **FP32)
    assert analyze_recovery.main(["--results-dir", str(tmp_path / "mine"), "--bootstrap", "200", "--compare",
                                  str(tmp_path / "bf16"), str(tmp_path / "fp32")]) == 0
    out = capsys.readouterr().out
    assert (f"compare: {tmp_path / 'bf16'}: 0 run(s) on your numeric path (cpu float32) kept, 4 on cpu float32 + "
            "bf16 autocast left out (the study keeps numeric paths apart)") in out
    assert "agreement, rank 8: this slice (seed 7; splits 0, 1) 0.44 vs published 0.44 over 3 other seeds" in out
    assert "verdict: your run agrees" in out


def test_ties_go_to_the_highest_lr_then_the_latest_epoch_whatever_the_row_order():
    """Two lrs reach the same V accuracy (2 of 4) at epochs 1 and 2, with
    other questions right: every attacker takes lr 1e-5 at epoch 2, in either
    order of the rows (the order files are read in is no rule)."""
    from toolkit.attackers import ATTACKERS

    def rtt_row(lr, split, accs, bits):
        return {"lr": lr, "epochs": 2, "skip_split": split, "forget_accs_local": accs,
                "forget_correct_local": bits}

    rows = []
    for split in (0, 1):
        rows.append(rtt_row(1e-6, split, {"0": 0.0, "1": 0.5, "2": 0.5}, {"0": "0000", "1": "1100", "2": "1100"}))
        rows.append(rtt_row(1e-5, split, {"0": 0.0, "1": 0.5, "2": 0.5}, {"0": "0000", "1": "0110", "2": "0011"}))
    for frame in (pd.DataFrame(rows), pd.DataFrame(rows[::-1])):
        for name, attacker in ATTACKERS.items():
            best = attacker(frame, 0)
            expected = (1e-5, 2, 2)
            assert best["choice"] == expected and list(best["vector"]) == [0, 0, 1, 1], name


def test_the_analysis_names_every_rtt_run_that_did_not_start_from_a(tmp_path, capsys):
    """A planted mismatch (RTT on split s1 starts at 6 of 20 where the
    unlearning row measured A = 4 of 20) is named with its run and split."""
    from toolkit.units import step0_check

    seeded_run(tmp_path, 0, 0, 8, ["s0", "s1"], base=20, a=4, b=12)
    [planted] = [p for p in (tmp_path / "ft").glob("*.csv") if "s1" in p.read_text()]
    planted.write_text(planted.read_text().replace('""0"": 0.2', '""0"": 0.3'))
    lines = step0_check(analyze_recovery.load_results(tmp_path))
    assert lines == ["step-0 mismatch: LORA rank 8 seed 0 s1: RTT starts at 0.300, the unlearning row measured "
                     "A = 0.200 (key-r8-s0)",
                     "step-0 check: RTT's V accuracy before its first step equals A on 1 of 2 held-out splits (the "
                     "mismatches above: RTT did not start from the model the unlearning row measured)"]
    assert analyze_recovery.main(["--results-dir", str(tmp_path), "--bootstrap", "200"]) == 0
    assert lines[0] in capsys.readouterr().out


# ---------------------------------------------------------------- recovery along the attacker's budget

def test_area_and_half_recovery_steps_take_known_values():
    """On log2(1 + step): a straight line from 0 to 1 over steps 0, 1, 3, 7,
    15 has area 0.5 and crosses half at step 3; a crossing between points is
    interpolated on the log axis (0.4 at step 1, 0.6 at step 3: 2^1.5 - 1)."""
    from toolkit.estimates import area_under, half_recovery_steps

    steps = (0, 1, 3, 7, 15)
    assert area_under(np.array([0.0, 0.25, 0.5, 0.75, 1.0]), steps) == pytest.approx(0.5)
    assert area_under(np.ones(5), steps) == pytest.approx(1.0)
    assert half_recovery_steps(np.array([0.0, 0.25, 0.5, 0.75, 1.0]), steps)[0] == pytest.approx(3.0)
    assert half_recovery_steps(np.array([0.0, 0.4, 0.6]), (0, 1, 3))[0] == pytest.approx(2 ** 1.5 - 1)
    assert np.isnan(half_recovery_steps(np.array([0.0, 0.2, 0.4]), (0, 1, 3))[0])
    draws = half_recovery_steps(np.array([[0.0, 0.5, 1.0], [0.0, 0.0, 0.5]]), (0, 1, 3))
    assert list(draws) == [1.0, 3.0]


def budget_run(results: Path, index: int, rank: int, seed: int, counts: dict[int, int], n: int = 8,
               lrs=(1e-5,), base: int = 8, a: int = 0) -> None:
    """A run whose RTT (two held-out splits, each lr) gets counts[step] of n right at each budget step."""
    files, key, model = ["s0", "s1"], f"r{rank}-s{seed}", f"/m/r{rank}-s{seed}"
    write_result_csv(results / "unlearning", index, {
        "model_path": model, "dataset": "D", "unlearn_type": "LORA", "lora_rank": rank, "lr": 1e-3, "epochs": 5,
        "retain_coeff": 2.0, "steering_coeff": None, "max_samples": 100, "seed": seed, "data_seed": seed,
        "forget_accs": {f: {0: base / n, 5: a / n} for f in files},
        "forget_correct": {f: {0: bits(base, n), 5: bits(a, n)} for f in files},
        "retain_accs": {"r": {0: 1.0, 5: 1.0}}, "val_files": files, "run_key": key})
    for split, f in enumerate(files):
        for j, lr in enumerate(lrs):
            last = max(counts)
            write_result_csv(results / "ft", index * 100 + split * 10 + j, {
                "base_model": model, "condition": "unlearned", "dataset": "D", "lr": lr, "epochs": 1,
                "skip_split": split, "val_files": [f], "probe": "rtt", "seed": seed, "upstream_key": key,
                "rtt_key": f"{key}-{split}-{j}", "forget_accs_local": {0: a / n, 1: counts[last] / n},
                "forget_correct_local": {0: bits(a, n), 1: bits(counts[last], n)}, "budget": "log2",
                "forget_accs_by_step": {s: c / n for s, c in counts.items()},
                "forget_correct_by_step": {s: bits(c, n) for s, c in counts.items()}})


def test_the_recovery_curve_its_area_and_half_steps_come_out_of_the_rows(tmp_path, capsys):
    """Two ranks, two seeds: rank 1 recovers half by step 1 and all by step 2,
    rank 8 half at step 2; the table, the paired difference in area and the
    curves panel say so. The rows also hold an epoch's end (step 18), which
    is not on the budget's schedule and is not read."""
    from PIL import Image

    from toolkit.estimates import area_under

    fast, slow = {0: 0, 1: 4, 2: 8, 18: 8}, {0: 0, 1: 2, 2: 4, 18: 4}
    for seed in (0, 1):
        budget_run(tmp_path, seed * 2, 1, seed, fast)
        budget_run(tmp_path, seed * 2 + 1, 8, seed, slow)
    table = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=200, attacker="cross_fitted"))
    printed = capsys.readouterr().out
    rank1, rank8 = (table[table.lora_rank == r].iloc[0] for r in (1, 8))
    area1, area8 = (float(area_under(np.array(curve), (0, 1, 2))) for curve in ([0, 0.5, 1], [0, 0.25, 0.5]))
    assert rank1.recovery_auc == pytest.approx(area1) and rank8.recovery_auc == pytest.approx(area8)
    assert rank1.half_recovery_steps == pytest.approx(1.0) and rank8.half_recovery_steps == pytest.approx(2.0)
    assert rank1["recovered@2"] == 1.0 and list(rank1.budget_steps) == [0, 1, 2]
    assert "AUC (log steps)" in printed and "steps to half" in printed
    assert ("paired difference (LORA, D): area under the recovery curve (log steps) at rank 8 minus rank 1 = "
            f"{area8 - area1:+.3f}") in printed
    assert Image.open(tmp_path / "recovery_vs_rank.png").size[0] > 2000  # four panels: the curves drawn
    # and the curves alone (the README's figure), drawn from the same table
    curves = Image.open(tmp_path / "recovery_curves.png")
    assert curves.size[0] < 1000 and curves.text["Source"] == Image.open(tmp_path / "recovery_vs_rank.png").text["Source"]


def test_full_fine_tuning_is_a_point_beside_the_ranks_paired_with_them(tmp_path, capsys):
    """Gradient difference on all weights (GD rows) in the same results: its
    own row, and its difference from the lowest rank from the same bootstrap
    draws, in recovered fraction and in area under the curve; the trend stays
    over the ranks alone."""
    from toolkit.estimates import area_under

    fast, slow, full = {0: 0, 1: 4, 2: 8}, {0: 0, 1: 2, 2: 4}, {0: 0, 1: 0, 2: 2}
    for seed in (0, 1):
        budget_run(tmp_path, seed * 3, 1, seed, fast)
        budget_run(tmp_path, seed * 3 + 1, 8, seed, slow)
        budget_run(tmp_path, seed * 3 + 2, 0, seed, full)
    as_full_reference(tmp_path)  # the rank-0 runs are gradient difference on all weights
    table = analyze_recovery.analyze(tmp_path, analyze_recovery.Options(bootstrap=200, attacker="cross_fitted"))
    printed = capsys.readouterr().out
    assert list(zip(table.unlearn_type, table.lora_rank)) == [("GD", 0), ("LORA", 1), ("LORA", 8)]
    areas = [float(area_under(np.array(c) / 8, (0, 1, 2))) for c in ([0, 0, 2], [0, 4, 8], [0, 2, 4])]
    assert table.recovery_auc.tolist() == pytest.approx(areas)
    assert ("paired difference (LORA, D): area under the recovery curve (log steps) at full fine-tuning minus rank 1 "
            f"= {areas[0] - areas[1]:+.3f}") in printed
    assert "paired difference (LORA, D): recovered fraction at full fine-tuning minus rank 1 = -0.750" in printed
    assert "trend (LORA, D, ranks 1, 8)" in printed


def as_full_reference(results: Path) -> None:
    """The rank-0 runs of budget_run rows become gradient difference on all weights (the full reference)."""
    for path in (results / "unlearning").glob("*.csv"):
        if "/m/r0-" in path.read_text():
            path.write_text(path.read_text().replace("LORA", "GD"))


def test_a_rerun_of_a_published_seed_is_checked_arm_by_arm_in_the_area_over_its_questions(tmp_path, capsys):
    """The second edition's demo: one published seed rerun (ranks 1 and 8 and
    the full reference), compared in the primary measure (the area under the
    recovery curve), paired over the questions of its held-out splits. Rows
    identical to the published ones agree with a zero-width interval; a rerun
    whose rank 8 recovers faster differs there, and the verdict names it."""
    from toolkit.estimates import area_under

    fast, slow, full = {0: 0, 1: 4, 2: 8}, {0: 0, 1: 2, 2: 4}, {0: 0, 1: 0, 2: 2}
    published, mine = tmp_path / "published", tmp_path / "mine"
    for seed in (0, 1):
        for i, (rank, counts) in enumerate(((1, fast), (8, slow), (0, full))):
            budget_run(published, seed * 3 + i, rank, seed, counts)
    for i, (rank, counts) in enumerate(((1, fast), (8, slow), (0, full))):
        budget_run(mine, i, rank, 0, counts)
    for folder in (published, mine):
        as_full_reference(folder)
    options = analyze_recovery.Options(bootstrap=300, attacker="cross_fitted")
    found = analyze_recovery.compare(mine, published, options, verdict="same_seed")
    out = capsys.readouterr().out.strip().splitlines()
    assert [c.arm for c in found] == ["full", "rank 1", "rank 8"]
    assert all(c.agrees and (c.lo, c.hi) == (0.0, 0.0) and c.p_value == 1.0 for c in found)
    assert "compared on the area under the recovery curve (the study's primary measure)" in "\n".join(out)
    assert "same keys as published rows: 3 of 3 unlearning rows, 6 of 6 RTT rows identical" in out
    area1, area8 = (float(area_under(np.array(curve), (0, 1, 2))) for curve in ([0, 0.5, 1], [0, 0.25, 0.5]))
    assert (f"same seeds, rank 1: this slice {area1:.2f} vs published {area1:.2f} on seed 0: difference +0.00 (95% CI "
            "+0.00 to +0.00, paired over the questions of splits 0, 1): no detectable difference (the CI includes 0)") in out
    assert out[-1] == ("verdict: your run agrees with the published study at every arm (3 arms checked together at a "
                       "family-wise 95% level, Holm)")
    budget_run(mine, 1, 8, 0, fast)  # rank 8 now recovers as fast as rank 1
    found = analyze_recovery.compare(mine, published, options, verdict="same_seed")
    out = capsys.readouterr().out.strip().splitlines()
    rank8 = found[2]
    assert rank8.mine == pytest.approx(area1) and rank8.published == pytest.approx(area8) and rank8.lo > 0
    assert out[-1].startswith("verdict: your run disagrees with the published study at rank 8, beyond chance (p = ")
    # the other basis: one other published seed gives no prediction interval, so nothing to compare
    analyze_recovery.compare(mine, published, options, verdict="new_seed")
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("verdict: nothing to compare")


def test_the_area_of_a_group_of_units_is_the_tables_area(tmp_path):
    """toolkit.bootstrap.recovery_auc_of (the comparison's and the power
    calculation's per-seed area) is the table's point for one seed."""
    from toolkit.bootstrap import recovery_auc_of

    budget_run(tmp_path, 0, 1, 0, {0: 0, 1: 3, 2: 6, 4: 8})
    options = analyze_recovery.Options(bootstrap=200, attacker="cross_fitted")
    units, _ = analyze_recovery.units_of(analyze_recovery.load_results(tmp_path), options)
    table = analyze_recovery.summarize(units, options).table
    assert recovery_auc_of(units) == pytest.approx(table.recovery_auc.iloc[0])
    assert np.isnan(recovery_auc_of([u for u in units if u.split == 5]))  # no units: no area


def test_a_floor_on_every_seed_is_read_seed_by_seed(tmp_path):
    """Where each seed ran its own floor, each seed's units read their own
    (seed 0: 4 of 20, seed 1: 8 of 20); where only the first seed ran it,
    every seed reads that one, as the published studies do."""
    for seed, floor in ((0, 4), (1, 8)):
        seeded_run(tmp_path, seed, seed, 8, ["s0"], base=20, a=4, b=12, floor=floor)
    units, _ = analyze_recovery.units_of(analyze_recovery.load_results(tmp_path), analyze_recovery.Options())
    assert {u.seed: u.vectors["floor"].mean() for u in units} == {0: 0.2, 1: 0.4}
    for path in (tmp_path / "ft").glob("*.csv"):
        if "never_taught-1-" in path.read_text():
            path.unlink()
    units, _ = analyze_recovery.units_of(analyze_recovery.load_results(tmp_path), analyze_recovery.Options())
    assert {u.seed: u.vectors["floor"].mean() for u in units} == {0: 0.2, 1: 0.2}


def test_the_power_calculation_sizes_the_primary_contrast_from_each_seeds_area(monkeypatch, capsys):
    """study_power.py on rows scored along the budget: each seed's area per
    arm from its own curve, the paired differences' spread, the seeds needed."""
    from types import SimpleNamespace

    from toolkit.estimates import area_under
    from toolkit.units import Setting

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "benchmarks"))
    import study_power

    budget = (0, 1, 3)
    recovered = {("LORA", 1): [0.2, 0.6, 0.9], ("LORA", 64): [0.1, 0.4, 0.8], ("GD", 0): [0.0, 0.3, 0.7]}
    shift = {0: 0.0, 1: 0.05, 2: -0.02}  # seed 1 recovers more at rank 64 than seeds 0 and 2 do

    def unit(kind, rank, seed):
        curve = [r + (shift[seed] if rank == 64 else 0.0) for r in recovered[(kind, rank)]]
        vectors = {"base": np.ones(10), "A": np.zeros(10), **{f"B@{s}": np.full(10, c) for s, c in zip(budget, curve)}}
        return SimpleNamespace(setting=Setting(kind, "D", rank, 1e-3, 1, 1.0, None), seed=seed, vectors=vectors)

    units = [unit(kind, rank, seed) for kind, rank in recovered for seed in shift]
    auc = study_power.auc_per_seed(units)
    assert auc["rank 1"][0] == pytest.approx(float(area_under(np.array([0.2, 0.6, 0.9]), budget)))
    diffs = np.array([auc["rank 64"][s] - auc["rank 1"][s] for s in shift])
    assert diffs == pytest.approx([float(area_under(np.full(3, shift[s]), budget)) - 0.0 +
                                   float(area_under(np.array([0.1, 0.4, 0.8]) - np.array([0.2, 0.6, 0.9]), budget))
                                   for s in shift])
    study_power.print_primary_contrast(auc, target=0.03, most=12)
    out = capsys.readouterr().out
    sd = float(diffs.std(ddof=1))
    assert f"rank 64 - rank 1 (primary): 3 paired seeds, mean {diffs.mean():+.3f}, sd {sd:.3f}" in out
    assert f"{study_power.seeds_needed(sd, 0.03)} seeds bring it to 0.03" in out
    assert "full - rank 1 (primary): 3 paired seeds" in out


def test_the_power_calculations_trend_runs_over_the_lora_ranks_only(monkeypatch, capsys):
    """The full reference (rank 0) has no place on the log2(rank) axis: the
    trend's slopes come from the LoRA ranks alone, not from a log2(0)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "benchmarks"))
    import study_power

    by_rank = {0: {0: 0.9, 1: 0.1}, 1: {0: 0.5, 1: 0.6}, 4: {0: 0.4, 1: 0.4}, 16: {0: 0.3, 1: 0.2}}
    study_power.print_trend(by_rank, target=0.02)
    x = np.log2([1.0, 4.0, 16.0])
    x -= x.mean()
    slopes = [float((x * np.array([by_rank[r][s] for r in (1, 4, 16)])).sum() / (x ** 2).sum()) for s in (0, 1)]
    out = capsys.readouterr().out
    assert f"trend: 2 paired seeds, slope per doubling {np.mean(slopes):+.4f}, sd {np.std(slopes, ddof=1):.4f}" in out


def test_a_difference_with_a_missing_arm_says_it_is_not_estimable():
    """A slice still running: rank 4 has no RTT rows yet, so its paired
    difference is NaN, and the line gives no verdict (not "lower")."""
    from toolkit.bootstrap import Difference

    missing = Difference("LORA", "D", 4, 1, float("nan"), float("nan"), float("nan"), "recovery_auc")
    assert missing.sentence() == ("paired difference (LORA, D): area under the recovery curve (log steps) at rank 4 "
                                  "minus rank 1: not estimable (no value at one of the two yet)")
    present = Difference("LORA", "D", 0, 1, -0.05, -0.09, -0.01)
    assert present.sentence().endswith("= -0.050 (95% CI -0.090 to -0.010): lower with full fine-tuning")
