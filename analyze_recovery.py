"""How much of what unlearning removed comes back, and how does that change
with LoRA rank?

Reads the pipeline's CSVs (`unlearning/`, `ft/`, `quant/`) and, for every
unlearned model and held-out split V, takes these accuracies on V:

  base   before unlearning
  A      after unlearning
  B      after unlearning, then RTT (all weights)       best (lr, epochs) per split
  C      RTT from the pre-unlearning model (baseline)   best per split, same seed
  floor  RTT from the never-taught model               best per split
  probes B with a LoRA attacker (lora_rtt); A after 8- and 4-bit quantization (quant8, quant4)

  recovered_fraction       = (B - A) / (base - A)
  recovered_above_floor    = (B - floor) / (base - floor)
  relative_to_baseline_rtt = (B - chance) / (C - chance)
  {probe}_recovered        = (probe - A) / (base - A)

Rows are one unlearning setting (method, dataset, rank, lr, epochs, retain
and steering coefficients), averaged over seeds and held-out splits; a ratio
is taken of those means (not averaged over per-split ratios, whose
denominators rest on a few questions each). 95%
confidence intervals come from a bootstrap that resamples seeds, held-out
splits and questions within each file (the same draws for every measure and
every rank, so differences and the trend across ranks are paired). A run that
never reached the stop rule's target is left out, with a printed line.

    python analyze_recovery.py [--results-dir evals/pipeline] [--match-forgetting 0.3]
"""

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

import toolkit.merge_fidelity  # noqa: F401 - the built-in probes' rows (their markers in the figure)
from toolkit.attackers import ATTACKER_NOTES, ATTACKERS  # noqa: F401 - the analysis's API, re-exported
from toolkit.checks import nearest_existing
from toolkit.comparison import (
    agreements,
    arm_of,
    left_out_sentence,
    machine_lines,
    primary_measure,
    same_key_sentence,
    same_seed_checks,
    seed_ranges,
    verdict_sentence,
)
from toolkit.estimates import budget_of, match_forgetting, summarize
from toolkit.plots import in_arm_order, plot, plot_curves
from toolkit.report import attacker_heading, block_markers, figure_source, format_table, print_flags
from toolkit.result_frames import Results, load_results, published_results
from toolkit.units import LeftOut, Options, step0_check, units_of


# --verdict: what the one verdict of --compare rests on
VERDICT_BASES = {
    "new_seed": "this slice against a 95% prediction interval from the published seeds it lacks",
    "same_seed": "this slice against the published rows of its own seeds (a rerun), paired",
}


def compare(results_dir: str | Path, published_dirs: str | Path | Sequence[str | Path], options: Options,
            stream=None, verdict: str = "new_seed") -> list:
    """Print the published table beside this slice's (already printed), how
    many of its jobs came out exactly as published, where the published rows
    hold the slice's own seeds one line per arm comparing the rerun with
    them (did the same seeds come out alike?), one agreement line per arm
    (is the slice like the published seeds it lacks?), and last the verdict
    over every arm together (family-wise 95%, Holm), on the basis `verdict`
    names (VERDICT_BASES), in the study's primary measure. Returns the
    verdict's checks, one per arm."""
    stream = stream or sys.stdout
    published_dirs = [published_dirs] if isinstance(published_dirs, (str, Path)) else list(published_dirs)
    my_results = load_results(results_dir)
    kept_lines, their_results = published_results(my_results, results_dir, published_dirs)
    mine, my_left_out = units_of(my_results, options)
    published, left_out = units_of(their_results, options)
    measure = primary_measure(mine + published)
    table = summarize(published, options).table
    print(f"\npublished ({', '.join(map(str, published_dirs))}; {len(left_out)} flagged run(s) left out):",
          file=stream)
    for line in kept_lines:
        print(line, file=stream)
    print(format_table(table) if not table.empty else "(no published rows yet)", file=stream)
    print(f"compared on the {measure.label} (the study's primary measure); the verdict: {VERDICT_BASES[verdict]}",
          file=stream)
    if sentence := same_key_sentence(my_results, their_results):
        print(sentence, file=stream)
    same = same_seed_checks(mine, published, measure, draws=options.bootstrap, rng_seed=options.seed)
    for check in same:
        print(check.sentence(), file=stream)
    found = agreements(mine, published, measure)
    for a in found:
        print(a.sentence(), file=stream)
    basis = {"new_seed": found, "same_seed": same}[verdict]
    compared = {a.arm for a in basis}
    flagged = list(dict.fromkeys(arm_of(run) for run in my_left_out if arm_of(run) not in compared))
    for run in my_left_out:
        if arm_of(run) not in compared:
            print(left_out_sentence(run, published, left_out), file=stream)
    print(verdict_sentence(basis, flagged), file=stream)
    return basis


