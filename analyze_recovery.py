"""How much does RTT recover, and how does that change with LoRA rank?

Reads the pipeline's unlearning and RTT CSVs and, for every unlearned model
and held-out split V, computes (accuracies on V):

  base  forget accuracy before unlearning
  A     after unlearning (no RTT)
  B     after unlearning, then RTT            (best (lr, epochs) per split)
  C     after RTT from the pre-unlearning model (baseline RTT; best per split)

  recovered_fraction       = (B - A) / (base - A)
  relative_to_baseline_rtt = (B - chance) / (C - chance)
  recovery_epoch           = first RTT epoch whose V accuracy reaches the threshold

Rows are one unlearning setting (method, dataset, rank, lr, epochs, retain
and steering coefficients), averaged over held-out splits and seeds, with the
spread (standard deviation) beside each mean. Full-parameter methods have
rank 0 and are drawn as reference lines beside LoRA.

    python analyze_recovery.py [--results-dir evals/pipeline] [--match-forgetting 0.3]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

CHANCE = 0.25
SETTING = ["unlearn_type", "dataset", "lora_rank", "lr", "epochs", "retain_coeff", "steering_coeff"]
MEASURES = ["base", "A", "B", "C", "retain_after", "recovered_fraction", "relative_to_baseline_rtt", "recovery_epoch"]


@dataclass(frozen=True)
class Options:
    min_forgetting: float = 0.1  # base - A below this: too little forgetting to mean anything
    recovery_threshold: float = 0.9  # relative to base accuracy, unless absolute
    absolute_threshold: bool = False
    match_target: float | None = None
    match_tolerance: float = 0.05


# ---------------------------------------------------------------- reading


def _json_cell(value):
    if isinstance(value, str) and value[:1] in "{[":
        return json.loads(value)
    return value


def _by_epoch(mapping: dict) -> dict[int, float]:
    return {int(k): float(v) for k, v in mapping.items()}


def read_csvs(directory: Path) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in sorted(directory.glob("*.csv"))]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for column in frame.columns:
        frame[column] = frame[column].map(_json_cell).astype(object) if frame[column].map(
            lambda v: isinstance(v, str) and v[:1] in "{[").any() else frame[column]
    return frame


def load_results(results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    results_dir = Path(results_dir)
    unlearning, ft = read_csvs(results_dir / "unlearning"), read_csvs(results_dir / "ft")
    if unlearning.empty:
        raise FileNotFoundError(f"no unlearning CSVs under {results_dir / 'unlearning'}; run pipeline.py first")
    return unlearning, ft


# ---------------------------------------------------------------- per split


def best_rtt(ft: pd.DataFrame, condition: str, base_model: str, dataset: str, skip_split: int) -> dict | None:
    """The RTT run with the best final V accuracy among (lr, epochs) for one split."""
    if ft.empty:
        return None
    rows = ft[(ft.condition == condition) & (ft.base_model == base_model) & (ft.dataset == dataset)
              & (ft.skip_split == skip_split)]
    best = None
    for _, row in rows.iterrows():
        accs = _by_epoch(row.forget_accs_local)
        final = accs[max(accs)]
        if best is None or final > best["final"]:
            best = {"final": final, "accs": accs, "lr": row.lr, "epochs": row.epochs}
    return best


def recovery_epoch(accs: dict[int, float], threshold: float) -> float:
    reached = [epoch for epoch in sorted(accs) if epoch >= 1 and accs[epoch] >= threshold]
    return float(reached[0]) if reached else math.nan


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator and not math.isnan(denominator) else math.nan


def split_rows(unlearning: pd.DataFrame, ft: pd.DataFrame, options: Options) -> pd.DataFrame:
    """One row per unlearned model and held-out split."""
    out = []
    for _, run in unlearning.iterrows():
        if not isinstance(run.model_path, str) or not run.model_path:
            continue
        forget = {f: _by_epoch(a) for f, a in run.forget_accs.items()}
        retain = {f: _by_epoch(a) for f, a in run.retain_accs.items()}
        retain_after = sum(a[max(a)] for a in retain.values()) / len(retain) if retain else math.nan
        retain_before = sum(a[0] for a in retain.values()) / len(retain) if retain else math.nan
        skips = sorted(set(ft[(ft.condition == "unlearned") & (ft.base_model == run.model_path)].skip_split)) if not ft.empty else []
        for skip in skips:
            val_file = run.val_files[int(skip)]
            base, a = forget[val_file][0], forget[val_file][max(forget[val_file])]
            b = best_rtt(ft, "unlearned", run.model_path, run.dataset, skip)
            c = best_rtt(ft, "baseline", run.base_model, run.dataset, skip)
            threshold = options.recovery_threshold * (1 if options.absolute_threshold else base)
            b_acc, c_acc = b["final"], (c["final"] if c else math.nan)
            out.append({
                **{k: run[k] for k in SETTING}, "data_seed": run.get("data_seed", 0), "model_path": run.model_path,
                "skip_split": int(skip), "base": base, "A": a, "B": b_acc, "C": c_acc,
                "retain_before": retain_before, "retain_after": retain_after,
                "recovered_fraction": _ratio(b_acc - a, base - a),
                "relative_to_baseline_rtt": _ratio(b_acc - CHANCE, c_acc - CHANCE),
                "recovery_epoch": recovery_epoch(b["accs"], threshold),
            })
    return pd.DataFrame(out)


# ---------------------------------------------------------------- per setting


def summarize(splits: pd.DataFrame, options: Options) -> pd.DataFrame:
    """Mean and spread over held-out splits and seeds for each setting."""
    if splits.empty:
        return pd.DataFrame()
    keys = [k for k in SETTING]
    grouped = splits.fillna({"steering_coeff": -1}).groupby(keys, dropna=False)
    table = grouped[MEASURES].mean()
    spread = grouped[MEASURES].std(ddof=0).add_suffix("_std")
    table = table.join(spread)
    table["retain_before"] = grouped["retain_before"].mean()
    table["n"] = grouped.size()
    table = table.reset_index()
    table["steering_coeff"] = table["steering_coeff"].where(table["steering_coeff"] >= 0)
    table["forgetting"] = table["base"] - table["A"]
    table["too_little_forgetting"] = table["forgetting"] < options.min_forgetting
    table["missing_baseline"] = table["C"].isna()
    return table.sort_values(["unlearn_type", "dataset", "lora_rank", "lr", "retain_coeff"]).reset_index(drop=True)


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


# ---------------------------------------------------------------- output


TABLE_COLUMNS = ["unlearn_type", "dataset", "lora_rank", "lr", "epochs", "retain_coeff", "steering_coeff", "n",
                 "base", "A", "B", "C", "retain_before", "retain_after", "recovered_fraction",
                 "recovered_fraction_std", "relative_to_baseline_rtt", "relative_to_baseline_rtt_std",
                 "recovery_epoch", "too_little_forgetting", "missing_baseline"]


def format_table(table: pd.DataFrame) -> str:
    shown = table[[c for c in TABLE_COLUMNS if c in table]].rename(columns={"unlearn_type": "method", "lora_rank": "rank"})
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3g}")


def _series(lora: pd.DataFrame):
    """(label, rows) per plotted line: one per method, dataset and epochs. The
    lr and retain coefficient split the line only where a rank has several runs;
    per-rank settings (a matched-forgetting sweep) would otherwise break it into points."""
    for (method, dataset, epochs), group in lora.groupby(["unlearn_type", "dataset", "epochs"]):
        name = f"{method} {dataset} epochs={epochs}"
        if group.lora_rank.is_unique:
            yield f"{name} ({_setting('lr', group.lr)}, {_setting('rc', group.retain_coeff)})", group.sort_values("lora_rank")
            continue
        for (lr, rc), same in group.groupby(["lr", "retain_coeff"]):
            yield f"{name} lr={lr:g} rc={rc:g}", same.sort_values("lora_rank")


def _setting(name: str, values: pd.Series) -> str:
    return f"per-rank {name}" if values.nunique() > 1 else f"{name}={values.iloc[0]:g}"


def _point_label(row, show_rc: bool) -> str:
    return f"lr {row.lr:.2g}" + (f", rc {row.retain_coeff:g}" if show_rc else "")


def plot(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    lora = table[table.lora_rank > 0]
    for label, group in _series(lora):
        left.errorbar(group.lora_rank, group.recovered_fraction, yerr=group.recovered_fraction_std, marker="o",
                      capsize=3, label=label)
        for measure, style in (("A", "o-"), ("B", "s-"), ("C", "^--")):
            right.plot(group.lora_rank, group[measure], style, label=f"{measure}: {label}")
        show_rc = group.retain_coeff.nunique() > 1
        for row in group.itertuples():
            left.annotate(_point_label(row, show_rc), (row.lora_rank, row.recovered_fraction), textcoords="offset points",
                          xytext=(6, -10), fontsize=7)
        flagged = group[group.too_little_forgetting]
        left.scatter(flagged.lora_rank, flagged.recovered_fraction, s=140, facecolors="none", edgecolors="red",
                     label="too little forgetting" if len(flagged) else None)
    for _, row in table[table.lora_rank == 0].iterrows():
        left.axhline(row.recovered_fraction, linestyle=":", color="gray")
        left.annotate(f"{row.unlearn_type} (full)", (1, row.recovered_fraction), fontsize=8, color="gray")
    for axis in (left, right):
        if len(lora):
            axis.set_xscale("log", base=2)
            axis.set_xlim(lora.lora_rank.min() / 1.5, lora.lora_rank.max() * 1.5)
        axis.set_xlabel("LoRA rank")
        axis.grid(alpha=0.3)
    left.set_ylabel("recovered fraction (B - A) / (base - A)")
    left.set_title("RTT recovery vs LoRA rank")
    right.set_ylabel("forget accuracy on held-out splits")
    right.set_title("A = unlearned, B = unlearned + RTT, C = RTT only")
    right.axhline(CHANCE, color="black", linewidth=0.8, linestyle=":", label="chance")
    left.legend(fontsize=7)
    right.legend(fontsize=6, ncol=1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyze(results_dir: str | Path, options: Options = Options(), out_dir: str | Path | None = None,
            stream=None) -> pd.DataFrame:
    """Print the table, write recovery_vs_rank.csv and .png, return the table."""
    stream = stream or sys.stdout
    unlearning, ft = load_results(results_dir)
    table = summarize(split_rows(unlearning, ft, options), options)
    if table.empty:
        raise ValueError(f"no RTT results for any unlearned model under {results_dir}; run RTT (dont_ft=false) first")
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
    out = Path(out_dir or results_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "recovery_vs_rank.csv", index=False)
    print(format_table(table), file=stream)
    flagged = table[table.too_little_forgetting]
    if len(flagged):
        print(f"flagged: {len(flagged)} row(s) forgot less than {options.min_forgetting} (base - A); their recovery "
              "measures do not mean much", file=stream)
    if table.missing_baseline.any():
        print("note: no baseline RTT (C) for some rows; relative_to_baseline_rtt is empty there", file=stream)
    if len(table):
        plot(table, out / "recovery_vs_rank.png", title)
    print(f"wrote {out / 'recovery_vs_rank.csv'} and {out / 'recovery_vs_rank.png'}", file=stream)
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default="evals/pipeline", help="the pipeline's results_dir")
    parser.add_argument("--out-dir", default=None, help="where to write the CSV and PNG (default: results dir)")
    parser.add_argument("--min-forgetting", type=float, default=0.1,
                        help="flag rows whose base - A is below this (default 0.1)")
    parser.add_argument("--recovery-threshold", type=float, default=0.9,
                        help="recovery_epoch threshold: a fraction of base accuracy (default 0.9)")
    parser.add_argument("--absolute-threshold", action="store_true",
                        help="read --recovery-threshold as an absolute accuracy")
    parser.add_argument("--match-forgetting", type=float, default=None, metavar="TARGET",
                        help="compare ranks at matched forgetting: per rank, the setting with A within the "
                             "tolerance of TARGET and the least retain damage")
    parser.add_argument("--match-tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)
    for name in ("min_forgetting", "recovery_threshold", "match_tolerance"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed; use a value >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = Options(args.min_forgetting, args.recovery_threshold, args.absolute_threshold, args.match_forgetting,
                      args.match_tolerance)
    try:
        analyze(args.results_dir, options, args.out_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
