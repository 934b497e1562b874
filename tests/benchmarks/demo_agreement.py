"""How often would a faithful run of the demo agree with the published study?

The demo reruns one published seed on the user's machine and ends with one
verdict over all ranks (toolkit.comparison.verdict_sentence: Holm over the
per-rank prediction intervals, family-wise 95%). The same seed on another
CPU is only partly the same draw (bf16 kernels round differently and the
stop rule turns last bits into other stops), so this simulates the demo's
rerun of each candidate seed from the published per-seed spread:

    rerun = mean + rho * (published value - mean) + sqrt(1 - rho^2) * sd * z

per rank, with rho how much of a seed carries over to another machine,
estimated from the rerun of seeds 0-4 on a second machine
(results/rank_study_rerun), and mean and sd from the other seeds. It also
counts, as a check that needs no model of the spread, how many published
seeds agree with the others under the same test (each as if it were a new
seed). The demo's seed is the one whose simulated agreement is highest.

    python tests/benchmarks/demo_agreement.py [--splits 2] [--draws 20000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import analyze_recovery  # noqa: E402
from toolkit.comparison import agreement_rate, holm_misses, per_seed, predict  # noqa: E402

RANKS = (1, 8, 64)


def values_per_seed(results_dir: Path, splits: int) -> dict[int, dict[int, float]]:
    """{rank: {seed: recovered fraction on held-out splits 0..splits-1}}."""
    units, _ = analyze_recovery.units_of(analyze_recovery.load_results(results_dir), analyze_recovery.Options())
    return {rank: {s: v for s, v in per_seed([u for u in units if u.setting.lora_rank == rank
                                               and u.split < splits and "B" in u.vectors]).items()
                   if not np.isnan(v)} for rank in RANKS}


def carry_over(published: dict, rerun: dict) -> tuple[float, int]:
    """Correlation of a seed's value on two machines, deviations from each rank's published mean pooled."""
    pairs = [(published[r][s] - np.mean(list(published[r].values())), rerun[r][s] - np.mean(list(published[r].values())))
             for r in RANKS for s in rerun[r] if s in published[r]]
    x, y = np.array(pairs).T
    return float(np.corrcoef(x, y)[0, 1]), len(pairs)


def seed_agrees_with_others(values: dict, seed: int) -> bool:
    found = [predict(f"rank {r}", values[r][seed], [seed], "", [v for s, v in values[r].items() if s != seed]) for r in RANKS]
    return not holm_misses(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=2, help="held-out splits the demo runs (ft.num_splits)")
    parser.add_argument("--draws", type=int, default=20000)
    args = parser.parse_args()
    values = values_per_seed(ROOT / "results" / "rank_study", args.splits)
    rho, n_pairs = carry_over(values, values_per_seed(ROOT / "results" / "rank_study_rerun", args.splits))
    rho = max(0.0, rho)
    candidates = sorted(set.intersection(*(set(values[r]) for r in RANKS)))
    loo = [s for s in candidates if seed_agrees_with_others(values, s)]
    print(f"splits 0-{args.splits - 1}; carry-over between machines rho = {rho:.2f} ({n_pairs} seed-rank pairs of "
          f"results/rank_study_rerun); published seeds that agree with the others at every rank: {len(loo)} of "
          f"{len(candidates)}")
    print("seed  " + "  ".join(f"rank {r:>2}" for r in RANKS) + "  agree (rho=0)  agree (rho)")
    rates = {}
    for seed in candidates:
        others = {r: [v for s, v in values[r].items() if s != seed] for r in RANKS}
        centre = {r: float(np.mean(others[r])) for r in RANKS}
        mine = {r: values[r][seed] for r in RANKS}
        rng = np.random.default_rng(seed)
        new = agreement_rate(mine, centre, others, 0.0, args.draws, rng)
        rates[seed] = agreement_rate(mine, centre, others, rho, args.draws, rng)
        print(f"{seed:>4}  " + "  ".join(f"{mine[r]:7.2f}" for r in RANKS) + f"  {new:13.3f}  {rates[seed]:11.3f}")
    best = max(rates, key=lambda s: (rates[s], -s))
    print(f"highest simulated agreement: seed {best} ({rates[best]:.3f} of {args.draws} simulated reruns agree at every "
          "rank)")


if __name__ == "__main__":
    main()
