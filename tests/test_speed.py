"""The CPU speed work (issue #36) computes what it computed before: the lean
and compiled Lion updates against lion-pytorch's own, the LM head only at
the labelled positions against logits everywhere, length buckets against
random batches, and the stop rule's sampled checks against counting every
question (the same stops)."""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch

from conftest import cpu_policy, made_up_facts
from toolkit import training
from toolkit.data import McqRow
from toolkit.device import resolve_device_policy
from toolkit.evaluation import Evaluator, QuestionFile, poisson_tail_mean, sampled_lower_bound
from toolkit.losses import grouped_token_nll
from toolkit.models import load_model
from toolkit.prompts import Encoded, TextPair, answer_letter_token_ids, collate, encode, shuffled_batches
from toolkit.settings import StopRule
from toolkit.stage import StopChecker
from toolkit.training import LION_UPDATE_FUNCTIONS, lion_update_name, make_optimizer

# ---------------------------------------------------------------- Lion's update


SHAPES = ((64, 32), (32,), (7, 5, 3), *((r, 16) for r in range(1, 12)))  # more shapes than a recompile limit


def _weights(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


@torch.no_grad()
def _run_updates(update, steps: int = 4, wd: float = 0.0) -> list[torch.Tensor]:
    params, momenta = _weights(0), [torch.zeros_like(p) for p in _weights(0)]
    for step in range(steps):
        for p, m, g in zip(params, momenta, _weights(step + 1)):
            update(p, g, m, 1e-3 * (step + 1), wd, 0.9, 0.99)
    return params + momenta


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_the_lean_lion_update_is_the_librarys_bit_for_bit(wd):
    library = _run_updates(LION_UPDATE_FUNCTIONS["library"](), wd=wd)
    lean = _run_updates(LION_UPDATE_FUNCTIONS["lean"](), wd=wd)
    assert all(torch.equal(a, b) for a, b in zip(library, lean))


def test_the_compiled_lion_update_equals_the_librarys_to_rounding():
    library = _run_updates(LION_UPDATE_FUNCTIONS["library"](), wd=0.1)
    compiled = _run_updates(LION_UPDATE_FUNCTIONS["compiled"](), wd=0.1)
    assert not training._COMPILE_FAILED, "this machine compiles (a C++ compiler is here)"
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(library, compiled))


def test_a_compiler_failure_falls_back_to_the_lean_update_once_and_says_so(monkeypatch, caplog):
    def broken():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(training, "_compiled_one_pass", broken)
    monkeypatch.setattr(training, "_COMPILE_FAILED", False)
    with caplog.at_level(logging.WARNING, logger="toolkit.training"):
        compiled = _run_updates(training.compiled_lion_update)
    assert all(torch.equal(a, b) for a, b in zip(compiled, _run_updates(training.lean_lion_update)))
    assert [r.getMessage() for r in caplog.records] == [
        "train.lion_update=compiled could not compile here (no C++ compiler found); using the lean update"]


def test_auto_is_triton_where_the_policy_picks_it_else_lean(tiny_llama):
    cpu = resolve_device_policy({"device": "cpu"})
    assert lion_update_name("auto", cpu) == "lean" and lion_update_name("library", cpu) == "library"
    model = load_model(str(tiny_llama), cpu_policy())
    optimizer = make_optimizer("lion", model, 1e-4, cpu, "auto")
    assert optimizer.update_fn is training.lean_lion_update


# ---------------------------------------------------------------- the LM head, padding


def test_the_head_at_the_labels_gives_the_losses_and_scores_of_logits_everywhere(tiny_llama, byte_level_tokenizer):
    tok, model = byte_level_tokenizer, load_model(str(tiny_llama), cpu_policy())
    examples = [encode(tok, TextPair(q, a), 64) for q, a in
                [("When was Aaron Abernathy born?\nAnswer:", " 1965"), ("", "Yara Zabala was born in 1903."),
                 ("Q:", " yes"), ("Where is Lyon?\nAnswer:", " France")]]
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        at_labels = grouped_token_nll(model, batch, [1, 3], head_at_labels=True)
        everywhere = grouped_token_nll(model, batch, [1, 3], head_at_labels=False)
    assert all(a.item() == pytest.approx(b.item(), rel=1e-5) for a, b in zip(at_labels, everywhere))
    rows = [McqRow("When was Aaron Abernathy born?", ("1961", "1958", "1965", "1994"), 2),
            McqRow("Where is Lyon?", ("Spain", "France", "Peru", "Chad"), 1)]
    for scoring in ("letter", "choice"):
        question_file = QuestionFile.build(tok, "f", rows, scoring=scoring)
        scores = []
        for head_at_labels in (True, False):
            evaluator = Evaluator([question_file], [], answer_letter_token_ids(tok), tok.pad_token_id, 2,
                                  cpu_policy().autocast, scoring, head_at_labels=head_at_labels)
            scores.append(evaluator.batch_scores(model, question_file, [0, 1]))
        assert torch.allclose(scores[0], scores[1], atol=1e-5), scoring


