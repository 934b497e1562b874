"""Choice-likelihood scoring checked against lm-evaluation-harness: the same
(question, choice) pairs scored by the pipeline's packed pass and by lm-eval's
HFLM.loglikelihood, compared question by question (the arg-max choice and
the summed log-probabilities).

    pip install --target /tmp/lmeval --no-deps lm-eval==0.4.13
    PYTHONPATH=/tmp/lmeval python tests/benchmarks/lm_eval_crosscheck.py [--dataset WORLD_FACTS_KNOWN]

lm-eval is not a dependency of the project: its HF model class needs only
what the project already installs, so --no-deps is enough.
"""

from __future__ import annotations

import argparse
import time

import torch
from embedded import add_model_arguments, load_fp32  # noqa: E402  (puts the project on the path)

from toolkit.data import data_file, load_mcq  # noqa: E402
from toolkit.datasets import DATASETS, ensure_dataset  # noqa: E402
from toolkit.evaluation import Evaluator  # noqa: E402
from toolkit.facts import RandomBdSpec  # noqa: E402
from toolkit.names import Datasets  # noqa: E402
from toolkit.prompts import choice_prompt  # noqa: E402
from toolkit.settings import EvalFiles  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--dataset", default="WORLD_FACTS_KNOWN", choices=[d.name for d in Datasets])
    parser.add_argument("--splits", type=int, default=10, help="how many of the dataset's question files")
    args = parser.parse_args()
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    dataset = Datasets[args.dataset]
    ensure_dataset(args.data_root, dataset, RandomBdSpec(10, 8, 0, 5, 3))
    files = DATASETS[dataset]
    names = [*files.val_files, *files.val_retain_files][: args.splits]
    loaded = load_fp32(args)
    path, policy, tokenizer, model = loaded.path, loaded.policy, loaded.tokenizer, loaded.model

    evaluator = Evaluator.build(tokenizer, EvalFiles(tuple(names), (), "", "", "choice"), args.data_root, 0, 16, policy)
    start = time.perf_counter()
    ours = evaluator.score(model, evaluator.forget)
    ours_s = time.perf_counter() - start
    rows = [row for name in names for row in load_mcq(data_file(args.data_root, name))]
    our_correct = [bool(c) for name in names for c in ours[name].correct]

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, device="cpu")
    requests = [Instance("loglikelihood", {}, (choice_prompt(row), f" {choice}"), i)
                for row in rows for i, choice in enumerate(row.choices)]
    start = time.perf_counter()
    with torch.no_grad():
        logprobs = [lp for lp, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    theirs_s = time.perf_counter() - start
    k = len(rows[0].choices)
    their_choice = [max(range(k), key=lambda j: logprobs[q * k + j]) for q in range(len(rows))]
    their_correct = [c == row.answer for c, row in zip(their_choice, rows)]
    agree = sum(a == b for a, b in zip(our_correct, their_correct))
    print(f"{args.dataset}, {len(names)} files, {len(rows)} questions, {path}, fp32 CPU")
    print(f"accuracy: pipeline (choice) {sum(our_correct) / len(rows):.4f}, lm-eval (acc) "
          f"{sum(their_correct) / len(rows):.4f}; same verdict on {agree} of {len(rows)} questions")
    print(f"time: pipeline {ours_s:.1f} s (one packed pass per question), lm-eval {theirs_s:.1f} s "
          f"({theirs_s / ours_s:.2f}x)")


if __name__ == "__main__":
    main()
