"""How much of what unlearning removed comes back, and how does that change
with LoRA rank?

Reads the pipeline's CSVs (`unlearning/`, `ft/`, `quant/`) and, for every
unlearned model and held-out split V, takes these accuracies on V:

  base   before unlearning
  A      after unlearning
  B      after unlearning, then RTT (all weights)       best (lr, epochs) per split
  C      RTT from the pre-unlearning model (baseline)   best per split, same seed
  floor  RTT from the never-taught model               best per split
  probes B with a LoRA attacker (lora_rtt); A after 8- and 4-bit quantization (quant8, quant4)

  recovered_fraction       = (B - A) / (base - A)
  recovered_above_floor    = (B - floor) / (base - floor)
  relative_to_baseline_rtt = (B - chance) / (C - chance)
  {probe}_recovered        = (probe - A) / (base - A)

Rows are one unlearning setting (method, dataset, rank, lr, epochs, retain
and steering coefficients), averaged over seeds and held-out splits; a ratio
is taken of those means (not averaged over per-split ratios, whose
denominators rest on a few questions each). 95%
confidence intervals come from a bootstrap that resamples seeds, held-out
splits and questions within each file (the same draws for every measure and
every rank, so differences and the trend across ranks are paired). A run that
never reached the stop rule's target is left out, with a printed line.

    python analyze_recovery.py [--results-dir evals/pipeline] [--match-forgetting 0.3]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from toolkit.bootstrap import (
    Difference,
    Estimates,
    Panel,
    Trend,
    Unit,
    binomial_below_chance_p,
    interval,
    nanmean,
    nanstd,
    paired_differences,
    point_means,
    rank_correlation,
    ratio,
    recovered_fraction_of,
    trend,
)
from toolkit.comparison import (
    Agreement,
    agreements,
    check_one_scoring_mode,
    comparable_published,
    left_out_sentence,
    machine_lines,
    machine_of,
    same_key_sentence,
    same_seed_checks,
    verdict_sentence,
)
from toolkit.datasets import FLOOR_DATASETS
from toolkit.names import CHANCE, PROBES
from toolkit.plots import plot
from toolkit.results import TABLES, Table, read_rows, table_dir


class Setting(NamedTuple):
    """One row of the table: an unlearning setting, its seeds pooled."""

    unlearn_type: str
    dataset: str
    lora_rank: int | None
    lr: float
    epochs: int
    retain_coeff: float
    steering_coeff: float | None


SETTING = list(Setting._fields)
# A dataset whose floor rows are RTT on another (pretraining facts: their remapped twin)
FLOOR_OF = {str(dataset): str(floor) for dataset, floor in FLOOR_DATASETS.items()}
MEASURES = ("base", "A", "B", "C", "floor", "lora_rtt", "quant8", "quant4")


# ratio name -> (numerator, subtrahend, reference): (num - sub) / (ref - sub), per seed and split
RATIOS = {
    "recovered_fraction": ("B", "A", "base"),
    "recovered_above_floor": ("B", "floor", "base"),
    "relative_to_baseline_rtt": ("B", "chance", "C"),
    **{f"{p}_recovered": (p, "A", "base") for p in PROBES},
}


@dataclass(frozen=True)
class Options:
    min_forgetting: float = 0.1  # base - A below this: too little forgetting to mean anything
    min_retain_kept: float = 0.8  # retain after / before below this: unlearning was not selective
    recovery_threshold: float = 0.9  # relative to base accuracy, unless absolute
    absolute_threshold: bool = False
    match_target: float | None = None
    match_tolerance: float = 0.05
    bootstrap: int = 2000
    seed: int = 0
    attacker: str = "final"  # a key of ATTACKERS
    rtt_lrs: tuple[float, ...] = ()  # the attacker's lrs to choose among (B, C and floor alike); () = every lr run


def _by_epoch(mapping: dict) -> dict[int, float]:
    return {int(k): float(v) for k, v in mapping.items()}


# The columns the analysis reads from each stage's rows: a row without one of them is refused, naming its file.
NEEDS = {"unlearn": ("model_path", "unlearn_type", "dataset", "lora_rank", "forget_accs", "val_files"),
         "rtt": ("base_model", "condition", "dataset", "skip_split", "forget_accs_local"),
         "quant": ("probe", "forget_accs")}


def read_table(results_dir: Path, stage: str) -> pd.DataFrame:
    """A stage's rows (through the results schema), each with the file it came from."""
    rows = [{**row, "_file": str(path)} for path, row in read_rows(results_dir, stage)]
    for row in rows:
        if missing := [c for c in NEEDS[stage] if c not in row]:
            raise ValueError(f"{row['_file']} is no {TABLES[stage].folder} row: it lacks {', '.join(missing)}; "
                             f"move it out of {Path(row['_file']).parent}")
    frame = pd.DataFrame(rows)
    for column in frame.columns:  # dicts and lists stay Python objects
        if frame[column].map(lambda v: isinstance(v, (dict, list))).any():
            frame[column] = frame[column].astype(object)
    return frame


