"""The analysis's figure: recovered fraction, accuracies and probes against
LoRA rank, one line per method, dataset and epochs (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path

from toolkit.names import CHANCE
from toolkit.probes import marker_of, measured_probes


def in_arm_order(table):
    """The table's rows by LoRA rank, the full-parameter reference (rank 0) last."""
    return table.sort_values("lora_rank", key=lambda ranks: ranks.replace(0, math.inf), kind="stable")


def reads_budget(table) -> bool:
    """Whether the rows read V along the attacker's budget (the table has recovery curves)."""
    return "recovery_auc" in table and table.recovery_auc.notna().any()


def series(lora):
    """(label, rows) per plotted line: one per method, dataset and epochs (and
    attacker, when the table holds several). The lr and retain coefficient split
    the line only where a rank has several runs; per-rank settings (a
    matched-forgetting sweep) would otherwise break it into points."""
    keys = ["unlearn_type", "dataset", "epochs", *(["attacker"] if "attacker" in lora else [])]
    for (method, dataset, epochs, *attacker), group in lora.groupby(keys):
        name = f"{method} {dataset} epochs={epochs}" + "".join(f", {a} attacker" for a in attacker)
        if group.lora_rank.is_unique:
            yield f"{name} ({_setting('lr', group.lr)}, {_setting('rc', group.retain_coeff)})", group.sort_values("lora_rank")
            continue
        for (lr, rc), same in group.groupby(["lr", "retain_coeff"]):
            yield f"{name} lr={lr:g} rc={rc:g}", same.sort_values("lora_rank")


def _setting(name: str, values) -> str:
    return f"per-rank {name}" if values.nunique() > 1 else f"{name}={values.iloc[0]:g}"


def _errorbar(axis, rows, name: str, shift: float = 1.0, **style) -> None:
    lo = (rows[name] - rows[f"{name}_lo"]).clip(lower=0)
    hi = (rows[f"{name}_hi"] - rows[name]).clip(lower=0)
    axis.errorbar(rows.lora_rank * shift, rows[name], yerr=[lo.fillna(0), hi.fillna(0)], capsize=3, **style)


def _attacker_of(group) -> tuple[str, float]:
    """A label suffix and a small sideways shift (log axis) per attacker, so their CIs do not overlap."""
    if "attacker" not in group:
        return "", 1.0
    names = ("final", "paper", "cross_fitted")
    attacker = group.attacker.iloc[0]
    return f" ({attacker})", 1.1 ** (names.index(attacker) - 1 if attacker in names else 0)


def draw_curves(axis, table) -> None:
    """Recovered fraction against the attacker's budget (optimizer steps, on
    log2(1 + step)), one curve per row with its 95% band: how fast RTT brings
    the facts back at each rank (its area is the table's AUC)."""
    for _, row in in_arm_order(table).iterrows():
        steps = [int(s) for s in row.budget_steps] if isinstance(row.budget_steps, list) else []
        if not steps:
            continue
        x = [math.log2(1 + s) for s in steps]
        y = [row[f"recovered@{s}"] for s in steps]
        name = f"rank {row.lora_rank}" if row.lora_rank else f"{row.unlearn_type} (full)"
        name += f" ({row.attacker})" if "attacker" in row and isinstance(row.attacker, str) else ""
        line = axis.plot(x, y, marker=".", label=f"{name}: AUC {row.recovery_auc:.2f}")[0]
        axis.fill_between(x, [row[f"recovered@{s}_lo"] for s in steps], [row[f"recovered@{s}_hi"] for s in steps],
                          color=line.get_color(), alpha=0.15)
        axis.set_xticks(x, [str(s) for s in steps], fontsize=7)
    axis.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("RTT optimizer steps (log2(1 + step))")
    axis.set_ylabel("recovered fraction (95% CI)")
    axis.set_title("Recovery along the attacker's budget")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(table, path: Path, title: str, source: str = "") -> bool:
    """The recovery curves alone (the README's figure), under the table's first
    attacker (the headline's), with the same digest as the full figure; False,
    and nothing written, where the rows have no budget schedule."""
    if not reads_budget(table):
        return False
    plt = _pyplot()
    first = table[table.attacker == table.attacker.iloc[0]] if "attacker" in table else table
    fig, axis = plt.subplots(figsize=(7, 4.5))
    draw_curves(axis, first)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Source": source} if source else None)
    plt.close(fig)
    return True