def headline(results_dir: str | Path, options: Options = Options(), attackers: Sequence[str] = ()) -> str:
    """The study's table, trend and paired differences as analysis prints them,
    once per attacker (`attackers`, else the one in `options`)."""
    results = load_results(results_dir)
    attackers = tuple(attackers) or (options.attacker,)
    sections, seeds, flagged = [], set(), 0
    for attacker in attackers:
        units, left_out = units_of(results, replace(options, attacker=attacker))
        analysis = summarize(units, options)
        seeds, flagged = seeds | {u.seed for u in units}, len(left_out)
        lines = [attacker_heading(attacker)] if len(attackers) > 1 else []
        lines += [format_table(analysis.table)]
        lines += [t.sentence() for t in analysis.trends if t.measure == "recovered_fraction"]
        lines += [d.sentence() for d in analysis.differences]
        sections += lines + analysis.distances + machine_lines(units)
    named = "" if attackers == ("final",) else f"; attacker: {', '.join(attackers)}"
    return "\n".join([f"{len(seeds)} seeds with matched forgetting, {flagged} flagged run(s) left out; "
                      f"95% bootstrap CIs ({options.bootstrap} draws){named}", *sections])


def primary_headline(results_dir: str | Path, options: Options = Options(), attackers: Sequence[str] = ()) -> str:
    """The second edition's primary measure alone, short enough for the README:
    per arm the area under the recovery curve and the ceiling (recovered
    fraction after the whole budget), the paired differences in area and the
    trend over ranks, under the first attacker named (the headline's)."""
    attacker = (tuple(attackers) or (options.attacker,))[0]
    units, left_out = units_of(load_results(results_dir), replace(options, attacker=attacker))
    analysis = summarize(units, options)
    table = in_arm_order(analysis.table)

    def per_arm(measure: str) -> str:
        return ", ".join(f"{arm_of(row)} {row[measure]:.2f} [{row[f'{measure}_lo']:.2f}, {row[f'{measure}_hi']:.2f}]"
                         for _, row in table.iterrows())

    seeds = sorted({u.seed for u in units})
    arms = "; ".join(f"{arm_of(row)} {row.n_seeds}" for _, row in table.iterrows())
    return "\n".join([
        f"{len(seeds)} seed(s) ({seed_ranges(seeds)}; per arm: {arms}), {len(left_out)} flagged run(s) left out; "
        f"attacker {attacker}; 95% bootstrap CIs over seeds, held-out splits and questions ({options.bootstrap} draws)",
        f"area under the recovery curve: {per_arm('recovery_auc')}",
        f"recovered at the ceiling: {per_arm('recovered_fraction')}",
        *[d.sentence() for d in analysis.differences if d.measure == "recovery_auc"],
        *[t.sentence() for t in analysis.trends if t.measure == "recovery_auc"]])


# --headline: what --update-readme writes into its block
HEADLINES = {"full": headline, "primary": primary_headline}


def update_readme(readme: str | Path, results_dir: str | Path, options: Options = Options(),
                  block: str = "rank-study", attackers: Sequence[str] = (), kind: str = "full") -> None:
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    begin, end = block_markers(block)
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    block_text = HEADLINES[kind](results_dir, options, attackers)
    path.write_text(f"{head}{begin}\n```text\n{block_text}\n```\n{end}{tail}", encoding="utf-8")


def nothing_to_compare(results_dir: str | Path, results: Results, left_out: Sequence[LeftOut]) -> str:
    """Why the table is empty, in the terms of what the results directory holds."""
    if left_out and len(left_out) == len(results.unlearning):
        return (f"all {len(left_out)} unlearned run(s) under {results_dir} were left out of the matched comparison "
                "(stop rule flags, listed above): no run reached the forget target with retain above the floor")
    return f"no results for any unlearned model under {results_dir}; run pipeline.py first"