def check_key_collisions(frame: pd.DataFrame, table: Table) -> None:
    """Rows merged from several slices or machines share a key only when they
    ran the same job; two rows of one key with other settings are refused."""
    key = table.key
    if frame.empty or key not in frame:
        return
    columns = [c for c in table.settings if c in frame]
    shared = frame[frame[key].notna() & frame.duplicated(key, keep=False)]
    for value, rows in shared.groupby(key):
        settings = rows[columns].map(lambda v: "nan" if v is None or v != v else str(v))  # empty cells compare equal
        if len(settings.drop_duplicates()) > 1:
            differ = [c for c in columns if settings[c].nunique() > 1]
            first, other = rows.iloc[0], rows[(settings != settings.iloc[0]).any(axis=1)].iloc[0]
            raise ValueError(f"{first['_file']} and {other['_file']} share {key} {value} but differ in "
                             f"{', '.join(differ)}; a key names one job, so one of these rows does not belong here")


def newest_per_key(frame: pd.DataFrame, table: Table) -> pd.DataFrame:
    """One row per job: the newest row of each key (files are named by time);
    rows of older versions, which carry no key, are told apart by `table.legacy`."""
    if frame.empty:
        return frame
    check_key_collisions(frame, table)
    frame = frame.sort_values("_file")
    cols = [c for c in table.legacy if c in frame]
    legacy = ("legacy:" + frame[cols].map(str).agg("|".join, axis=1)) if cols else frame["_file"]
    keys = frame[table.key] if table.key in frame else pd.Series([None] * len(frame), index=frame.index)
    ids = [k if isinstance(k, str) and k else old for k, old in zip(keys, legacy)]
    return frame.assign(_id=ids).drop_duplicates("_id", keep="last").drop(columns="_id").reset_index(drop=True)


@dataclass
class Results:
    unlearning: pd.DataFrame
    rtt: pd.DataFrame
    quant: pd.DataFrame


def load_results(results_dir: str | Path) -> Results:
    results_dir = Path(results_dir)
    unlearning, rtt, quant = (newest_per_key(read_table(results_dir, stage), TABLES[stage])
                              for stage in ("unlearn", "rtt", "quant"))
    if unlearning.empty:
        raise FileNotFoundError(f"no unlearning CSVs under {table_dir(results_dir, 'unlearn')}; run pipeline.py first")
    results = Results(unlearning, rtt, quant)
    check_one_scoring_mode(results, str(results_dir))
    return results


def published_results(results_dir: str | Path, published_dirs: Sequence[str | Path]) -> tuple[list[str], Results]:
    """The published rows a comparison can rest on (toolkit.comparison.comparable_published), as one Results."""
    published = [(str(folder), load_results(folder)) for folder in published_dirs]
    _, lines, kept = comparable_published(load_results(results_dir), str(results_dir), published)
    return lines, Results(*(pd.concat([getattr(r, stage) for r in kept], ignore_index=True)
                            for stage in ("unlearning", "rtt", "quant")))


def _vector(correct: dict | None, name: str, epoch: int, accuracy: float) -> np.ndarray:
    """Each question's correctness (1/0), or, for results written before it
    was recorded, the accuracy alone (then only seeds and splits resample)."""
    bits = (correct.get(name) or {}).get(str(epoch)) if isinstance(correct, dict) else None
    if isinstance(bits, str) and bits:
        return np.frombuffer(bits.encode(), dtype=np.uint8).astype(float) - ord("0")
    return np.array([accuracy], dtype=float)


def _column(frame: pd.DataFrame, name: str, default) -> pd.Series:
    return frame[name] if name in frame else pd.Series(default, index=frame.index)


def _attempt(row: pd.Series, epoch: int, accs: dict[int, float]) -> dict:
    """One (lr, epochs, epoch) of an RTT run on its held-out split: V's accuracy there and its per-question bits."""
    correct = row.get("forget_correct_local")
    bits = correct.get(str(epoch)) if isinstance(correct, dict) else None
    return {"final": accs[epoch], "accs": accs, "vector": _vector({"v": {str(epoch): bits}}, "v", epoch, accs[epoch]),
            "choice": (float(row.lr), int(row.epochs), epoch)}


def attempts(rows: pd.DataFrame, every_epoch: bool) -> dict[tuple, dict]:
    """The attacker's options in these rows (one held-out split), by
    (lr, epochs, epoch): each run's last epoch, or with `every_epoch` each
    epoch after training began (the paper picks the epoch too)."""
    out = {}
    for _, row in rows.iterrows():
        accs = _by_epoch(row.forget_accs_local)
        for epoch in (sorted(e for e in accs if e >= 1) or [max(accs)]) if every_epoch else [max(accs)]:
            attempt = _attempt(row, epoch, accs)
            out[attempt["choice"]] = attempt
    return out


def _best(options: dict[tuple, dict]) -> dict | None:
    return max(options.values(), key=lambda a: a["final"]) if options else None


def best_rtt(rows: pd.DataFrame) -> dict | None:
    """The run with the best final V accuracy among (lr, epochs)."""
    return _best(attempts(rows, every_epoch=False))


def cross_fitted(rows: pd.DataFrame, split: int) -> dict | None:
    """The attacker's (lr, epochs, epoch) chosen on the model's other held-out
    splits (the best mean V accuracy there), then applied to this split: the
    choice never sees the V it is scored on."""
    mine = attempts(rows[rows.skip_split == split], every_epoch=True)
    others = [attempts(group, every_epoch=True) for s, group in rows.groupby("skip_split") if s != split]
    shared = [c for c in mine if others and all(c in o for o in others)]
    if not shared:
        return None
    choice = max(shared, key=lambda c: (np.mean([o[c]["final"] for o in others]), c))
    return mine[choice]


