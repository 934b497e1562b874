"""A slice of the study against the published rows: the same keys (did the
same job give the same answers?), the same seeds (paired over seeds), the
other seeds (a prediction interval for a new seed), each machine against the
others, and one verdict over every arm (LoRA rank or the full reference) at
a family-wise 95% level, on the study's primary measure.

Works on the analysis's units (toolkit.bootstrap.Unit) and on the row
frames the analysis reads; it never imports pandas itself."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from toolkit.bootstrap import Unit, budget_of, recovered_fraction_of, recovery_auc_of
from toolkit.results import TABLES

LEVEL = 0.95


@dataclass(frozen=True)
class Measure:
    """What a comparison compares: one number per group of units (a seed's, a slice's)."""

    label: str
    of: Callable[[list[Unit]], float]


MEASURES = {
    "recovered_fraction": Measure("recovered fraction", recovered_fraction_of),
    "recovery_auc": Measure("area under the recovery curve", recovery_auc_of),
}


def primary_measure(units: list[Unit]) -> Measure:
    """The study's primary measure: the area under the recovery curve where the
    rows read V along the attacker's budget (the second edition), else the
    recovered fraction at the ceiling (the first)."""
    return MEASURES["recovery_auc" if len(budget_of(units)) >= 2 else "recovered_fraction"]


def arm_of(setting: tuple) -> str:
    """An arm as the study names it: a LoRA rank, or the full-parameter reference."""
    return f"rank {setting.lora_rank}" if setting.lora_rank else "full"


def t_quantile(p: float, df: int) -> float:
    return float(stats.t.ppf(p, df))


# --------------------------------------------------------------------------
# Another seed: a prediction interval from the published per-seed spread
# --------------------------------------------------------------------------


@dataclass
class Agreement:
    """A slice of k seeds against the published rows of n other seeds: a
    prediction interval for the mean of k new seeds drawn from the published
    per-seed spread (centre +- t * sd * sqrt(1/k + 1/n)), so the slice's own
    few seeds are counted, not only the published mean's uncertainty."""

    arm: str  # "rank 8", "full"
    mine: float
    my_seeds: list[int]
    splits: str
    published: float
    spread: float  # sd * sqrt(1/k + 1/n): the interval's scale
    n_published: int

    @property
    def comparable(self) -> bool:
        return self.n_published >= 2 and not math.isnan(self.mine)

    def bounds(self, level: float = LEVEL) -> tuple[float, float]:
        half = t_quantile(1 - (1 - level) / 2, self.n_published - 1) * self.spread if self.n_published >= 2 else math.nan
        return self.published - half, self.published + half

    @property
    def lo(self) -> float:
        return self.bounds()[0]

    @property
    def hi(self) -> float:
        return self.bounds()[1]

    @property
    def agrees(self) -> bool:
        return self.comparable and self.lo <= self.mine <= self.hi

    @property
    def p_value(self) -> float:
        """Two-sided: how unusual the slice is for new seeds of the published spread."""
        if not self.comparable:
            return math.nan
        if self.spread == 0:
            return 1.0 if self.mine == self.published else 0.0
        return float(2 * stats.t.sf(abs(self.mine - self.published) / self.spread, self.n_published - 1))

    def sentence(self) -> str:
        seeds = ", ".join(map(str, self.my_seeds))
        head = f"agreement, {self.arm}: this slice (seed {seeds}; splits {self.splits}) {self.mine:.2f}"
        if not self.comparable:
            return f"{head}; too few published seeds ({self.n_published}) to compare"
        verdict = "agrees" if self.agrees else "DOES NOT AGREE"
        return (f"{head} vs published {self.published:.2f} over {self.n_published} other seeds; 95% prediction "
                f"interval for {len(self.my_seeds)} seed(s) [{self.lo:.2f}, {self.hi:.2f}]: {verdict}")


def predict(arm: str, mine: float, my_seeds: list[int], splits: str, others: Iterable[float]) -> Agreement:
    """The slice's value against the per-seed values of the seeds it lacks."""
    values = np.array([v for v in others if not math.isnan(v)], dtype=float)
    n, k = len(values), max(1, len(my_seeds))
    centre = float(values.mean()) if n else math.nan
    spread = float(values.std(ddof=1)) * math.sqrt(1 / k + 1 / n) if n >= 2 else math.nan
    return Agreement(arm, mine, my_seeds, splits, centre, spread, n)