def plot(table, path: Path, title: str, source: str = "") -> None:
    """The table's recovered fractions, accuracies and probes against rank;
    `source` (the digest of the table drawn) goes into the PNG's metadata, so
    a committed figure can be checked against the rows it claims to show."""
    plt = _pyplot()
    along = reads_budget(table)
    fig, axes = plt.subplots(1, 4 if along else 3, figsize=(23 if along else 17, 5))
    left, middle, right = axes[:3]
    if along:
        draw_curves(axes[3], table)
    lora = table[table.lora_rank > 0]
    drawn_a = set()
    for label, group in series(lora):
        suffix, shift = _attacker_of(group)
        _errorbar(left, group, "recovered_fraction", shift, marker="o", label=f"RTT: {label}")
        if group.recovered_above_floor.notna().any():
            _errorbar(left, group, "recovered_above_floor", shift, marker="s", linestyle="--",
                      label=f"RTT above the floor{suffix}")
        for measure, marker in (("A", "o"), ("B", "s"), ("C", "^"), ("floor", "v")):
            if measure == "A" and label.split(" epochs=")[0] in drawn_a:
                continue  # A does not depend on the attacker: drawn once
            if group[measure].notna().any():
                _errorbar(middle, group, measure, shift, marker=marker, label=measure + ("" if measure == "A" else suffix))
        drawn_a.add(label.split(" epochs=")[0])
        avoided = group[group.answer_avoided]
        middle.scatter(avoided.lora_rank, avoided.A, s=160, facecolors="none", edgecolors="red",
                       label="A below chance (answer avoided)" if len(avoided) else None)
        # every probe the table measures is drawn, with its registered marker
        for probe in measured_probes(group.columns):
            marker = marker_of(probe)
            if group[f"{probe}_recovered"].notna().any():
                _errorbar(right, group, f"{probe}_recovered", shift, marker=marker, label=probe + suffix)
        _errorbar(right, group, "recovered_fraction", shift, marker="o", linestyle=":",
                  label=f"rtt (all weights){suffix}")
        flagged = group[group.too_little_forgetting]
        left.scatter(flagged.lora_rank, flagged.recovered_fraction, s=140, facecolors="none", edgecolors="orange",
                     label="too little forgetting" if len(flagged) else None)
        damaged = group[group.retain_damaged]
        left.scatter(damaged.lora_rank, damaged.recovered_fraction, s=220, marker="s", facecolors="none",
                     edgecolors="purple", label="retain damaged (not selective)" if len(damaged) else None)
    for _, row in table[table.lora_rank == 0].iterrows():
        left.axhline(row.recovered_fraction, linestyle=":", color="gray")
        left.annotate(f"{row.unlearn_type} (full)", (1, row.recovered_fraction), fontsize=8, color="gray")
    for axis in (left, middle, right):
        if len(lora):
            axis.set_xscale("log", base=2)
            axis.set_xlim(lora.lora_rank.min() / 1.5, lora.lora_rank.max() * 1.5)
        axis.set_xlabel("LoRA rank")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    left.axhline(0, color="black", linewidth=0.8)
    left.set_ylabel("recovered fraction (95% CI)")
    left.set_title("RTT recovery vs LoRA rank")
    middle.axhline(CHANCE, color="black", linewidth=0.8, linestyle=":")
    middle.set_ylabel("accuracy on held-out splits (95% CI)")
    middle.set_title("A unlearned, B +RTT, C RTT only, floor never taught")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_ylabel("recovered fraction (95% CI)")
    right.set_title("Probes: quantization and LoRA relearning")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Source": source} if source else None)
    plt.close(fig)