# --attacker: how B, C and the floor pick among the RTT runs (lrs, epochs) of one model and held-out split
ATTACKERS = {
    "final": lambda rows, split: best_rtt(rows[rows.skip_split == split]),  # the published study's
    "paper": lambda rows, split: _best(attempts(rows[rows.skip_split == split], every_epoch=True)),
    "cross_fitted": cross_fitted,
}
ATTACKER_NOTES = {
    "final": "the best lr by last-epoch V accuracy, per held-out split",
    "paper": "the paper's: the best lr and epoch per held-out split, chosen on V itself (optimistic when V is small)",
    "cross_fitted": "the lr and epoch best on the model's other held-out splits, applied to V",
}


def recovery_epoch(accs: dict[int, float], threshold: float) -> float:
    reached = [epoch for epoch in sorted(accs) if epoch >= 1 and accs[epoch] >= threshold]
    return float(reached[0]) if reached else math.nan


def rtt_of_run(rtt_rows: pd.DataFrame, run: pd.Series) -> pd.DataFrame:
    if rtt_rows.empty:
        return rtt_rows
    probe = _column(rtt_rows, "probe", "rtt").fillna("rtt")
    upstream = _column(rtt_rows, "upstream_key", "").fillna("")
    key = run.get("run_key")
    mine = (upstream == key) if isinstance(key, str) and key else \
        ((rtt_rows.condition == "unlearned") & (rtt_rows.base_model == run.model_path))
    return rtt_rows[mine].assign(probe=probe[mine])


def control_vector(rtt_rows: pd.DataFrame, condition: str, dataset: str | Sequence[str], split: int,
                   seed: int | None, attacker: str = "final") -> np.ndarray | None:
    """A control's per-question result on one held-out split: the seed's own
    best run when it has one; else (C on a subset of seeds, the floor on the
    first seed) the mean over the seeds that ran it of each one's best run.
    `attacker` picks the best run as it does for B."""
    if rtt_rows.empty:
        return None
    datasets = [dataset] if isinstance(dataset, str) else list(dataset)
    rows = rtt_rows[(rtt_rows.condition == condition) & rtt_rows.dataset.isin(datasets)
                    & (_column(rtt_rows, "probe", "rtt").fillna("rtt") == "rtt")]
    seeds = _column(rows, "seed", np.nan).fillna(-1)
    select = ATTACKERS[attacker]
    if seed is not None and (seeds == seed).any():
        best = select(rows[seeds == seed], split)
        return best["vector"] if best else None
    vectors = [best["vector"] for _, group in rows.groupby(seeds) if (best := select(group, split))]
    if not vectors or len({len(v) for v in vectors}) != 1:
        return vectors[0] if len(vectors) == 1 else None
    return np.mean(vectors, axis=0)


class LeftOut(NamedTuple):
    """An unlearning run the stop rule flagged: left out of the matched comparison."""

    unlearn_type: str
    lora_rank: int | None
    seed: int
    reason: str
    line: str

    def __str__(self) -> str:
        return self.line


def units_of(results: Results, options: Options) -> tuple[list[Unit], list[LeftOut]]:
    """Per unlearned model and forget file; with the runs left out (stop rule)."""
    out, left_out = [], []
    rtt_rows, quant = results.rtt, results.quant
    if options.rtt_lrs and not rtt_rows.empty:
        rtt_rows = rtt_rows[np.isclose(rtt_rows.lr.to_numpy(float)[:, None], options.rtt_lrs).any(axis=1)]
    for _, run in results.unlearning.iterrows():
        if not isinstance(run.model_path, str) or not run.model_path:
            continue
        seed = run.get("seed", np.nan)
        seed = int(seed if pd.notna(seed) else run.get("data_seed", 0))
        reached = run.get("stop_reached", np.nan)
        if pd.notna(reached) and str(reached) == "False":
            rank = int(run.lora_rank) if pd.notna(run.lora_rank) else None
            line = (f"left out of matched comparison: {run.unlearn_type} rank {run.lora_rank} seed {seed} "
                    f"({run.get('stop_reason')}: forget {float(run.get('stop_forget_acc', math.nan)):.3f} "
                    f"vs target {float(run.get('stop_target', math.nan)):.3f}) {run.model_path}")
            left_out.append(LeftOut(run.unlearn_type, rank, seed, str(run.get("stop_reason")), line))
            continue
        setting = Setting(*(run[k] if pd.notna(run[k]) else None for k in SETTING))
        retain = {f: _by_epoch(a) for f, a in (run.retain_accs or {}).items()}
        retain_after = float(np.mean([a[max(a)] for a in retain.values()])) if retain else math.nan
        retain_before = float(np.mean([a[0] for a in retain.values()])) if retain else math.nan
        rtt = rtt_of_run(rtt_rows, run)
        quant_rows = quant[_column(quant, "upstream_key", "") == run.get("run_key")] if not quant.empty else quant
        for split, file in enumerate(run.val_files):
            forget = _by_epoch(run.forget_accs[file])
            final = max(forget)
            correct = run.get("forget_correct")
            vectors = {"base": _vector(correct, file, 0, forget[0]), "A": _vector(correct, file, final, forget[final])}
            threshold_base = forget[0]
            epoch_to_recover = math.nan
            for probe, name in (("rtt", "B"), ("lora_rtt", "lora_rtt")):
                rows = rtt[rtt.probe == probe] if not rtt.empty else rtt
                best = ATTACKERS[options.attacker](rows, split) if len(rows) else None
                if best:
                    vectors[name] = best["vector"]
                    if name == "B":
                        threshold = options.recovery_threshold * (1 if options.absolute_threshold else threshold_base)
                        epoch_to_recover = recovery_epoch(best["accs"], threshold)
            if "B" in vectors:
                for name, condition, by_seed, datasets in (
                        ("C", "baseline", seed, [run.dataset]),
                        ("floor", "never_taught", None, [FLOOR_OF.get(run.dataset, run.dataset)])):
                    vector = control_vector(rtt_rows, condition, datasets, split, by_seed, options.attacker)
                    if vector is not None:
                        vectors[name] = vector
            for _, row in quant_rows.iterrows():
                accs = row.forget_accs.get(file)
                if accs is not None:
                    vectors[row.probe] = _vector(row.forget_correct, file, 0, float(_by_epoch(accs)[0]))
            out.append(Unit(setting, seed, file, split, vectors, retain_before, retain_after, epoch_to_recover,
                            run.model_path, machine_of(run), float(run.get("update_rel_norm", math.nan))))
    return out, left_out