def setting_order(setting: tuple) -> tuple:
    """Method, dataset, then rank: the order slice checks print in."""
    return str(setting.unlearn_type), str(setting.dataset), setting.lora_rank or 0, str(setting[3:])


def per_seed(units: list[Unit], measure: Measure = MEASURES["recovered_fraction"]) -> dict[int, float]:
    """Each seed's value of the measure over its units (ratios of its means)."""
    by_seed: dict[int, list[Unit]] = {}
    for u in units:
        by_seed.setdefault(u.seed, []).append(u)
    return {seed: measure.of(group) for seed, group in by_seed.items()}


def agreements(mine: list[Unit], published: list[Unit],
               measure: Measure = MEASURES["recovered_fraction"]) -> list[Agreement]:
    """Per setting of the slice: its value of the measure against a prediction
    interval from the published seeds it lacks, on the held-out splits it has
    (a slice may hold out fewer)."""
    out = []
    for setting in sorted({u.setting for u in mine}, key=setting_order):
        my_units = [u for u in mine if u.setting == setting and "B" in u.vectors]
        my_seeds, my_files = sorted({u.seed for u in my_units}), {u.file for u in my_units}
        theirs = [u for u in published if u.setting == setting and u.seed not in my_seeds and u.file in my_files]
        splits = ", ".join(map(str, sorted({u.split for u in my_units})))
        out.append(predict(arm_of(setting), measure.of(my_units), my_seeds, splits,
                           per_seed(theirs, measure).values()))
    return out


# --------------------------------------------------------------------------
# One verdict over every arm (Holm, family-wise 95%)
# --------------------------------------------------------------------------


def holm_misses(found: Sequence, level: float = LEVEL) -> list:
    """The arms that disagree beyond chance with all arms tested together:
    Holm's step-down on the checks' p-values (prediction intervals, or a
    rerun's paired bootstrap) keeps the chance that a faithful slice is
    called different at any arm below 1 - level."""
    alpha = 1 - level
    ordered = sorted((a for a in found if a.comparable), key=lambda a: a.p_value)
    misses = []
    for i, a in enumerate(ordered):
        if a.p_value > alpha / (len(ordered) - i):
            break
        misses.append(a)
    return misses


def verdict_sentence(found: Sequence, not_compared: Sequence[str] = (), level: float = LEVEL) -> str:
    """The demo's last line, for a newcomer. `found`: one check per arm (an
    Agreement or a SameSeeds); `not_compared`: the arms whose run was flagged."""
    compared = [a for a in found if a.comparable]
    noun = "rank" if all(arm.startswith("rank ") for arm in [*(a.arm for a in found), *not_compared]) else "arm"
    if not compared:
        return f"verdict: nothing to compare (no {noun} of this run has published seeds to compare with)"
    n = len(compared)
    how = (f"{n} {noun}{'s' if n > 1 else ''} checked together at a family-wise {level:.0%} level, Holm"
           + (f"; {', '.join(not_compared)} not compared (flagged)" if not_compared else ""))
    misses = holm_misses(found, level)
    if not misses:
        every = f"every {noun}" if not not_compared else f"every {noun} it could compare"
        return f"verdict: your run agrees with the published study at {every} ({how})"
    missed = [a for a in found if a in misses]  # in the arms' own order
    ps = ", ".join(f"p = {a.p_value:.3g}" for a in missed)
    return (f"verdict: your run disagrees with the published study at {', '.join(a.arm for a in missed)}, beyond "
            f"chance ({ps}; {how})")


