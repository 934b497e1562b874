"""Units into estimates: per setting the means, ratios and bootstrap CIs,
the trend over ranks, paired differences, and the weight-distance line."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from toolkit.bootstrap import (  # noqa: F401 - budget_of, log_steps, area_under: the curve's API, re-exported
    Difference,
    Estimates,
    Panel,
    Trend,
    Unit,
    area_under,
    binomial_below_chance_p,
    budget_of,
    interval,
    log_steps,
    nanmean,
    nanstd,
    paired_differences,
    point_means,
    rank_correlation,
    ratio,
    recovered_fraction_of,
    recovery_auc_of,
    trend,
)
from toolkit.names import CHANCE, PROBES
from toolkit.units import SETTING, LeftOut, Options

BASE_MEASURES = ("base", "A", "B", "C", "floor")


def probes_in(units: list[Unit]) -> tuple[str, ...]:
    """The published probes, then any other the rows hold (a registered probe's), by name."""
    found = {m for u in units for m in u.vectors if "@" not in m} - {*BASE_MEASURES, *PROBES}
    return (*PROBES, *sorted(found))


def half_recovery_steps(curve: np.ndarray, steps: Sequence[int]) -> np.ndarray:
    """The steps RTT needs to bring back half of what was removed: the first
    crossing of 0.5, interpolated on the log axis (NaN where it never does)."""
    x, curve = log_steps(steps), np.atleast_2d(curve)
    out = np.full(curve.shape[0], np.nan)
    for i, y in enumerate(curve):
        above = np.flatnonzero(y >= 0.5)
        if not len(above) or np.isnan(y[: above[0] + 1]).any():
            continue
        j = above[0]
        at = x[0] if j == 0 else x[j - 1] + (0.5 - y[j - 1]) / (y[j] - y[j - 1]) * (x[j] - x[j - 1])
        out[i] = 2 ** at - 1
    return out


def measures_of(probes: tuple[str, ...] = PROBES) -> tuple[str, ...]:
    return (*BASE_MEASURES, *probes)


def ratios_of(probes: tuple[str, ...] = PROBES) -> dict[str, tuple[str, str, str]]:
    """ratio name -> (numerator, subtrahend, reference): (num - sub) / (ref - sub), per seed and split."""
    return {"recovered_fraction": ("B", "A", "base"), "recovered_above_floor": ("B", "floor", "base"),
            "relative_to_baseline_rtt": ("B", "chance", "C"), **{f"{p}_recovered": (p, "A", "base") for p in probes}}


MEASURES, RATIOS = measures_of(), ratios_of()


def estimate(units: list[Unit], panel: Panel, probes: tuple[str, ...] = PROBES, budget: tuple[int, ...] = ()) -> Estimates:
    """Point estimates (means over seeds and splits of per-split values) and
    bootstrap CIs of every measure and ratio for one setting."""
    rtt_units = [u for u in units if "B" in u.vectors] or units
    row: dict = {"n_seeds": len({u.seed for u in units}), "n_splits": len({u.file for u in rtt_units}),
                 "n": len(rtt_units), "n_questions": int(sum(len(u.vectors["A"]) for u in rtt_units))}
    measures = (*measures_of(probes), *(f"B@{s}" for s in budget))
    means = {m: panel.replicate_means(units, m) for m in measures}
    has_b = ~np.isnan(means["B"][..., :1])
    replicates = {}
    for m in measures:
        # A and base are averaged over the held-out splits RTT ran on, so A, B, C and the floor share units.
        per_unit = np.where(has_b, means[m], np.nan) if m in ("base", "A") and has_b.any() else means[m]
        points = point_means(rtt_units if m in ("base", "A") else units, m)
        replicates[m] = panel.resample(per_unit)
        row[m] = nanmean(points)
        row[f"{m}_lo"], row[f"{m}_hi"] = interval(replicates[m])
    arrays = {**means, "chance": np.full_like(means["A"], CHANCE)}
    along = {f"recovered@{s}": (f"B@{s}", "A", "base") for s in budget}
    for name, (num, sub, ref) in {**ratios_of(probes), **along}.items():
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
    if len(budget) >= 2:
        add_budget_measures(row, replicates, budget)
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

    sizes = ", ".join(f"{np.mean([x for x, _ in pairs]):.4f} at {f'rank {rank}' if rank else 'full'}"
                      for rank, pairs in points.items())
    line = f"weight distance ({method}, {dataset}): update size (relative Frobenius norm of the LoRA delta) {sizes}"
    if pooled := rho([pair for pairs in points.values() for pair in pairs]):
        line += f"; recovered fraction against update size, Spearman rho {pooled} pooled"
        within = [f"{f'rank {rank}' if rank else 'full'} {r}" for rank, pairs in points.items() if (r := rho(pairs))]
        line += f"; within rank: {'; '.join(within)}" if within else ""
    return line


def add_budget_measures(row: dict, replicates: dict, budget: tuple[int, ...]) -> None:
    """The headline measures of the recovery curve, each with its bootstrap CI:
    the area under it over log steps and the steps to half recovery."""
    curve = np.array([row[f"recovered@{s}"] for s in budget])
    draws = np.stack([replicates[f"recovered@{s}"] for s in budget], axis=-1)  # [draws, steps]
    for name, measure in (("recovery_auc", area_under), ("half_recovery_steps", half_recovery_steps)):
        row[name] = float(np.asarray(measure(curve, budget)).reshape(-1)[0])
        replicates[name] = np.asarray(measure(draws, budget), dtype=float)
        row[f"{name}_lo"], row[f"{name}_hi"] = interval(replicates[name])
    row["half_recovery_reached"] = float(np.mean(~np.isnan(replicates["half_recovery_steps"])))
    row["budget_steps"] = list(budget)


# A method whose runs are another's full-parameter point: gradient difference on all weights beside LoRA's ranks.
REFERENCE_OF = {"GD": "LORA"}


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
    probes, budget = probes_in(units), budget_of(units)
    present = {(u.setting.unlearn_type, u.setting.dataset) for u in units}
    for unit in units:
        method, dataset = unit.setting.unlearn_type, unit.setting.dataset
        joined = REFERENCE_OF.get(method)  # the full-parameter reference shares LoRA's panel: paired with its ranks
        families.setdefault((joined if (joined, dataset) in present else method, dataset), []).append(unit)
    for (method, dataset), family in families.items():
        panel = Panel(sorted({u.seed for u in family}), sorted({u.file for u in family}), options.bootstrap,
                      options.seed)
        by_setting: dict[tuple, list[Unit]] = {}
        for unit in family:
            by_setting.setdefault(unit.setting, []).append(unit)
        estimates = {}
        for setting, group in sorted(by_setting.items(), key=lambda kv: [str(v) for v in kv[0]]):
            est = estimate(group, panel, probes, budget)
            estimates[setting] = est
            rows.append({**dict(zip(SETTING, setting)), **{f"axis_{k}": v for k, v in setting.axes}, **est.row})
        if line := weight_distance_line(method, dataset, family):
            distances.append(line)
        ranked = {s: est for s, est in estimates.items() if s.unlearn_type == method}
        full = [(s, est) for s, est in estimates.items() if s.unlearn_type != method]
        ranks = [s.lora_rank for s in ranked]
        if len(ranks) >= 2 and len(set(ranks)) == len(ranks) and all(r and r > 0 for r in ranks):
            ordered = sorted(ranked.items(), key=lambda kv: kv[0].lora_rank)
            along = ("recovery_auc",) if "recovery_auc" in ordered[0][1].row else ()
            for measure in ("recovered_fraction", *along):
                differences += paired_differences(method, dataset, ordered, measure)
                if len(full) == 1:  # full fine-tuning minus the lowest rank, from the same draws
                    differences += paired_differences(method, dataset, [ordered[0], full[0]], measure)
            for measure in ("recovered_fraction", *along, *[f"{p}_recovered" for p in probes]):
                points = [e.row[measure] for _, e in ordered]
                if any(math.isnan(p) for p in points):
                    continue
                slope, lo, hi = trend([s[2] for s, _ in ordered], points, [e.replicates[measure] for _, e in ordered])
                trends.append(Trend(method, dataset, measure, slope, lo, hi, [s[2] for s, _ in ordered]))
    table = pd.DataFrame(rows)
    if table.empty:
        return Analysis(table, trends, [])
    for d in [d for d in differences if d.measure == "recovered_fraction"]:  # as columns of the rank's row
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