def estimate(units: list[Unit], panel: Panel) -> Estimates:
    """Point estimates (means over seeds and splits of per-split values) and
    bootstrap CIs of every measure and ratio for one setting."""
    rtt_units = [u for u in units if "B" in u.vectors] or units
    row: dict = {"n_seeds": len({u.seed for u in units}), "n_splits": len({u.file for u in rtt_units}),
                 "n": len(rtt_units), "n_questions": int(sum(len(u.vectors["A"]) for u in rtt_units))}
    means = {m: panel.replicate_means(units, m) for m in MEASURES}
    has_b = ~np.isnan(means["B"][..., :1])
    replicates = {}
    for m in MEASURES:
        # A and base are averaged over the held-out splits RTT ran on, so A, B, C and the floor share units.
        per_unit = np.where(has_b, means[m], np.nan) if m in ("base", "A") and has_b.any() else means[m]
        points = point_means(rtt_units if m in ("base", "A") else units, m)
        replicates[m] = panel.resample(per_unit)
        row[m] = nanmean(points)
        row[f"{m}_lo"], row[f"{m}_hi"] = interval(replicates[m])
    arrays = {**means, "chance": np.full_like(means["A"], CHANCE)}
    for name, (num, sub, ref) in RATIOS.items():
        # A ratio of means, not a mean of per-split ratios: one split's base - A
        # rests on a few questions and can be near 0, which gives the
        # per-split ratio a heavy tail. Only units with all three terms count.
        present = ~(np.isnan(arrays[num]) | np.isnan(arrays[sub]) | np.isnan(arrays[ref]))
        terms = [panel.resample(np.where(present, arrays[k], np.nan)) for k in (num, sub, ref)]
        replicates[name] = ratio(*terms)
        # [units, (num, sub, ref)]: the point is the ratio of the column means
        values = np.array([[CHANCE if k == "chance" else u.vectors[k].mean() for k in (num, sub, ref)]
                           for u in units if all(k == "chance" or k in u.vectors for k in (num, sub, ref))],
                          dtype=float).reshape(-1, 3)
        row[name] = float(ratio(*values.mean(axis=0))) if len(values) else math.nan
        row[f"{name}_std"] = nanstd(ratio(*values.T))  # spread of per-split ratios, for reading
        row[f"{name}_lo"], row[f"{name}_hi"] = interval(replicates[name])
    a_correct = np.concatenate([u.vectors["A"] for u in rtt_units])
    exact = bool(np.all((a_correct == 0) | (a_correct == 1))) and len(a_correct) > 1
    row["A_below_chance_p"] = binomial_below_chance_p(int(a_correct.sum()), len(a_correct)) if exact else math.nan
    row["answer_avoided"] = bool(exact and row["A_below_chance_p"] < 0.05)
    row["retain_before"] = nanmean([u.retain_before for u in units])
    row["retain_after"] = nanmean([u.retain_after for u in units])
    row["recovery_epoch"] = nanmean([u.recovery_epoch for u in rtt_units])
    row["update_rel_norm"] = nanmean([u.update_rel_norm for u in units])
    return Estimates(row, replicates)


