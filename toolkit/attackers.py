"""The attacker: which of a model's RTT runs (lr, epoch) stands for B, C or
the floor on a held-out split, and each question's correctness there."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from toolkit.names import on_log2_budget


def _by_epoch(mapping: dict) -> dict[int, float]:
    return {int(k): float(v) for k, v in mapping.items()}


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
    """The best V accuracy; among tied cells, the stated order's (highest lr, longest run, latest epoch)."""
    return max(options.values(), key=lambda a: (a["final"], a["choice"])) if options else None


def best_rtt(rows: pd.DataFrame) -> dict | None:
    """The run with the best final V accuracy among (lr, epochs)."""
    return _best(attempts(rows, every_epoch=False))


def cross_fitted(rows: pd.DataFrame, split: int) -> dict | None:
    """The attacker's (lr, epochs, epoch) chosen on the model's other held-out
    splits (the best mean V accuracy there), then applied to this split: the
    choice never sees the V it is scored on."""
    mine = attempts(rows[rows.skip_split == split], every_epoch=True)
    return _cross_fit(mine, [attempts(group, every_epoch=True) for s, group in rows.groupby("skip_split") if s != split])


def _cross_fit(mine: dict[tuple, dict], others: list[dict[tuple, dict]]) -> dict | None:
    """The option of `mine` with the best mean V over `others` (the other
    held-out splits' options); ties by the stated order (the option itself)."""
    shared = [c for c in mine if others and all(c in o for o in others)]
    if not shared:
        return None
    return mine[max(shared, key=lambda c: (np.mean([o[c]["final"] for o in others]), c))]


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


# --------------------------------------------------------------------------
# Along the attacker's budget: the pick at each step of the schedule
# --------------------------------------------------------------------------


def _at_step(rows: pd.DataFrame, step: int) -> dict[tuple, dict]:
    """Each RTT run's V at optimizer `step` (its lr and length are the choice)."""
    out = {}
    for _, row in rows.iterrows():
        accs = _by_epoch(row.get("forget_accs_by_step") or {})
        if step in accs:
            choice = (float(row.lr), int(row.epochs))
            out[choice] = {"final": accs[step], "choice": choice,
                           "vector": _vector({"v": row.get("forget_correct_by_step") or {}}, "v", step, accs[step])}
    return out


def budget_steps(rows: pd.DataFrame) -> list[int]:
    """The steps of the budget's schedule (0, 1, 2, 4, ...) every RTT run of
    these rows was scored at. The rows also hold each epoch's end, which
    falls at other steps on held-out splits of other sizes: those are left
    out, so a slice of some splits reads the same curve as the whole study."""
    if rows.empty or "forget_accs_by_step" not in rows:
        return []
    sets = [set(_by_epoch(v)) for v in rows.forget_accs_by_step if isinstance(v, dict)]
    if not sets or len(sets) != len(rows):
        return []
    return sorted(s for s in set.intersection(*sets) if s == 0 or on_log2_budget(s))


def along_budget(rows: pd.DataFrame, split: int, attacker: str) -> dict[int, np.ndarray]:
    """B at each step of the budget schedule, per question: among the model's
    RTT runs (lrs), the one the attacker picks at that step, cross-fitted
    (best mean V at that step on the model's other held-out splits) or on V
    itself (paper, final); ties by the same order (highest lr, longest run)."""
    out = {}
    for step in budget_steps(rows):
        mine = _at_step(rows[rows.skip_split == split], step)
        if attacker == "cross_fitted":
            best = _cross_fit(mine, [_at_step(group, step) for s, group in rows.groupby("skip_split") if s != split])
        else:
            best = _best(mine)
        if best is not None:
            out[step] = best["vector"]
    return out
