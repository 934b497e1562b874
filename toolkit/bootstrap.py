"""Paired bootstrap statistics for the recovery analysis: one
panel of draws over seeds, held-out splits and questions shared by every
setting of a method and dataset, ratios of means, the trend per doubling of
rank and the paired differences from the same draws, and prediction
intervals for a slice of seeds; a permutation test of rank correlation."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.stats import PermutationMethod, pearsonr, rankdata

from toolkit.names import CHANCE


@dataclass
class Unit:
    """One unlearned model (one seed) and one of its forget files: every
    measure's per-question correctness on that file."""

    setting: tuple  # the analysis's Setting (method, dataset, lora_rank, lr, ...)
    seed: int
    file: str
    split: int
    vectors: dict[str, np.ndarray]
    retain_before: float
    retain_after: float
    recovery_epoch: float
    model_path: str
    machine: str = ""  # the machine and numeric path that produced the run (its provenance columns)
    update_rel_norm: float = math.nan  # how far a LoRA run moved the weights (its row's update size)


@dataclass
class Panel:
    """The units of one (method, dataset): seeds x files, with the same
    bootstrap draws for every setting in it (paired comparisons)."""

    seeds: list[int]
    files: list[str]
    draws: int
    rng_seed: int
    question_draws: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        rng = np.random.default_rng(self.rng_seed)
        self.seed_draw = rng.integers(0, len(self.seeds), size=(self.draws, len(self.seeds)))
        self.file_draw = rng.integers(0, len(self.files), size=(self.draws, len(self.seeds), len(self.files)))
        self.rng = rng

    def questions(self, file: str, n: int) -> np.ndarray:
        if (file, n) not in self.question_draws:
            self.question_draws[(file, n)] = self.rng.integers(0, n, size=(self.draws, n))
        return self.question_draws[(file, n)]

    def replicate_means(self, units: list[Unit], measure: str) -> np.ndarray:
        """[seeds, files, draws]: the measure's mean over resampled questions (NaN where absent)."""
        out = np.full((len(self.seeds), len(self.files), self.draws), np.nan)
        for unit in units:
            vector = unit.vectors.get(measure)
            if vector is None:
                continue
            s, f = self.seeds.index(unit.seed), self.files.index(unit.file)
            out[s, f] = vector[self.questions(unit.file, len(vector))].mean(axis=1) if len(vector) > 1 else vector[0]
        return out

    def resample(self, per_unit: np.ndarray) -> np.ndarray:
        """Average a [seeds, files, draws] array over resampled seeds and files: one value per draw."""
        draws = np.arange(self.draws)[:, None, None]
        picked = per_unit[self.seed_draw[:, :, None], self.file_draw, draws]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a draw may pick only units without this measure
            return np.nanmean(picked.reshape(self.draws, -1), axis=1)