def weight_distance_line(method: str, dataset: str, units: list[Unit]) -> str | None:
    """How far unlearning moved the weights, by rank, and whether that
    predicts what RTT recovers: Spearman's rho between each run's update size
    and its recovered fraction (over its held-out splits), pooled and within
    each rank (rank sets the size, so the pooled rho alone would mostly rank
    ranks). None where the rows carry no update sizes."""
    runs: dict[tuple, list[Unit]] = {}
    for unit in units:
        if "B" in unit.vectors and not math.isnan(unit.update_rel_norm):
            runs.setdefault((unit.setting.lora_rank, unit.seed, unit.model_path), []).append(unit)
    if not runs:
        return None
    points = {}  # rank -> [(update size, recovered fraction)]
    for (rank, _, _), group in sorted(runs.items()):
        points.setdefault(rank, []).append((group[0].update_rel_norm, recovered_fraction_of(group)))

    def rho(pairs) -> str | None:
        if len(pairs) < 3 or len({x for x, _ in pairs}) < 2 or len({y for _, y in pairs}) < 2:
            return None
        rho, p = rank_correlation(*zip(*pairs))
        return f"{rho:+.2f} (p {p:.2f}, {len(pairs)} runs)"

    sizes = ", ".join(f"{np.mean([x for x, _ in pairs]):.4f} at rank {rank}" for rank, pairs in points.items())
    line = f"weight distance ({method}, {dataset}): update size (relative Frobenius norm of the LoRA delta) {sizes}"
    if pooled := rho([pair for pairs in points.values() for pair in pairs]):
        line += f"; recovered fraction against update size, Spearman rho {pooled} pooled"
        within = [f"rank {rank} {r}" for rank, pairs in points.items() if (r := rho(pairs))]
        line += f"; within rank: {'; '.join(within)}" if within else ""
    return line


@dataclass
class Analysis:
    table: pd.DataFrame
    trends: list[Trend]
    left_out: list[LeftOut]
    differences: list[Difference] = field(default_factory=list)
    distances: list[str] = field(default_factory=list)  # weight_distance_line per (method, dataset)


def summarize(units: list[Unit], options: Options) -> Analysis:
    """One row per setting, with CIs; the trend across ranks per (method, dataset)."""
    rows, trends, differences, distances = [], [], [], []
    families: dict[tuple, list[Unit]] = {}
    for unit in units:
        families.setdefault((unit.setting.unlearn_type, unit.setting.dataset), []).append(unit)
    for (method, dataset), family in families.items():
        panel = Panel(sorted({u.seed for u in family}), sorted({u.file for u in family}), options.bootstrap,
                      options.seed)
        by_setting: dict[tuple, list[Unit]] = {}
        for unit in family:
            by_setting.setdefault(unit.setting, []).append(unit)
        estimates = {}
        for setting, group in sorted(by_setting.items(), key=lambda kv: [str(v) for v in kv[0]]):
            est = estimate(group, panel)
            estimates[setting] = est
            rows.append({**dict(zip(SETTING, setting)), **est.row})
        if line := weight_distance_line(method, dataset, family):
            distances.append(line)
        ranks = [s.lora_rank for s in estimates]
        if len(ranks) >= 2 and len(set(ranks)) == len(ranks) and all(r and r > 0 for r in ranks):
            ordered = sorted(estimates.items(), key=lambda kv: kv[0].lora_rank)
            differences += paired_differences(method, dataset, ordered)
            for measure in ("recovered_fraction", *[f"{p}_recovered" for p in PROBES]):
                points = [e.row[measure] for _, e in ordered]
                if any(math.isnan(p) for p in points):
                    continue
                slope, lo, hi = trend([s[2] for s, _ in ordered], points, [e.replicates[measure] for _, e in ordered])
                trends.append(Trend(method, dataset, measure, slope, lo, hi, [s[2] for s, _ in ordered]))
    table = pd.DataFrame(rows)
    if table.empty:
        return Analysis(table, trends, [])
    for d in differences:  # as columns of the rank's row (the lowest rank's stay empty)
        at = [i for i, r in enumerate(rows) if (r["unlearn_type"], r["dataset"], r["lora_rank"]) ==
              (d.method, d.dataset, d.rank)]
        table.loc[at, ["diff_vs_lowest_rank", "diff_vs_lowest_rank_lo", "diff_vs_lowest_rank_hi", "lowest_rank"]] = \
            [d.value, d.lo, d.hi, d.lowest]
    table["forgetting"] = table["base"] - table["A"]
    table["too_little_forgetting"] = table["forgetting"] < options.min_forgetting
    table["retain_damaged"] = table["retain_after"] < options.min_retain_kept * table["retain_before"]
    table["missing_baseline"] = table["C"].isna()
    table = table.sort_values(["unlearn_type", "dataset", "lora_rank", "lr", "retain_coeff"]).reset_index(drop=True)
    return Analysis(table, trends, [], differences, distances)


@dataclass
class Matched:
    table: pd.DataFrame  # one chosen setting per (method, dataset, rank)
    unmatched: list[tuple[str, str, int]]  # ranks with no setting within the tolerance


def match_forgetting(table: pd.DataFrame, target: float, tolerance: float) -> Matched:
    """Per (method, dataset, rank): among settings whose mean A lies within
    `tolerance` of `target`, keep the one with the highest retain accuracy
    after unlearning (least retain damage); ties go to the one closest to the
    target."""
    chosen, unmatched = [], []
    for key, group in table.groupby(["unlearn_type", "dataset", "lora_rank"]):
        near = group[(group["A"] - target).abs() <= tolerance]
        if near.empty:
            unmatched.append(tuple(key))
            continue
        near = near.assign(_distance=(near["A"] - target).abs())
        chosen.append(near.sort_values(["retain_after", "_distance"], ascending=[False, True]).iloc[0])
    frame = pd.DataFrame(chosen).drop(columns="_distance") if chosen else table.iloc[0:0]
    return Matched(frame.reset_index(drop=True), unmatched)