def agreement_rate(values: Mapping[int, float], centre: Mapping[int, float], others: Mapping[int, Sequence[float]],
                   rho: float, draws: int, rng: np.random.Generator, level: float = LEVEL) -> float:
    """How often a faithful rerun of one published seed agrees at every rank
    under the verdict's test, by simulation: per rank, the rerun is
    mean + rho * (its published value - mean) + sqrt(1 - rho^2) * sd * z,
    where rho is how much of a seed's draw carries over to another machine
    (0: a new seed; 1: the same bits) and mean and sd are the other seeds'."""
    ranks = sorted(values)
    # Each rank's interval depends only on the other seeds: built once, then each draw takes its place.
    intervals = {rank: predict(f"rank {rank}", math.nan, [0], "", others[rank]) for rank in ranks}
    spread = {rank: float(np.std(others[rank], ddof=1)) for rank in ranks}
    agree = 0
    for _ in range(draws):
        found = []
        for rank in ranks:
            draw = (centre[rank] + rho * (values[rank] - centre[rank])
                    + math.sqrt(1 - rho ** 2) * spread[rank] * rng.normal())
            found.append(dataclasses.replace(intervals[rank], mine=draw))
        agree += not holm_misses(found, level)
    return agree / draws


# --------------------------------------------------------------------------
# The same seeds (a rerun of published seeds, on another machine say)
# --------------------------------------------------------------------------


@dataclass
class SameSeeds:
    """A slice that reran published seeds against the published rows of those
    same seeds, one arm: the difference in the measure, with a paired 95%
    interval (a seed that is easy on every machine cancels, so this asks about
    the rerun, not about whether these seeds are typical). Over seeds (t) when
    the slice reran two or more; over the questions of its held-out splits
    (bootstrap, both sides resampled alike) when it reran one: then it asks
    whether the rerun measured the same value, within what those questions
    resolve, which is what a path that keeps the update promises on any CPU."""

    arm: str
    seeds: list[int]
    mine: float  # means over the paired seeds of per-seed values
    published: float
    lo: float  # 95% CI of the mean difference
    hi: float
    p_value: float = math.nan
    paired_over: str = ""  # "3 seeds", "the questions of splits 0, 1"

    @property
    def comparable(self) -> bool:
        return not math.isnan(self.lo)

    @property
    def agrees(self) -> bool:
        return self.comparable and self.lo <= 0 <= self.hi

    def sentence(self) -> str:
        seeds = ", ".join(map(str, self.seeds))
        head = (f"same seeds, {self.arm}: this slice {self.mine:.2f} vs published {self.published:.2f} "
                f"on seed {seeds}")
        if not self.comparable:
            return f"{head}; one pair gives no interval"
        verdict = "no detectable difference (the CI includes 0)" if self.agrees else "DIFFERS"
        return (f"{head}: difference {self.mine - self.published:+.2f} (95% CI {self.lo:+.2f} to {self.hi:+.2f}, "
                f"paired over {self.paired_over}): {verdict}")


def same_seeds(arm: str, mine: dict[int, float], published: dict[int, float]) -> SameSeeds | None:
    """Per-seed values of a slice and of the published rows ({seed: value}),
    paired on the seeds both have a value for (t over seeds); None when they share none."""
    seeds = sorted(s for s in mine if s in published and not (math.isnan(mine[s]) or math.isnan(published[s])))
    if not seeds:
        return None
    differences = np.array([mine[s] - published[s] for s in seeds])
    k, centre = len(seeds), float(differences.mean())
    half, p = math.nan, math.nan
    if k >= 2:
        sd = float(differences.std(ddof=1))
        half = t_quantile(0.975, k - 1) * sd / math.sqrt(k)
        p = float(2 * stats.t.sf(abs(centre) / (sd / math.sqrt(k)), k - 1)) if sd > 0 else float(centre == 0)
    return SameSeeds(arm, seeds, float(np.mean([mine[s] for s in seeds])), float(np.mean([published[s] for s in seeds])),
                     centre - half, centre + half, p, f"{k} seeds")