def ratio(num: np.ndarray, sub: np.ndarray, ref: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        denominator = ref - sub
        return np.where(np.abs(denominator) > 1e-12, (num - sub) / denominator, np.nan)


def interval(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def point_means(units: list[Unit], measure: str) -> np.ndarray:
    return np.array([u.vectors[measure].mean() if measure in u.vectors else np.nan for u in units])


def nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


def nanstd(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.std()) if len(values) else math.nan


def binomial_below_chance_p(correct: int, n: int, p: float = CHANCE) -> float:
    """P(X <= correct) for X ~ Binomial(n, p): small when the model avoids the right answer."""
    return float(sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(correct + 1))) if n else math.nan


@dataclass
class Estimates:
    row: dict
    replicates: dict[str, np.ndarray]


@dataclass
class Trend:
    method: str
    dataset: str
    measure: str
    slope: float
    lo: float
    hi: float
    ranks: list[int]

    def sentence(self) -> str:
        label = MEASURE_NAMES.get(self.measure, self.measure.replace("_", " "))
        verdict = ("no detectable trend (the CI includes 0)" if self.lo <= 0 <= self.hi
                   else "it rises with rank" if self.lo > 0 else "it falls with rank")
        return (f"trend ({self.method}, {self.dataset}, ranks {', '.join(map(str, self.ranks))}): {label} changes by "
                f"{self.slope:+.3f} per doubling of LoRA rank (95% CI {self.lo:+.3f} to {self.hi:+.3f}): {verdict}")


@dataclass
class Difference:
    """A rank's recovered fraction minus the lowest rank's, from the same
    bootstrap draws (paired: a seed or split that is hard at every rank moves
    both terms together and cancels)."""

    method: str
    dataset: str
    rank: int
    lowest: int
    value: float
    lo: float
    hi: float
    measure: str = "recovered_fraction"

    def sentence(self) -> str:
        larger = "at the larger rank" if self.rank else "with full fine-tuning"
        label = MEASURE_NAMES.get(self.measure, self.measure.replace("_", " "))
        at = f"rank {self.rank}" if self.rank else "full fine-tuning"  # rank 0: the full-parameter reference
        head = f"paired difference ({self.method}, {self.dataset}): {label} at {at} minus rank {self.lowest}"
        if math.isnan(self.value) or math.isnan(self.lo) or math.isnan(self.hi):
            # a slice still running, say: one of the two has no value yet, so there is no verdict either
            return f"{head}: not estimable (no value at one of the two yet)"
        verdict = ("no detectable difference (the CI includes 0)" if self.lo <= 0 <= self.hi
                   else f"higher {larger}" if self.lo > 0 else f"lower {larger}")
        return f"{head} = {self.value:+.3f} (95% CI {self.lo:+.3f} to {self.hi:+.3f}): {verdict}"


MEASURE_NAMES = {"recovery_auc": "area under the recovery curve (log steps)"}


def paired_differences(method: str, dataset: str, ordered: list, measure: str = "recovered_fraction") -> list[Difference]:
    """Each rank against the lowest, for one measure (ordered: [(setting, Estimates)] by rank)."""
    (low_setting, low), rest = ordered[0], ordered[1:]
    out = []
    for setting, est in rest:
        lo, hi = interval(est.replicates[measure] - low.replicates[measure])
        out.append(Difference(method, dataset, setting.lora_rank, low_setting.lora_rank,
                              est.row[measure] - low.row[measure], lo, hi, measure))
    return out


def trend(ranks: Sequence[int], points: Sequence[float], replicates: Sequence[np.ndarray]) -> tuple[float, float, float]:
    """Least-squares slope of a measure against log2(rank), with a bootstrap CI
    (the replicates of every rank come from the same draws)."""
    x = np.log2(np.asarray(ranks, dtype=float))
    x = x - x.mean()
    slope = float((x * (np.asarray(points) - np.mean(points))).sum() / (x ** 2).sum())
    stacked = np.vstack(replicates)  # [ranks, draws]
    ok = ~np.isnan(stacked).any(axis=0)
    slopes = (x[:, None] * (stacked[:, ok] - stacked[:, ok].mean(axis=0))).sum(axis=0) / (x ** 2).sum()
    lo, hi = interval(slopes)
    return slope, lo, hi


def recovered_fraction_of(units: list[Unit]) -> float:
    """(B - A) / (base - A) of the means over these units (as the table's point)."""
    rtt = [u for u in units if "B" in u.vectors]
    means = {m: np.mean([u.vectors[m].mean() for u in rtt]) for m in ("B", "A", "base")} if rtt else {}
    return float(ratio(means["B"], means["A"], means["base"])) if rtt else math.nan


def budget_of(units: list[Unit]) -> tuple[int, ...]:
    """The steps B was read at along the attacker's budget (empty: the rows have no schedule)."""
    return tuple(sorted({int(m.split("@")[1]) for u in units for m in u.vectors if m.startswith("B@")}))


def log_steps(steps: Sequence[int]) -> np.ndarray:
    """Where a step lies on the budget's axis: log2(1 + step), so step 0 is 0 and each doubling is one."""
    return np.log2(1 + np.asarray(steps, dtype=float))


def area_under(curve: np.ndarray, steps: Sequence[int]) -> np.ndarray:
    """The area under recovered fraction against log steps, over the schedule's span (0-1 when the curve is):
    the trapezoid rule along the last axis."""
    x = log_steps(steps)
    with np.errstate(invalid="ignore"):
        return ((curve[..., 1:] + curve[..., :-1]) / 2 * np.diff(x)).sum(axis=-1) / (x[-1] - x[0])


def recovery_auc_of(units: list[Unit]) -> float:
    """The area under the recovery curve of these units' means (as the table's point): at each budget step
    (mean B@s - mean A) / (mean base - mean A), over the units that hold every step; NaN without a schedule."""
    budget = budget_of(units)
    read = [u for u in units if "A" in u.vectors and all(f"B@{s}" in u.vectors for s in budget)]
    if len(budget) < 2 or not read:
        return math.nan
    mean = {m: np.mean([u.vectors[m].mean() for u in read]) for m in ("base", "A", *(f"B@{s}" for s in budget))}
    curve = np.array([ratio(mean[f"B@{s}"], mean["A"], mean["base"]) for s in budget], dtype=float)
    return float(area_under(curve, budget))


def rank_correlation(x: Sequence[float], y: Sequence[float], draws: int = 20000) -> tuple[float, float]:
    """Spearman's rho (Pearson's r of the ranks) and its two-sided permutation
    p-value: exact over every pairing when there are at most `draws` of them
    (a study has a few runs a rank, where the t approximation scipy's
    spearmanr uses gives p 0 for 3 runs in order; the exact p there is 1/3),
    else from `draws` random ones."""
    result = pearsonr(rankdata(x), rankdata(y), method=PermutationMethod(n_resamples=draws, rng=0))
    return float(result.statistic), float(result.pvalue)
