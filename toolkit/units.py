"""Rows into units: one unlearned model and one held-out split, with every
measure's per-question correctness (base, A, B, C, floor, probes)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from toolkit.attackers import ATTACKERS, _by_epoch, _column, _vector, along_budget, recovery_epoch
from toolkit.bootstrap import Unit
from toolkit.comparison import machine_of
from toolkit.datasets import FLOOR_DATASETS
from toolkit.result_frames import Results


class Setting(NamedTuple):
    """One row of the table: an unlearning setting, its seeds pooled."""

    unlearn_type: str
    dataset: str
    lora_rank: int | None
    lr: float
    epochs: int
    retain_coeff: float
    steering_coeff: float | None
    axes: tuple = ()  # a method's other axes, (field, value), from its rows' `sweep_axes`


SETTING = list(Setting._fields[:-1])  # the published columns; other axes are `axis_{field}` columns


# A dataset whose floor rows are RTT on another (pretraining facts: their remapped twin)
FLOOR_OF = {str(dataset): str(floor) for dataset, floor in FLOOR_DATASETS.items()}


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


# The columns the analysis reads from each stage's rows: a row without one of them is refused, naming its file.


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
        axes = tuple((name, run.get(name)) for name in run.get("sweep_axes") or ()) \
            if isinstance(run.get("sweep_axes"), list) else ()
        setting = Setting(*(run[k] if pd.notna(run[k]) else None for k in SETTING), axes)
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
            # the paper's RTT is B; every other attacker (lora_rtt, a registered probe's) is its own measure
            for probe in ["rtt", *sorted(set(rtt.probe) - {"rtt"})] if not rtt.empty else []:
                name = "B" if probe == "rtt" else probe
                rows = rtt[rtt.probe == probe]
                best = ATTACKERS[options.attacker](rows, split) if len(rows) else None
                if best:
                    vectors[name] = best["vector"]
                    if name == "B":  # and B along the attacker's budget, where the rows hold it
                        vectors.update({f"B@{s}": v for s, v in along_budget(rows, split, options.attacker).items()})
                        threshold = options.recovery_threshold * (1 if options.absolute_threshold else threshold_base)
                        epoch_to_recover = recovery_epoch(best["accs"], threshold)
            if "B" in vectors:
                for name, condition, by_seed, datasets in (
                        ("C", "baseline", seed, [run.dataset]),
                        ("floor", "never_taught", seed, [FLOOR_OF.get(run.dataset, run.dataset)])):
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


def step0_check(results: Results) -> list[str]:
    """The model RTT starts from must be the model the unlearning row measured:
    RTT's V accuracy before its first step against the run's A, per held-out
    split. A line per split where they differ, then one line of the count."""
    rtt = results.rtt
    if rtt.empty or "forget_accs_local" not in rtt:
        return []
    rtt = rtt[(rtt.condition == "unlearned") & (_column(rtt, "probe", "rtt").fillna("rtt") == "rtt")]
    checked, lines = 0, []
    for _, run in results.unlearning.iterrows():
        forget_accs = run.forget_accs if isinstance(run.forget_accs, dict) else {}
        starts: dict[str, set[float]] = {}
        for _, row in rtt_of_run(rtt, run).iterrows():
            accs, files = _by_epoch(row.forget_accs_local or {}), row.get("val_files") or []
            if 0 in accs and len(files) == 1 and files[0] in forget_accs:
                starts.setdefault(files[0], set()).add(round(accs[0], 9))
        for file, values in sorted(starts.items()):
            measured = _by_epoch(forget_accs[file])
            a = round(measured[max(measured)], 9)
            checked += 1
            if values != {a}:
                lines.append(f"step-0 mismatch: {run.unlearn_type} rank {run.lora_rank} seed {run.get('seed')} {file}: "
                             f"RTT starts at {', '.join(f'{v:.3f}' for v in sorted(values))}, the unlearning row "
                             f"measured A = {a:.3f} ({run.get('run_key')})")
    if checked:
        lines.append(f"step-0 check: RTT's V accuracy before its first step equals A on {checked - len(lines)} of "
                     f"{checked} held-out splits" + (" (the mismatches above: RTT did not start from the model the "
                                                     "unlearning row measured)" if lines else ""))
    return lines