def over_questions(arm: str, mine: list[Unit], theirs: list[Unit], measure: Measure, draws: int,
                   rng_seed: int) -> SameSeeds | None:
    """One rerun seed against its published twin: the units paired by file,
    each file's questions resampled alike on both sides (the same bootstrap as
    the analysis's), the difference's percentile interval and two-sided p."""
    pairs = [(u, t) for u in mine for t in theirs if (t.seed, t.file) == (u.seed, u.file)
             and t.vectors.keys() >= u.vectors.keys()]
    if not pairs or any(len(v) < 2 for u, _ in pairs for v in u.vectors.values()):
        return None  # rows without per-question answers resample nothing
    sizes = [len(next(iter(u.vectors.values()))) for u, _ in pairs]
    if any(len(v) != n or len(t.vectors[m]) != n for (u, t), n in zip(pairs, sizes) for m, v in u.vectors.items()):
        return None
    mine_value, their_value = measure.of([u for u, _ in pairs]), measure.of([t for _, t in pairs])
    if math.isnan(mine_value - their_value):
        return None
    rng = np.random.default_rng(rng_seed)
    differences = np.empty(draws)
    for d in range(draws):
        picks = [rng.integers(0, n, n) for n in sizes]
        differences[d] = (measure.of([dataclasses.replace(u, vectors={m: v[i] for m, v in u.vectors.items()})
                                      for (u, _), i in zip(pairs, picks)])
                          - measure.of([dataclasses.replace(t, vectors={m: t.vectors[m][i] for m in u.vectors})
                                        for (u, t), i in zip(pairs, picks)]))
    differences = differences[~np.isnan(differences)]
    if not len(differences):
        return None
    lo, hi = (float(q) for q in np.quantile(differences, [0.025, 0.975]))
    p = 1.0 if np.all(differences == 0) else min(1.0, 2 * min(np.mean(differences <= 0), np.mean(differences >= 0)))
    splits = ", ".join(map(str, sorted({u.split for u, _ in pairs})))
    return SameSeeds(arm, sorted({u.seed for u, _ in pairs}), mine_value, their_value, lo, hi, float(p),
                     f"the questions of splits {splits}")


def same_seed_checks(mine: list[Unit], published: list[Unit], measure: Measure = MEASURES["recovered_fraction"],
                     draws: int = 0, rng_seed: int = 0) -> list[SameSeeds]:
    """Per setting of the slice: its seeds against the published rows of the
    same seeds, on the held-out splits the slice has; a single seed is paired
    over its questions when `draws` are given (else it has no interval)."""
    out = []
    for setting in sorted({u.setting for u in mine}, key=setting_order):
        my_units = [u for u in mine if u.setting == setting and "B" in u.vectors]
        files = {u.file for u in my_units}
        theirs = [u for u in published if u.setting == setting and u.file in files]
        check = same_seeds(arm_of(setting), per_seed(my_units, measure), per_seed(theirs, measure))
        if check and len(check.seeds) == 1 and draws:
            theirs = [u for u in theirs if u.seed in check.seeds]
            check = over_questions(arm_of(setting), my_units, theirs, measure, draws, rng_seed) or check
        if check:
            out.append(check)
    return out


# --------------------------------------------------------------------------
# Machines: which one a row ran on, and each one's seeds against the others'
# --------------------------------------------------------------------------

UNRECORDED = "machine not recorded"


def machine_of(run: Mapping[str, Any]) -> str:
    """The machine and numeric path a run's provenance columns name (CPU, GPU,
    device, weight dtype, bf16 autocast): runs that read alike here ran alike."""
    cpu, gpu = run.get("machine_cpu"), run.get("machine_gpu")
    if not isinstance(cpu, str) or not cpu:
        return UNRECORDED
    where = f"{cpu} + {gpu}" if isinstance(gpu, str) and gpu else cpu
    return f"{where}; {numeric_path_of(run)}"


def seed_ranges(seeds: Sequence[int]) -> str:
    """0, 2, 5-9: consecutive seeds as ranges."""
    spans: list[list[int]] = []
    for seed in sorted(set(seeds)):
        if spans and seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


@dataclass
class MachineCheck:
    """One machine's seeds against the prediction intervals from the other
    machines' seeds, per rank: a study that mixes machines says whether they
    tell the same story."""

    machine: str
    seeds: list[int]
    found: list[Agreement]

    def sentence(self) -> str:
        arms = "; ".join(f"{a.arm} {a.mine:.2f} in [{a.lo:.2f}, {a.hi:.2f}]" if a.comparable else
                         f"{a.arm} {a.mine:.2f} (too few other seeds)" for a in self.found)
        missed = [a.arm for a in self.found if a.comparable and not a.agrees]
        noun = "rank" if all(a.arm.startswith("rank ") for a in self.found) else "arm"
        verdict = (f"DOES NOT AGREE at {', '.join(missed)}" if missed else
                   f"agrees at every {noun}" if all(a.comparable for a in self.found) else "agrees where comparable")
        return f"machine {self.machine} (seeds {seed_ranges(self.seeds)}): {arms}: {verdict}"