def analyze(results_dir: str | Path, options: Options = Options(), out_dir: str | Path | None = None,
            stream=None, attackers: Sequence[str] = ()) -> pd.DataFrame:
    """Print the table and the trend (once per attacker: `attackers`, else the
    one in `options`), write recovery_vs_rank.csv and .png, return the table
    (with an `attacker` column when there are several)."""
    stream = stream or sys.stdout
    results = load_results(results_dir)
    attackers = tuple(attackers) or (options.attacker,)
    tables, title = [], ""
    for attacker in attackers:
        if len(attackers) > 1:
            print(f"\n{attacker_heading(attacker)}", file=stream)
        table, title = report(results_dir, results, replace(options, attacker=attacker), stream,
                              show_left_out=attacker == attackers[0])
        tables.append(table.assign(attacker=attacker) if len(attackers) > 1 else table)
    table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    out = Path(out_dir or results_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "recovery_vs_rank.csv", index=False)
    plot(table, out / "recovery_vs_rank.png", title, source=figure_source(table))
    curves = plot_curves(table, out / "recovery_curves.png", f"{title}: attacker {attackers[0]}",
                         source=figure_source(table))
    print(f"wrote {out / 'recovery_vs_rank.csv'} and {out / 'recovery_vs_rank.png'}"
          + (f" and {out / 'recovery_curves.png'}" if curves else "") +
          f" (95% CIs: {options.bootstrap} bootstrap draws over seeds, held-out splits and questions)", file=stream)
    return table


def report(results_dir: str | Path, results: Results, options: Options, stream,
           show_left_out: bool = True) -> tuple[pd.DataFrame, str]:
    """One attacker's table, trend, paired differences and flags, printed; the table and its title."""
    units, left_out = units_of(results, options)
    for line in [*left_out, *step0_check(results)] if show_left_out else ():
        print(line, file=stream)
    analysis = summarize(units, options)
    table = analysis.table
    if table.empty:
        raise ValueError(nothing_to_compare(results_dir, results, left_out))
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
    print(format_table(table), file=stream)
    for t in analysis.trends:
        if options.match_target is None or t.measure == "recovered_fraction":
            print(t.sentence(), file=stream)
    if options.match_target is None:
        for d in analysis.differences:
            print(d.sentence(), file=stream)
        for line in [*analysis.distances, *machine_lines(units)]:
            print(line, file=stream)
    print_flags(table, options, stream)
    return table, title


