"""The analysis as printed: the table with its CIs, the figure's digest, the
headline block's markers and the flags."""

from __future__ import annotations

import hashlib

import pandas as pd

from toolkit.attackers import ATTACKER_NOTES
from toolkit.plots import reads_budget
from toolkit.probes import measured_probes
from toolkit.units import Options


def _with_ci(table: pd.DataFrame, name: str) -> pd.Series:
    def cell(row):
        value = row[name]
        if pd.isna(value):
            return "-"
        lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
        return f"{value:.2f} [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) and pd.notna(hi) else f"{value:.2f}"

    return table.apply(cell, axis=1)


def half_steps_cell(row) -> str:
    """Steps to half recovery with its CI; `>` where some bootstrap draws never get there."""
    value, lo, hi = row.half_recovery_steps, row.half_recovery_steps_lo, row.half_recovery_steps_hi
    if pd.isna(value):
        return "never"
    upper = f"{hi:.0f}" if row.half_recovery_reached >= 0.975 else f">{hi:.0f}" if pd.notna(hi) else "?"
    return f"{value:.0f} [{lo:.0f}, {upper}]"


def figure_source(table: pd.DataFrame) -> str:
    """What a figure draws, as a digest of the printed table (kept in the PNG)."""
    return "table sha256 " + hashlib.sha256(format_table(table).encode()).hexdigest()[:16]


def format_table(table: pd.DataFrame) -> str:
    shown = pd.DataFrame({"attacker": table.attacker} if "attacker" in table else {}, index=table.index)
    shown = shown.assign(**{"method": table.unlearn_type, "rank": table.lora_rank, "lr": table.lr,
                            "rc": table.retain_coeff,
                            # a method's own axes: CUT's steering coefficient, and any a method declares
                            **({"sc": table.steering_coeff} if table.steering_coeff.notna().any() else {}),
                            **{c.removeprefix("axis_"): table[c] for c in table.columns if c.startswith("axis_")},
                            "seeds": table.n_seeds, "splits": table.n_splits,
                            "base": table.base.map(lambda v: f"{v:.2f}")})
    for name in ("A", "B", "C", "floor"):
        shown[name] = _with_ci(table, name)
    shown["retain"] = table.retain_after.map(lambda v: f"{v:.2f}")
    shown["recovered (B-A)/(base-A)"] = _with_ci(table, "recovered_fraction")
    shown["above floor"] = _with_ci(table, "recovered_above_floor")
    if reads_budget(table):
        shown["AUC (log steps)"] = _with_ci(table, "recovery_auc")
        shown["steps to half"] = table.apply(lambda row: half_steps_cell(row), axis=1)
    for probe in measured_probes(table.columns):
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


def block_markers(name: str = "rank-study") -> tuple[str, str]:
    """The lines around a headline block that --update-readme fills."""
    return f"<!-- {name}:begin (analyze_recovery.py --update-readme) -->", f"<!-- {name}:end -->"


README_BEGIN, README_END = block_markers()


def attacker_heading(attacker: str) -> str:
    return f"attacker: {attacker}, {ATTACKER_NOTES[attacker]}"


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