def _with_ci(table: pd.DataFrame, name: str) -> pd.Series:
    def cell(row):
        value = row[name]
        if pd.isna(value):
            return "-"
        lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
        return f"{value:.2f} [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) and pd.notna(hi) else f"{value:.2f}"

    return table.apply(cell, axis=1)


def figure_source(table: pd.DataFrame) -> str:
    """What a figure draws, as a digest of the printed table (kept in the PNG)."""
    return "table sha256 " + hashlib.sha256(format_table(table).encode()).hexdigest()[:16]


def format_table(table: pd.DataFrame) -> str:
    shown = pd.DataFrame({"attacker": table.attacker} if "attacker" in table else {}, index=table.index)
    shown = shown.assign(**{"method": table.unlearn_type, "rank": table.lora_rank, "lr": table.lr,
                            "rc": table.retain_coeff, "seeds": table.n_seeds, "splits": table.n_splits,
                            "base": table.base.map(lambda v: f"{v:.2f}")})
    for name in ("A", "B", "C", "floor"):
        shown[name] = _with_ci(table, name)
    shown["retain"] = table.retain_after.map(lambda v: f"{v:.2f}")
    shown["recovered (B-A)/(base-A)"] = _with_ci(table, "recovered_fraction")
    shown["above floor"] = _with_ci(table, "recovered_above_floor")
    for probe in PROBES:
        if table[f"{probe}_recovered"].notna().any():
            shown[f"{probe} recovered"] = _with_ci(table, f"{probe}_recovered")
    flags = []
    for _, row in table.iterrows():
        marks = [m for m, on in (("answer avoided", row.answer_avoided),
                                 ("too little forgetting", row.too_little_forgetting),
                                 ("retain damaged", row.retain_damaged)) if on]
        flags.append("; ".join(marks) or "")
    shown["flags"] = flags
    return shown.to_string(index=False)


def compare(results_dir: str | Path, published_dirs: str | Path | Sequence[str | Path], options: Options,
            stream=None) -> list[Agreement]:
    """Print the published table beside this slice's (already printed), how
    many of its jobs came out exactly as published, where the published rows
    hold the slice's own seeds one line per rank comparing the rerun with
    them (did the same seeds come out alike?), one agreement line per rank
    (is the slice like the published seeds it lacks?), and last the verdict
    over every rank together (family-wise 95%, Holm)."""
    stream = stream or sys.stdout
    published_dirs = [published_dirs] if isinstance(published_dirs, (str, Path)) else list(published_dirs)
    my_results = load_results(results_dir)
    kept_lines, their_results = published_results(results_dir, published_dirs)
    mine, my_left_out = units_of(my_results, options)
    published, left_out = units_of(their_results, options)
    table = summarize(published, options).table
    print(f"\npublished ({', '.join(map(str, published_dirs))}; {len(left_out)} flagged run(s) left out):",
          file=stream)
    for line in kept_lines:
        print(line, file=stream)
    print(format_table(table) if not table.empty else "(no published rows yet)", file=stream)
    if sentence := same_key_sentence(my_results, their_results):
        print(sentence, file=stream)
    for check in same_seed_checks(mine, published):
        print(check.sentence(), file=stream)
    found = agreements(mine, published)
    for a in found:
        print(a.sentence(), file=stream)
    compared = {a.rank for a in found}
    flagged = sorted({run.lora_rank for run in my_left_out if run.lora_rank not in compared})
    for run in my_left_out:
        if run.lora_rank not in compared:
            print(left_out_sentence(run, published, left_out), file=stream)
    print(verdict_sentence(found, flagged), file=stream)
    return found


def block_markers(name: str = "rank-study") -> tuple[str, str]:
    """The lines around a headline block that --update-readme fills."""
    return f"<!-- {name}:begin (analyze_recovery.py --update-readme) -->", f"<!-- {name}:end -->"


README_BEGIN, README_END = block_markers()


def attacker_heading(attacker: str) -> str:
    return f"attacker: {attacker}, {ATTACKER_NOTES[attacker]}"


def headline(results_dir: str | Path, options: Options = Options(), attackers: Sequence[str] = ()) -> str:
    """The study's table, trend and paired differences as analysis prints them,
    once per attacker (`attackers`, else the one in `options`)."""
    results = load_results(results_dir)
    attackers = tuple(attackers) or (options.attacker,)
    sections, seeds, flagged = [], set(), 0
    for attacker in attackers:
        units, left_out = units_of(results, replace(options, attacker=attacker))
        analysis = summarize(units, options)
        seeds, flagged = seeds | {u.seed for u in units}, len(left_out)
        lines = [attacker_heading(attacker)] if len(attackers) > 1 else []
        lines += [format_table(analysis.table)]
        lines += [t.sentence() for t in analysis.trends if t.measure == "recovered_fraction"]
        lines += [d.sentence() for d in analysis.differences]
        sections += lines + analysis.distances + machine_lines(units)
    named = "" if attackers == ("final",) else f"; attacker: {', '.join(attackers)}"
    return "\n".join([f"{len(seeds)} seeds with matched forgetting, {flagged} flagged run(s) left out; "
                      f"95% bootstrap CIs ({options.bootstrap} draws){named}", *sections])