def by_machine(units: list[Unit]) -> list[MachineCheck]:
    """Where the rows come from more than one machine or numeric path: each
    one's seeds against the others' (empty when there is one)."""
    machines = sorted({u.machine for u in units})
    if len(machines) < 2:
        return []
    return [MachineCheck(m, sorted({u.seed for u in units if u.machine == m}),
                         agreements([u for u in units if u.machine == m], [u for u in units if u.machine != m],
                                    primary_measure(units)))
            for m in machines]


def machine_lines(units: list[Unit]) -> list[str]:
    """The by-machine check as printed (nothing where the rows name one machine)."""
    checks = by_machine(units)
    head = "by machine, each one's seeds against a 95% prediction interval from the other machines' seeds:"
    return [head, *[c.sentence() for c in checks]] if checks else []


# --------------------------------------------------------------------------
# The same keys: did the same job give the same answers?
# --------------------------------------------------------------------------

# What a job's row says it found (beside its settings and provenance): two rows
# of one key that agree here ran the same job to the same answers.
OUTCOMES = {"unlearning": ("stop_step", "forget_correct", "retain_accs"), "rtt": ("forget_correct_local",),
            "quant": ("forget_correct",)}
TABLE_OF = {"unlearning": TABLES["unlearn"], "rtt": TABLES["rtt"], "quant": TABLES["quant"]}  # by Results' fields


def same_key_sentence(mine, published) -> str | None:
    """How many of the slice's jobs the published rows hold under the same key,
    and how many of those came out identical (every stop and every answer):
    the strongest check a slice can give; the machines of both sides are
    named, since the same job on another CPU need not give the same bits.
    `mine` and `published` are the analysis's Results (frames per stage)."""
    counts, machines = [], set()
    for stage, outcome in OUTCOMES.items():
        a, b = getattr(mine, stage), getattr(published, stage)
        key = TABLE_OF[stage].key
        if a.empty or b.empty or key not in a or key not in b:
            continue
        shared = a.merge(b, on=key, suffixes=("", "_published"))
        if shared.empty:
            continue
        identical = len(shared)
        columns = [c for c in outcome if c in a and c in b]
        if columns:
            same = np.logical_and.reduce([(shared[c].map(str) == shared[f"{c}_published"].map(str)).to_numpy()
                                          for c in columns])
            identical = int(same.sum())
        counts.append(f"{identical} of {len(shared)} {'RTT' if stage == 'rtt' else stage} rows")
        if stage == "unlearning":
            ours, theirs = ({row[key]: machine_of(row) for _, row in frame.iterrows()} for frame in (a, b))
            machines = {(ours[k], theirs[k]) for k in shared[key]}
    machines -= {(UNRECORDED, UNRECORDED)}
    if not counts:
        return None
    sides = "; ".join(f"this slice on {m}, published on {p}" for m, p in sorted(machines))
    return f"same keys as published rows: {', '.join(counts)} identical" + (f" ({sides})" if sides else "")


def left_out_sentence(run, published: list[Unit], published_left_out: Sequence) -> str:
    """A rank the slice cannot compare: its run was flagged, as the study's
    own runs sometimes are (how often says whether that is itself unusual).
    `run` and `published_left_out` are the analysis's LeftOut records."""
    flagged = sum(1 for r in published_left_out if (r.unlearn_type, r.lora_rank) == (run.unlearn_type, run.lora_rank))
    kept = len({u.seed for u in published if (u.setting.unlearn_type, u.setting.lora_rank) == (run.unlearn_type, run.lora_rank)})
    return (f"agreement, {arm_of(run)}: this slice's run (seed {run.seed}) was flagged ({run.reason}) and left "
            f"out, so there is nothing to compare (published runs at this {'rank' if run.lora_rank else 'arm'}: "
            f"{flagged} of {flagged + kept} flagged)")


# --------------------------------------------------------------------------
# What may be compared: one scoring mode, shared datasets, one numeric path
# --------------------------------------------------------------------------

STAGES = ("unlearning", "rtt", "quant")


def scoring_of(row: Mapping[str, Any]) -> str:
    """A row's scoring mode (rows written before scoring modes existed were letter-scored)."""
    mode = row.get("scoring")
    return mode if isinstance(mode, str) and mode else "letter"