def test_without_length_buckets_batches_hold_the_same_rows_in_random_order():
    items = [Encoded([0] * n, [0] * n) for n in range(3, 27)]
    bucketed = shuffled_batches(items, 4, random.Random(0))
    mixed = shuffled_batches(items, 4, random.Random(0), by_length=False)
    for batches in (bucketed, mixed):
        assert sorted(len(e.input_ids) for b in batches for e in b) == list(range(3, 27))

    def padding(batches):
        return sum(max(len(e.input_ids) for e in b) * len(b) - sum(len(e.input_ids) for e in b) for b in batches)

    assert padding(bucketed) < padding(mixed) / 3


# ---------------------------------------------------------------- sampled stop checks


def test_the_sampled_bound_of_a_sample_with_no_wrong_answer():
    # n draws from each of F files, none wrong: Chernoff gives exp(-n * F * (1 - bound)) = alpha
    bound = sampled_lower_bound([6] * 5, [6] * 5, [40] * 5, 0.001)
    assert bound == pytest.approx(1 - math.log(1000) / 30)
    assert poisson_tail_mean(0, 0.001) == pytest.approx(math.log(1000))
    # a wrong answer lowers it; a file drawn whole counts exactly
    assert sampled_lower_bound([5, 6, 6, 6, 6], [6] * 5, [40] * 5, 0.001) < bound
    assert sampled_lower_bound([3, 6], [4, 6], [4, 40], 0.001) == pytest.approx(1 - (0.25 + math.log(1000) / 6) / 2)
    assert sampled_lower_bound([4, 4], [4, 4], [4, 4], 0.001) == 1.0


def test_the_sampled_bound_holds_at_its_confidence():
    """Files whose mean accuracy is exactly at a threshold: the sample's bound
    clears the threshold in at most alpha of the draws."""
    rng, alpha = random.Random(0), 0.05
    for accuracies, sizes, n in (([0.6] * 5, [50] * 5, 6), ([0.2, 1.0, 0.6], [30, 58, 41], 8), ([0.9], [200], 20)):
        files = [[i < round(a * size) for i in range(size)] for a, size in zip(accuracies, sizes)]
        truth = sum(sum(f) / len(f) for f in files) / len(files)
        cleared = 0
        for _ in range(3000):
            drawn = [rng.sample(f, n) for f in files]
            bound = sampled_lower_bound([sum(d) for d in drawn], [n] * len(files), sizes, alpha)
            cleared += bound > truth
        assert cleared / 3000 <= alpha, (accuracies, cleared)


class _ScriptedModel(torch.nn.Module):
    """A 'model' whose answers at each step are given: correct[file][question]."""

    def __init__(self):
        super().__init__()
        self.correct: dict[str, list[bool]] = {}


def _scripted_evaluator(sizes_forget, sizes_retain, model: _ScriptedModel) -> Evaluator:
    def question_file(name, size):
        return QuestionFile(name, tuple((1,) * (1 + i % 3) for i in range(size)), (0,) * size)

    evaluator = Evaluator([question_file(f"forget{i}", n) for i, n in enumerate(sizes_forget)],
                          [question_file(f"retain{i}", n) for i, n in enumerate(sizes_retain)], [0, 1, 2, 3], 0, 32,
                          cpu_policy().autocast, "letter")

    def batch_scores(model_, f, batch):
        scores = torch.zeros(len(batch), 4)
        for row, i in enumerate(batch):
            scores[row, 0 if model.correct[f.name][i] else 1] = 1.0
        return scores

    evaluator.batch_scores = batch_scores
    return evaluator