def update_readme(readme: str | Path, results_dir: str | Path, options: Options = Options(),
                  block: str = "rank-study", attackers: Sequence[str] = ()) -> None:
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    begin, end = block_markers(block)
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    block_text = headline(results_dir, options, attackers)
    path.write_text(f"{head}{begin}\n```text\n{block_text}\n```\n{end}{tail}", encoding="utf-8")


def nothing_to_compare(results_dir: str | Path, results: Results, left_out: Sequence[LeftOut]) -> str:
    """Why the table is empty, in the terms of what the results directory holds."""
    if left_out and len(left_out) == len(results.unlearning):
        return (f"all {len(left_out)} unlearned run(s) under {results_dir} were left out of the matched comparison "
                "(stop rule flags, listed above): no run reached the forget target with retain above the floor")
    return f"no results for any unlearned model under {results_dir}; run pipeline.py first"


def analyze(results_dir: str | Path, options: Options = Options(), out_dir: str | Path | None = None,
            stream=None, attackers: Sequence[str] = ()) -> pd.DataFrame:
    """Print the table and the trend (once per attacker: `attackers`, else the
    one in `options`), write recovery_vs_rank.csv and .png, return the table
    (with an `attacker` column when there are several)."""
    stream = stream or sys.stdout
    results = load_results(results_dir)
    attackers = tuple(attackers) or (options.attacker,)
    tables, title = [], ""
    for attacker in attackers:
        if len(attackers) > 1:
            print(f"\n{attacker_heading(attacker)}", file=stream)
        table, title = report(results_dir, results, replace(options, attacker=attacker), stream,
                              show_left_out=attacker == attackers[0])
        tables.append(table.assign(attacker=attacker) if len(attackers) > 1 else table)
    table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    out = Path(out_dir or results_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "recovery_vs_rank.csv", index=False)
    plot(table, out / "recovery_vs_rank.png", title, source=figure_source(table))
    print(f"wrote {out / 'recovery_vs_rank.csv'} and {out / 'recovery_vs_rank.png'} "
          f"(95% CIs: {options.bootstrap} bootstrap draws over seeds, held-out splits and questions)", file=stream)
    return table


def report(results_dir: str | Path, results: Results, options: Options, stream,
           show_left_out: bool = True) -> tuple[pd.DataFrame, str]:
    """One attacker's table, trend, paired differences and flags, printed; the table and its title."""
    units, left_out = units_of(results, options)
    for line in left_out if show_left_out else ():
        print(line, file=stream)
    analysis = summarize(units, options)
    table = analysis.table
    if table.empty:
        raise ValueError(nothing_to_compare(results_dir, results, left_out))
    title = "all settings"
    if options.match_target is not None:
        matched = match_forgetting(table, options.match_target, options.match_tolerance)
        for method, dataset, rank in matched.unmatched:
            print(f"matched forgetting: no {method} {dataset} rank {rank} run has A within "
                  f"{options.match_tolerance} of {options.match_target}", file=stream)
        for _, row in matched.table.iterrows():
            print(f"matched forgetting: {row.unlearn_type} {row.dataset} rank {row.lora_rank}: picked lr={row.lr:g} "
                  f"epochs={row.epochs} rc={row.retain_coeff:g} (A={row.A:.3f}, retain={row.retain_after:.3f})", file=stream)
        table = matched.table
        title = f"matched forgetting: A within {options.match_tolerance} of {options.match_target}"
    print(format_table(table), file=stream)
    for t in analysis.trends:
        if options.match_target is None or t.measure == "recovered_fraction":
            print(t.sentence(), file=stream)
    if options.match_target is None:
        for d in analysis.differences:
            print(d.sentence(), file=stream)
        for line in [*analysis.distances, *machine_lines(units)]:
            print(line, file=stream)
    print_flags(table, options, stream)
    return table, title


def print_flags(table: pd.DataFrame, options: Options, stream) -> None:
    flagged = table[table.too_little_forgetting]
    if len(flagged):
        print(f"flagged: {len(flagged)} row(s) forgot less than {options.min_forgetting} (base - A); their recovery "
              "measures do not mean much", file=stream)
    damaged = table[table.retain_damaged]
    if len(damaged):
        print(f"flagged: {len(damaged)} row(s) kept less than {options.min_retain_kept:g} of their retain accuracy "
              "(retain damaged): unlearning was not selective there, so forgetting and recovery are not about the "
              "forget facts alone", file=stream)
    avoided = table[table.answer_avoided]
    if len(avoided):
        print(f"flagged: {len(avoided)} row(s) answer below chance after unlearning (binomial p < 0.05): the answer "
              "is avoided, so the information is likely still present", file=stream)
    if table.missing_baseline.any():
        print("note: no baseline RTT (C) for some rows; relative_to_baseline_rtt is empty there", file=stream)


