"""How many seeds does a study need? A power calculation from its first seeds.

Per rank, each seed's recovered fraction (over its held-out splits, under
the chosen attacker) varies from seed to seed with sd s; that spread holds
the held-out splits' and questions' noise too, since each seed's value is one
draw of all of it. The 95% half-width of the mean over n seeds is then about
t(n-1) * s / sqrt(n), and the study needs the smallest n that brings it under
the target (0.15) at every rank. The table's bootstrap resamples splits and
questions within each resampled seed too, so it runs wider than that; its
projection scales the spread by the ratio of the two seen now. The same for the trend: each seed's own
slope against log2(rank) gives the spread of the paired trend.

    python tests/benchmarks/study_power.py --results-dir results/rank_study_pretrained --attacker cross_fitted

With one seed there is no spread yet: it says so, and prints the half-width
the bootstrap over splits and questions gives (a lower bound).

Where the rows were scored along the attacker's budget (ft.budget), it also
sizes the second edition's primary contrast: each seed's area under the
recovery curve per arm (a rank, or "full" for gradient difference on all
weights), the paired differences rank 64 - rank 1 and full - rank 1, and
the seeds that bring their 95% half-width to --auc-target (0.03), at most
--most-seeds (12; beyond that, the half-width 12 seeds would reach).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import embedded  # noqa: F401  (puts the project on the path)
import numpy as np

import analyze_recovery  # noqa: E402
from toolkit.comparison import MEASURES, arm_of, per_seed, t_quantile  # noqa: E402
from toolkit.estimates import budget_of  # noqa: E402


def half_width(sd: float, n: int) -> float:
    return t_quantile(0.975, n - 1) * sd / math.sqrt(n) if n >= 2 else math.nan


def seeds_needed(sd: float, target: float, most: int = 200) -> int | None:
    """The fewest seeds whose mean has a 95% half-width at most `target`, given a per-seed sd."""
    return next((n for n in range(2, most + 1) if half_width(sd, n) <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default="results/rank_study_pretrained")
    parser.add_argument("--attacker", default="cross_fitted", choices=list(analyze_recovery.ATTACKERS))
    parser.add_argument("--target", type=float, default=0.15, help="the half-width asked for at every rank")
    parser.add_argument("--trend-target", type=float, default=0.02, help="the trend's half-width (per doubling)")
    parser.add_argument("--auc-target", type=float, default=0.03, help="the primary contrast's half-width")
    parser.add_argument("--most-seeds", type=int, default=12)
    args = parser.parse_args()
    options = replace(analyze_recovery.Options(), attacker=args.attacker)
    units, left_out = analyze_recovery.units_of(analyze_recovery.load_results(args.results_dir), options)
    # per arm (a LoRA rank, or 0 for the full-parameter reference), keyed by its rank for the table and the trend
    by_rank: dict[int, dict[int, float]] = {}
    for rank in sorted({u.setting.lora_rank for u in units}):
        by_rank[rank] = per_seed([u for u in units if u.setting.lora_rank == rank and "B" in u.vectors])
    table = analyze_recovery.summarize(units, options).table
    print(f"{args.results_dir}, attacker {args.attacker}: {len(left_out)} flagged run(s) left out")
    arm_names = {u.setting.lora_rank: arm_of(u.setting) for u in units}
    for rank, seeds in by_rank.items():
        arm = arm_names[rank]
        values = np.array(list(seeds.values()))
        row = table[table.lora_rank == rank].iloc[0]
        bootstrap = (row.recovered_fraction_hi - row.recovered_fraction_lo) / 2
        if len(values) < 2:
            print(f"{arm}: 1 seed ({values[0]:.3f}); bootstrap half-width over splits and questions "
                  f"{bootstrap:.3f}; the seed-to-seed spread needs a second seed")
            continue
        sd = float(values.std(ddof=1))
        now = half_width(sd, len(values))
        # The table's bootstrap resamples splits and questions inside each resampled seed as well, so it runs
        # wider than t over seeds; its projection scales the spread by the ratio seen now.
        factor = bootstrap / now if now > 0 else 1.0
        print(f"{arm}: {len(values)} seeds, mean {values.mean():.3f}, sd {sd:.3f}; half-width now "
              f"{now:.3f} (t over seeds), {bootstrap:.3f} (the table's bootstrap, {factor:.2f}x); to {args.target}: "
              f"{seeds_needed(sd, args.target)} seeds by t, {seeds_needed(sd * factor, args.target)} for the bootstrap")
    print_trend(by_rank, args.trend_target)
    budget = budget_of(units)
    if len(budget) >= 2:
        print_primary_contrast(auc_per_seed(units), args.auc_target, args.most_seeds)


def print_trend(by_rank: dict[int, dict[int, float]], target: float) -> None:
    """The paired trend over the LoRA ranks (the full reference has no rank to place on the axis): each seed's
    slope of recovery against log2(rank), and the seeds that bring its half-width to `target`."""
    by_rank = {rank: seeds for rank, seeds in by_rank.items() if rank}
    common = sorted(set.intersection(*(set(p) for p in by_rank.values()))) if by_rank else []
    if len(by_rank) < 2 or len(common) < 2:
        return
    x = np.log2(np.array(sorted(by_rank), dtype=float))
    x -= x.mean()
    slopes = np.array([(x * np.array([by_rank[r][s] for r in sorted(by_rank)])).sum() / (x ** 2).sum()
                       for s in common])
    sd = float(slopes.std(ddof=1))
    print(f"trend: {len(common)} paired seeds, slope per doubling {slopes.mean():+.4f}, sd {sd:.4f}; half-width "
          f"now {half_width(sd, len(common)):.4f}; {seeds_needed(sd, target)} seeds bring it to {target}")


def auc_per_seed(units) -> dict[str, dict[int, float]]:
    """{arm: {seed: area under that seed's recovery curve}} (toolkit.estimates.recovery_auc_of over the seed's
    held-out splits); seeds without a whole curve are left out."""
    arms = {arm_of(u.setting): [v for v in units if v.setting == u.setting] for u in units}
    return {arm: {s: v for s, v in per_seed(group, MEASURES["recovery_auc"]).items() if not math.isnan(v)}
            for arm, group in arms.items()}


def print_primary_contrast(auc: dict[str, dict[int, float]], target: float, most: int) -> None:
    for arm, seeds in auc.items():
        print(f"area under the recovery curve, {arm}: " + ", ".join(f"seed {s} {v:.3f}" for s, v in seeds.items()))
    for high, low in (("rank 64", "rank 1"), ("full", "rank 1")):
        if high not in auc or low not in auc:
            continue
        paired = sorted(set(auc[high]) & set(auc[low]))
        diffs = np.array([auc[high][s] - auc[low][s] for s in paired])
        if len(diffs) < 2:
            print(f"{high} - {low}: {len(diffs)} paired seed(s); the seed-to-seed spread needs a second")
            continue
        sd = float(diffs.std(ddof=1))
        needed = seeds_needed(sd, target)
        plan = (f"{needed} seeds bring it to {target}" if needed is not None and needed <= most else
                f"more than {most} seeds would be needed; {most} reach about {half_width(sd, most):.3f}")
        print(f"{high} - {low} (primary): {len(diffs)} paired seeds, mean {diffs.mean():+.3f}, sd {sd:.3f}; "
              f"half-width now {half_width(sd, len(diffs)):.3f}; {plan}")


if __name__ == "__main__":
    main()