def numeric_path_of(row: Mapping[str, Any]) -> str:
    """The numeric path a row ran on (device, weight dtype, bf16 autocast): the
    study keeps paths apart, since the same job on two paths is two jobs."""
    device, dtype = row.get("device"), row.get("dtype")
    if not isinstance(device, str) or not device:
        return UNRECORDED
    return f"{device} {dtype}" + (" + bf16 autocast" if str(row.get("bf16_autocast")) == "True" else "")


def counted(values: Iterable[str]) -> str:
    """`letter: 12 rows, choice: 30 rows`, in first-seen order."""
    values = list(values)
    return ", ".join(f"{v}: {values.count(v)} row(s)" for v in dict.fromkeys(values))


def check_one_scoring_mode(results, where: str) -> str:
    """Refuse rows that mix scoring modes (a table across modes means nothing); the one mode."""
    modes = [scoring_of(row) for stage in STAGES for _, row in getattr(results, stage).iterrows()]
    if len(set(modes)) > 1:
        raise ValueError(f"the rows under {where} mix scoring modes ({counted(modes)}); a table across modes means "
                         "nothing: move each mode's rows to a folder of its own and analyse them one at a time")
    return modes[0] if modes else "letter"


def paths_of(results) -> list[str]:
    return [numeric_path_of(row) for _, row in results.unlearning.iterrows()]


def on_path(results, path: str):
    """The rows of `results` (a frame per stage) that ran on `path`; an RTT or
    probe row that records no path follows the unlearning row it belongs to."""
    def keep(frame, stage):
        paths = frame.apply(numeric_path_of, axis=1)
        return frame[(paths == path) | ((paths == UNRECORDED) & (stage != "unlearning"))]

    return dataclasses.replace(results, **{stage: keep(frame, stage) if not frame.empty else frame
                                           for stage in STAGES for frame in [getattr(results, stage)]})


def comparable_published(mine, mine_dir: str, published: Sequence[tuple[str, Any]]) -> tuple[str, list[str], list]:
    """From the published folders, the rows a verdict can rest on: the same
    scoring mode and a dataset in common are required (refused otherwise),
    and of the numeric paths only the slice's own is kept. Returns the path,
    a line per folder saying what was kept and left out, and the kept Results."""
    mode = check_one_scoring_mode(mine, mine_dir)
    my_paths = sorted(set(paths_of(mine)))
    if len(my_paths) > 1:
        raise ValueError(f"--compare: the rows under {mine_dir} ran on {len(my_paths)} numeric paths "
                         f"({'; '.join(my_paths)}); compare one path's rows at a time")
    path, my_datasets = my_paths[0], {str(d) for d in mine.unlearning.dataset}
    lines, kept = [], []
    for folder, results in published:
        theirs = check_one_scoring_mode(results, folder)
        if theirs != mode:
            raise ValueError(f"--compare: the rows under {mine_dir} are scored by {mode}, those under {folder} by "
                             f"{theirs}; a verdict across scoring modes means nothing: compare with rows of one mode")
        if not my_datasets & {str(d) for d in results.unlearning.dataset}:
            raise ValueError(f"--compare: the rows under {mine_dir} are on {', '.join(sorted(my_datasets))}, those "
                             f"under {folder} on {', '.join(sorted({str(d) for d in results.unlearning.dataset}))}; "
                             "a verdict across datasets means nothing")
        same = on_path(results, path)
        others = sorted(set(paths_of(results)) - {path})
        if others:
            lines.append(f"compare: {folder}: {len(same.unlearning)} run(s) on your numeric path ({path}) kept, "
                         f"{len(results.unlearning) - len(same.unlearning)} on {'; '.join(others)} left out "
                         "(the study keeps numeric paths apart)")
        if not same.unlearning.empty:
            kept.append(same)
    if not kept:
        found = sorted({p for _, results in published for p in paths_of(results)})
        raise ValueError(f"--compare: no published run ran on your numeric path ({path}); the folders hold "
                         f"{'; '.join(found)}, and a verdict across numeric paths means nothing: name a folder of "
                         "rows on your path (results/rank_study_fp32 holds the first study's fp32 rows)")
    return path, lines, kept