class Parser(argparse.ArgumentParser):
    """Bad input is one `error:` line (exit 2), as in the pipeline."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


# option -> (low, high, what it is): every number the analysis takes is a fraction or an accuracy
FRACTIONS = {"min_forgetting": "base - A, an accuracy difference", "min_retain_kept": "a fraction of retain kept",
             "recovery_threshold": "a fraction of base accuracy (or, with --absolute-threshold, an accuracy)",
             "match_forgetting": "an accuracy", "match_tolerance": "an accuracy difference"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default="evals/pipeline", help="the pipeline's results_dir")
    parser.add_argument("--out-dir", default=None, help="where to write the CSV and PNG (default: results dir)")
    parser.add_argument("--min-forgetting", type=float, default=0.1,
                        help="flag rows whose base - A is below this (default 0.1)")
    parser.add_argument("--min-retain-kept", type=float, default=0.8,
                        help="flag rows whose retain accuracy after unlearning is below this fraction of before "
                             "(default 0.8)")
    parser.add_argument("--recovery-threshold", type=float, default=0.9,
                        help="recovery_epoch threshold: a fraction of base accuracy (default 0.9)")
    parser.add_argument("--absolute-threshold", action="store_true",
                        help="read --recovery-threshold as an absolute accuracy")
    parser.add_argument("--match-forgetting", type=float, default=None, metavar="TARGET",
                        help="compare ranks at matched forgetting: per rank, the setting with A within the "
                             "tolerance of TARGET and the least retain damage")
    parser.add_argument("--match-tolerance", type=float, default=0.05)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws for the CIs (default 2000)")
    parser.add_argument("--attacker", default=["final"], nargs="+", choices=list(ATTACKERS),
                        help="how B, C and the floor pick among each model's RTT runs per held-out split: final "
                             "(the best lr by last-epoch V, the published study's), paper (the best lr and epoch, "
                             "chosen on V itself) or cross_fitted (the lr and epoch best on the model's other "
                             "held-out splits); several names report each in turn")
    parser.add_argument("--rtt-lrs", type=float, nargs="+", default=(), metavar="LR",
                        help="let the attacker choose only among these RTT lrs (B, C and the floor alike; "
                             "default: every lr the rows hold)")
    parser.add_argument("--block", default="rank-study",
                        help="the name of the block --update-readme fills (<!-- NAME:begin ... -->)")
    parser.add_argument("--update-readme", default=None, metavar="DOC",
                        help="write the headline (table, trend, paired differences) into DOC's rank-study block "
                             "(docs/rank_study.md)")
    parser.add_argument("--compare", default=None, nargs="+", metavar="PUBLISHED_DIR",
                        help="also print the table of published rows (e.g. results/rank_study) and, per rank, "
                             "whether this slice agrees with them; of several folders, the rows on this slice's "
                             "numeric path are used (a verdict across scoring modes, datasets or paths is refused)")
    args = parser.parse_args(argv)
    for name, what in FRACTIONS.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
            parser.error(f"--{name.replace('_', '-')}={value:g} is not allowed; it is {what}: use a value in [0, 1]")
    if args.bootstrap < 100:
        parser.error(f"--bootstrap={args.bootstrap} is not allowed; use 100 or more draws")
    for lr in args.rtt_lrs:
        if not (math.isfinite(lr) and lr > 0):
            parser.error(f"--rtt-lrs {lr:g} is not allowed; use positive learning rates")
    return args


def check_out_dir(out_dir: str) -> None:
    """--out-dir must be a folder, or a path a folder can be made at."""
    existing = Path(out_dir).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out-dir: {out_dir} is not allowed; {existing} is a file: name a folder (it is made "
                         "when absent)")


def check_inputs(args: argparse.Namespace) -> None:
    """What the command reads after it has written its table, checked first
    (the results folder itself is read, and refused, before anything is written)."""
    if args.out_dir:
        check_out_dir(args.out_dir)
    if args.compare:
        for folder in args.compare:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"--compare: {folder} is not a folder; name the published results "
                                        "folder (e.g. results/rank_study)")
        published_results(args.results_dir, args.compare)
    if args.rtt_lrs:
        ran = sorted(set(load_results(args.results_dir).rtt.get("lr", pd.Series(dtype=float)).astype(float)))
        for lr in args.rtt_lrs:
            if not np.isclose(lr, ran).any():
                raise ValueError(f"--rtt-lrs {lr:g} is not allowed; the RTT rows under {args.results_dir} ran "
                                 f"lrs {', '.join(f'{r:g}' for r in ran) or 'none'}")
    if args.update_readme:
        path, (begin, end) = Path(args.update_readme), block_markers(args.block)
        if not path.is_file() or begin not in (text := path.read_text(encoding="utf-8")) or end not in text:
            raise ValueError(f"--update-readme: {path} has no {begin} ... {end} block to fill")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = Options(min_forgetting=args.min_forgetting, min_retain_kept=args.min_retain_kept,
                      recovery_threshold=args.recovery_threshold, absolute_threshold=args.absolute_threshold,
                      match_target=args.match_forgetting, match_tolerance=args.match_tolerance,
                      bootstrap=args.bootstrap, attacker=args.attacker[0], rtt_lrs=tuple(args.rtt_lrs))
    attackers = tuple(dict.fromkeys(args.attacker))
    try:
        check_inputs(args)
        analyze(args.results_dir, options, args.out_dir, attackers=attackers)
        if args.compare:
            compare(args.results_dir, args.compare, options)
        if args.update_readme:
            update_readme(args.update_readme, args.results_dir, options, args.block, attackers)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