class Parser(argparse.ArgumentParser):
    """Bad input is one `error:` line (exit 2), as in the pipeline."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


# option -> (low, high, what it is): every number the analysis takes is a fraction or an accuracy
FRACTIONS = {"min_forgetting": "base - A, an accuracy difference", "min_retain_kept": "a fraction of retain kept",
             "recovery_threshold": "a fraction of base accuracy (or, with --absolute-threshold, an accuracy)",
             "match_forgetting": "an accuracy", "match_tolerance": "an accuracy difference"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default="evals/pipeline", help="the pipeline's results_dir")
    parser.add_argument("--out-dir", default=None, help="where to write the CSV and PNG (default: results dir)")
    parser.add_argument("--min-forgetting", type=float, default=0.1,
                        help="flag rows whose base - A is below this (default 0.1)")
    parser.add_argument("--min-retain-kept", type=float, default=0.8,
                        help="flag rows whose retain accuracy after unlearning is below this fraction of before "
                             "(default 0.8)")
    parser.add_argument("--recovery-threshold", type=float, default=0.9,
                        help="recovery_epoch threshold: a fraction of base accuracy (default 0.9)")
    parser.add_argument("--absolute-threshold", action="store_true",
                        help="read --recovery-threshold as an absolute accuracy")
    parser.add_argument("--match-forgetting", type=float, default=None, metavar="TARGET",
                        help="compare ranks at matched forgetting: per rank, the setting with A within the "
                             "tolerance of TARGET and the least retain damage")
    parser.add_argument("--match-tolerance", type=float, default=0.05)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws for the CIs (default 2000)")
    parser.add_argument("--attacker", default=["final"], nargs="+", choices=list(ATTACKERS),
                        help="how B, C and the floor pick among each model's RTT runs per held-out split: final "
                             "(the best lr by last-epoch V, the published study's), paper (the best lr and epoch, "
                             "chosen on V itself) or cross_fitted (the lr and epoch best on the model's other "
                             "held-out splits); several names report each in turn")
    parser.add_argument("--rtt-lrs", type=float, nargs="+", default=(), metavar="LR",
                        help="let the attacker choose only among these RTT lrs (B, C and the floor alike; "
                             "default: every lr the rows hold)")
    parser.add_argument("--block", default="rank-study",
                        help="the name of the block --update-readme fills (<!-- NAME:begin ... -->)")
    parser.add_argument("--update-readme", default=None, metavar="DOC",
                        help="write the headline (table, trend, paired differences) into DOC's rank-study block "
                             "(docs/rank_study.md)")
    parser.add_argument("--headline", default="full", choices=list(HEADLINES),
                        help="what --update-readme writes: full (the table, trends, differences, machines) or "
                             "primary (the area under the recovery curve per arm, its paired differences and trend)")
    parser.add_argument("--compare", default=None, nargs="+", metavar="PUBLISHED_DIR",
                        help="also print the table of published rows (e.g. results/rank_study) and, per rank, "
                             "whether this slice agrees with them; of several folders, the rows on this slice's "
                             "numeric path are used (a verdict across scoring modes, datasets or paths is refused)")
    parser.add_argument("--verdict", default="new_seed", choices=list(VERDICT_BASES),
                        help="what --compare's one verdict rests on: " + "; ".join(
                            f"{k}: {v}" for k, v in VERDICT_BASES.items()) + " (default new_seed)")
    args = parser.parse_args(argv)
    for name, what in FRACTIONS.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
            parser.error(f"--{name.replace('_', '-')}={value:g} is not allowed; it is {what}: use a value in [0, 1]")
    if args.bootstrap < 100:
        parser.error(f"--bootstrap={args.bootstrap} is not allowed; use 100 or more draws")
    for lr in args.rtt_lrs:
        if not (math.isfinite(lr) and lr > 0):
            parser.error(f"--rtt-lrs {lr:g} is not allowed; use positive learning rates")
    return args


def check_out_dir(out_dir: str) -> None:
    """--out-dir must be a folder, or a path a folder can be made at."""
    existing = nearest_existing(out_dir)
    if not existing.is_dir():
        raise ValueError(f"--out-dir: {out_dir} is not allowed; {existing} is a file: name a folder (it is made "
                         "when absent)")


def check_inputs(args: argparse.Namespace) -> None:
    """What the command reads after it has written its table, checked first
    (the results folder itself is read, and refused, before anything is written)."""
    if args.out_dir:
        check_out_dir(args.out_dir)
    if args.compare:
        for folder in args.compare:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"--compare: {folder} is not a folder; name the published results "
                                        "folder (e.g. results/rank_study)")
        published_results(load_results(args.results_dir), args.results_dir, args.compare)
    if args.rtt_lrs:
        ran = sorted(set(load_results(args.results_dir).rtt.get("lr", pd.Series(dtype=float)).astype(float)))
        for lr in args.rtt_lrs:
            if not np.isclose(lr, ran).any():
                raise ValueError(f"--rtt-lrs {lr:g} is not allowed; the RTT rows under {args.results_dir} ran "
                                 f"lrs {', '.join(f'{r:g}' for r in ran) or 'none'}")
    if args.update_readme and args.headline == "primary":
        units, _ = units_of(load_results(args.results_dir), Options(attacker=args.attacker[0]))
        if len(budget_of(units)) < 2:
            raise ValueError(f"--headline primary: the rows under {args.results_dir} read V at no steps of the "
                             "attacker's budget (ft.budget), so they have no area under a recovery curve; use "
                             "--headline full")
    if args.update_readme:
        path, (begin, end) = Path(args.update_readme), block_markers(args.block)
        if not path.is_file() or begin not in (text := path.read_text(encoding="utf-8")) or end not in text:
            raise ValueError(f"--update-readme: {path} has no {begin} ... {end} block to fill")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = Options(min_forgetting=args.min_forgetting, min_retain_kept=args.min_retain_kept,
                      recovery_threshold=args.recovery_threshold, absolute_threshold=args.absolute_threshold,
                      match_target=args.match_forgetting, match_tolerance=args.match_tolerance,
                      bootstrap=args.bootstrap, attacker=args.attacker[0], rtt_lrs=tuple(args.rtt_lrs))
    attackers = tuple(dict.fromkeys(args.attacker))
    try:
        check_inputs(args)
        analyze(args.results_dir, options, args.out_dir, attackers=attackers)
        if args.compare:
            compare(args.results_dir, args.compare, options, verdict=args.verdict)
        if args.update_readme:
            update_readme(args.update_readme, args.results_dir, options, args.block, attackers, args.headline)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