def _trajectory(rng: random.Random, sizes_forget, sizes_retain, checks: int):
    """Forget accuracy falling from about 1 towards 0.2 (at a random pace),
    retain near 1 with, in some runs, a collapse below the floor."""
    pace, collapse = rng.uniform(0.03, 0.12), rng.choice([None, None, rng.randrange(3, checks)])
    states = []
    for k in range(checks):
        forget_acc = max(0.15, 1.0 - pace * k * rng.uniform(0.7, 1.3))
        retain_acc = 0.97 if collapse is None or k < collapse else 0.5
        states.append({**{f"forget{i}": [rng.random() < forget_acc for _ in range(n)] for i, n in enumerate(sizes_forget)},
                       **{f"retain{i}": [rng.random() < retain_acc for _ in range(n)] for i, n in enumerate(sizes_retain)}})
    return states


def _stop(checker: StopChecker, model: _ScriptedModel, states) -> tuple:
    for k, state in enumerate(states[1:], start=1):
        model.correct = state
        outcome = checker.check(model, 5 * k, 1)
        if outcome is not None:
            return outcome
    return None


def test_sampled_checks_stop_where_counting_every_question_stops_and_score_far_fewer():
    """Runs shaped like the study's (its file sizes, forget falling towards the
    target, retain sometimes collapsing): the sampled checks stop at the same
    step for the same reason with the same recorded accuracies, having scored
    far fewer questions."""
    sizes_forget, sizes_retain = [37, 37, 35, 33, 38], [58, 56, 46, 52, 56]
    rng = random.Random(3)
    scored = {0: 0, 6: 0}
    reasons = set()
    for run in range(40):
        states = _trajectory(rng, sizes_forget, sizes_retain, checks=20)
        outcomes = {}
        for sample in scored:
            model = _ScriptedModel()
            evaluator = _scripted_evaluator(sizes_forget, sizes_retain, model)
            rule = StopRule(0.4, 5, 0.6, stop_check_sample=sample, stop_check_alpha=0.001)
            checker = StopChecker(rule, evaluator, seed=run)
            questions = []
            real_scoring = evaluator.scoring

            def counting(model_, files, *args, _questions=questions, _real=real_scoring):
                scoring = _real(model_, files, *args)
                _questions.append(scoring)
                return scoring

            evaluator.scoring = counting
            outcomes[sample] = _stop(checker, model, states)
            scored[sample] += sum(s.questions for s in questions)
        assert outcomes[6] == outcomes[0], run
        reasons.add(outcomes[0].reason if outcomes[0] else None)
    assert reasons >= {"target", "retain_floor"}  # both kinds of stop were decided alike
    assert scored[6] < 0.6 * scored[0]


def test_on_the_tiny_model_sampled_checks_stop_at_the_same_step(tiny_llama, tmp_path_factory):
    """Real unlearning runs (a tiny model, three learning rates): the sampled
    checks and the exact ones stop at the same step, for the same reason."""
    from conftest import unlearn_settings
    from toolkit.facts import write_random_bd_dataset
    from toolkit.registry import METHODS
    from unlearn_corpus import unlearn

    root = tmp_path_factory.mktemp("facts40")
    write_random_bd_dataset(root / "random_bd", made_up_facts(num_splits=6, facts_per_split=16, seed=4))
    val, val_retain = [f"random_bd/split_{i}" for i in range(3)], ["random_bd/split_4", "random_bd/split_5"]
    for lr in (1e-2, 2e-2, 4e-2):
        stops = []
        for sample in (0, 4):
            settings = unlearn_settings(
                tiny_llama, root, tmp_path_factory.mktemp("out") / "m", "GD",
                forget=[f"random_bd/corpus_split_{i}" for i in range(3)], retain=["random_bd/corpus_split_4"], val=val, val_retain=val_retain, lr=lr, epochs=2,
                overrides=["unlearn.stop_at_forget_acc=0.2", "unlearn.stop_check_every=2",
                           "unlearn.stop_retain_floor=0.05", f"unlearn.stop_check_sample={sample}"])
            result = unlearn(settings, METHODS["GD"].objective(settings))
            stops.append((result.stop, result.forget_accs))
        assert stops[0] == stops[1], lr
