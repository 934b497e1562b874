"""What the embedded model knows before any teaching, per relation, under
each scoring mode (letter, choice, choice_norm), and what one question costs.

    python tests/benchmarks/pretrained_knowledge.py [--model smollm2-135m] [--years ../shared/data] [--unknown]
        [--dataset WORLD_FACTS_BY_COUNTRY_KNOWN]

Writes the world-facts dataset under --data-root when absent; with --years,
also scores the paper's years data (dates-years-trimmed, split 0); with
--unknown, writes the facts the model does not answer under choice scoring
into toolkit/world_facts_table.py (what WORLD_FACTS_KNOWN leaves out).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from embedded import ROOT, add_model_arguments, load_fp32  # noqa: E402  (puts the project on the path)

from toolkit.data import read_jsonl, write_jsonl  # noqa: E402
from toolkit.datasets import DATASETS, ensure_dataset  # noqa: E402
from toolkit.evaluation import Evaluator  # noqa: E402
from toolkit.facts import RandomBdSpec  # noqa: E402
from toolkit.names import Datasets  # noqa: E402
from toolkit.settings import SCORING_MODES, EvalFiles  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--years", default=None, help="a data root holding dates-years-trimmed")
    parser.add_argument("--years-questions", type=int, default=120)
    parser.add_argument("--unknown", action="store_true", help="write the unknown facts into the table module")
    parser.add_argument("--dataset", default="WORLD_FACTS", choices=[d.name for d in Datasets if "WORLD" in d.name],
                        help="which world-facts variant to score (default: all facts, as --unknown needs)")
    args = parser.parse_args()
    dataset = Datasets[args.dataset]
    ensure_dataset(args.data_root, dataset, RandomBdSpec(10, 8, 0, 5, 3))
    loaded = load_fp32(args)
    path, policy, tokenizer, model = loaded.path, loaded.policy, loaded.tokenizer, loaded.model
    files = DATASETS[dataset]
    names = [*files.val_files, *files.val_retain_files]
    questions = [row for n in names for row in read_jsonl(Path(args.data_root, f"{n}.jsonl"))]
    relations = [row["relation"] for row in questions]
    print(f"{args.model} ({path}), fp32, {len(relations)} world facts in {len(names)} splits")
    header = f"{'relation':<10} {'facts':>5} " + " ".join(f"{m:>11}" for m in SCORING_MODES)
    by_mode, seconds = {}, {}
    for mode in SCORING_MODES:
        evaluator = Evaluator.build(tokenizer, EvalFiles(tuple(names), (), "", "", mode), args.data_root, 0, 16, policy)
        start = time.perf_counter()
        scores = evaluator.score(model, evaluator.forget)
        seconds[mode] = time.perf_counter() - start
        by_mode[mode] = [c for n in names for c in scores[n].correct]
        forget = [c for n in files.val_files for c in scores[n].correct]
        print(f"{mode}: forget splits 0-4 {sum(forget) / len(forget):.3f} ({len(forget)} facts), "
              f"{seconds[mode] / len(relations) * 1000:.0f} ms a question")
    print(header)
    groups = defaultdict(list)
    for i, relation in enumerate(relations):
        groups[relation].append(i)
    for relation, rows in sorted(groups.items()) + [("all", list(range(len(relations))))]:
        accs = [sum(by_mode[m][i] for i in rows) / len(rows) for m in SCORING_MODES]
        print(f"{relation:<10} {len(rows):>5} " + " ".join(f"{a:>11.3f}" for a in accs))
    if args.unknown:
        write_unknown([f"{row['relation']}|{row['subject']}" for row, c in zip(questions, by_mode["choice"]) if not c])
    print("cost of a question relative to letter scoring: "
          + ", ".join(f"{m} {seconds[m] / seconds['letter']:.2f}x" for m in SCORING_MODES[1:]))
    if args.years:
        name = "dates-years-trimmed/split_0"
        rows = read_jsonl(Path(args.years, f"{name}.jsonl"))[: args.years_questions]
        tmp = Path(args.data_root, "years_pilot")
        tmp.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp / "split_0.jsonl", rows)
        for mode in SCORING_MODES:
            evaluator = Evaluator.build(tokenizer, EvalFiles(("years_pilot/split_0",), (), "", "", mode),
                                        args.data_root, 0, 16, policy)
            [score] = evaluator.score(model, evaluator.forget).values()
            print(f"years ({name}, first {len(rows)} questions), {mode}: {score.acc:.3f}")


def write_unknown(names: list[str]) -> None:
    """Replace the UNKNOWN_TO_EMBEDDED set of the table module with `names`."""
    table = ROOT / "toolkit" / "world_facts_table.py"
    text = table.read_text()
    start = text.index("UNKNOWN_TO_EMBEDDED = ")
    body = "".join(f"    {name!r},\n" for name in sorted(names))
    table.write_text(text[:start] + "UNKNOWN_TO_EMBEDDED = frozenset({\n" + body + "})\n")
    print(f"{len(names)} unknown facts written to {table}")


if __name__ == "__main__":
    main()
