"""The corpus toolkit: tokens, batches, losses, evaluation, device policy, LoRA."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import cpu_policy
from toolkit import device
from toolkit.data import McqRow
from toolkit.device import (
    BF16_MIN_SPEEDUP,
    Capabilities,
    DevicePolicy,
    bf16_matmul_speedup,
    cpu_has_native_bf16,
    resolve_device_policy,
)
from toolkit.evaluation import QuestionFile, letter_logits, score_letter_logits
from toolkit.losses import mean_token_nll
from toolkit.models import (
    DEFAULT_LORA_TARGETS,
    adapter_base,
    attach_lora,
    is_peft,
    load_model,
    load_tokenizer,
    lora_layers,
    save_checkpoint,
)
from toolkit.names import IGNORE_INDEX, LossType, UnlearnType
from toolkit.prompts import (
    MCQ_EXAMPLE_BUILDERS,
    Encoded,
    TextPair,
    answer_letter_token_ids,
    collate,
    encode,
    shuffled_batches,
)
from toolkit.training import freeze_embeddings, make_optimizer, warmup_then_constant


def test_answer_tokens_byte_level(byte_level_tokenizer):
    ids = answer_letter_token_ids(byte_level_tokenizer)
    assert byte_level_tokenizer.convert_ids_to_tokens(ids) == ["ĠA", "ĠB", "ĠC", "ĠD"]


def test_answer_tokens_sentencepiece(sentencepiece_tokenizer):
    ids = answer_letter_token_ids(sentencepiece_tokenizer)
    assert sentencepiece_tokenizer.convert_ids_to_tokens(ids) == ["▁A", "▁B", "▁C", "▁D"]


@pytest.mark.parametrize("fixture", ["byte_level_tokenizer", "sentencepiece_tokenizer"])
def test_answer_token_is_what_follows_answer_in_a_prompt(fixture, request):
    tokenizer = request.getfixturevalue(fixture)
    row = McqRow("When was Aaron Abernathy born?", ("1961", "1958", "1965", "1994"), 2)
    pair = MCQ_EXAMPLE_BUILDERS[LossType.LETTER](row)
    encoded = encode(tokenizer, pair, 256)
    first_target = next(i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX)
    assert first_target == answer_letter_token_ids(tokenizer)[2]


def test_encode_masks_prefix_and_collate_masks_padding(byte_level_tokenizer):
    tok = byte_level_tokenizer
    short = encode(tok, TextPair("Q:", " yes"), 64)
    long = encode(tok, TextPair("", "Aaron Abernathy was born in 1965."), 64)
    assert short.labels[: len(tok("Q:").input_ids)] == [IGNORE_INDEX] * len(tok("Q:").input_ids)
    assert all(label != IGNORE_INDEX for label in long.labels)
    batch = collate([short, long], tok.pad_token_id)
    n = len(short.input_ids)
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()


def test_nll_excludes_padding(tiny_llama, byte_level_tokenizer):
    """A padded batch gives the token-weighted mean of the rows' own NLLs."""
    tok = byte_level_tokenizer
    model = load_model(str(tiny_llama), cpu_policy())
    a = encode(tok, TextPair("", "In 1965, Aaron Abernathy was born."), 64)
    b = encode(tok, TextPair("", "Yara Zabala"), 64)
    with torch.no_grad():
        joint = mean_token_nll(model, collate([a, b], tok.pad_token_id)).item()
        na = mean_token_nll(model, collate([a], tok.pad_token_id)).item()
        nb = mean_token_nll(model, collate([b], tok.pad_token_id)).item()
    ta, tb = len(a.input_ids) - 1, len(b.input_ids) - 1
    assert joint == pytest.approx((na * ta + nb * tb) / (ta + tb), rel=1e-4)


def test_nll_matches_transformers_loss(tiny_llama, byte_level_tokenizer):
    tok = byte_level_tokenizer
    model = load_model(str(tiny_llama), cpu_policy())
    batch = collate([encode(tok, TextPair("", "In 1965, Aaron Abernathy was born."), 64)], tok.pad_token_id)
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
        ours = mean_token_nll(model, batch).item()
    assert ours == pytest.approx(reference, rel=1e-5)


def test_calibrated_accuracy_removes_letter_bias():
    # Every row prefers A by +5; the true answers are only visible after removing that bias.
    answers = [1, 2, 3, 0]
    logits = torch.full((4, 4), 0.0)
    logits[:, 0] += 5.0
    for row, answer in enumerate(answers):
        logits[row, answer] += 1.0
    score = score_letter_logits(logits, answers)
    assert score.acc == pytest.approx(0.25)
    assert score.calibrated_acc == pytest.approx(1.0)


def test_evaluate_mcq_uses_last_prompt_position(tiny_llama, byte_level_tokenizer):
    """Batched (padded) evaluation gives the same letter logits as one row at a time."""
    model = load_model(str(tiny_llama), cpu_policy())
    rows = [McqRow("When was Aaron Abernathy born?", ("1961", "1958", "1965", "1994"), 2),
            McqRow("When was Yara Zabala born?", ("2001", "1999", "1903", "1967"), 0)]
    def scored(some_rows, batch_size):
        prompts = QuestionFile.build(byte_level_tokenizer, "", some_rows).prompts
        return letter_logits(model, prompts, answer_letter_token_ids(byte_level_tokenizer),
                             byte_level_tokenizer.pad_token_id, batch_size)

    together = scored(rows, 2)
    one_by_one = torch.cat([scored([r], 1) for r in rows])
    assert torch.allclose(together, one_by_one, atol=1e-4)


def test_batches_cover_every_item_once():
    items = [Encoded([0] * n, [0] * n) for n in (3, 9, 4, 8, 5, 7, 6)]
    batches = shuffled_batches(items, 3, random.Random(0))
    assert sorted(len(e.input_ids) for b in batches for e in b) == [3, 4, 5, 6, 7, 8, 9]
    assert all(len(b) <= 3 for b in batches)


# ---------------------------------------------------------------- device policy

CPU_ONLY = Capabilities(cuda=False, flash_attn=False, triton=False)
CPU_BF16 = Capabilities(cuda=False, flash_attn=False, triton=False, cpu_bf16=True)
GPU_FULL = Capabilities(cuda=True, flash_attn=True, triton=True)
GPU_BARE = Capabilities(cuda=True, flash_attn=False, triton=False)


@pytest.mark.parametrize("caps, expected", [
    (CPU_ONLY, DevicePolicy("cpu", torch.float32, "sdpa", False)),
    (GPU_FULL, DevicePolicy("cuda", torch.bfloat16, "flash_attention_2", True)),
    (GPU_BARE, DevicePolicy("cuda", torch.bfloat16, "sdpa", False)),
])
def test_device_policy_from_capabilities(caps, expected):
    assert resolve_device_policy({}, caps) == expected


def test_device_policy_overrides():
    policy = resolve_device_policy({"device": "cpu", "dtype": "bfloat16", "attn_implementation": "eager"}, GPU_FULL)
    assert policy == DevicePolicy("cpu", torch.bfloat16, "eager", False)
    assert resolve_device_policy({"triton_lion": False}, GPU_FULL).triton_lion is False


@pytest.mark.parametrize("overrides, caps, message", [
    ({"device": "cuda"}, CPU_ONLY, "CUDA is not available"),
    ({"attn_implementation": "flash_attention_2"}, GPU_BARE, "flash_attn"),
    ({"triton_lion": True}, CPU_ONLY, "triton"),
    ({"dtype": "float64"}, CPU_ONLY, "device.dtype: 'float64' is not allowed"),
])
def test_device_policy_refuses_what_the_machine_lacks(overrides, caps, message):
    with pytest.raises(ValueError, match=message):
        resolve_device_policy(overrides, caps)


def test_a_gpu_machine_forced_to_cpu_gets_the_cpus_own_precision(monkeypatch):
    """The CPU's bf16 is detected whether or not CUDA is there: a CPU run on a
    GPU machine (device.device=cpu) uses autocast where that CPU is fast at bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "importable", lambda module: False)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    for speedup, autocast in ((2.0, torch.bfloat16), (0.5, None)):
        monkeypatch.setattr(device, "bf16_matmul_speedup", lambda threads=None, s=speedup: s)
        caps = Capabilities.detect()
        assert caps == Capabilities(cuda=True, flash_attn=False, triton=False, cpu_bf16=autocast is not None)
        assert resolve_device_policy({}, caps) == DevicePolicy("cuda", torch.bfloat16, "sdpa", False)
        assert resolve_device_policy({"device": "cpu"}, caps).autocast_dtype == autocast


def test_detected_capabilities_on_this_machine_pick_a_runnable_policy():
    policy = resolve_device_policy()
    if not torch.cuda.is_available():
        fast_bf16 = cpu_has_native_bf16() and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP
        assert policy == DevicePolicy("cpu", torch.float32, "sdpa", False, torch.bfloat16 if fast_bf16 else None)


def test_measuring_bf16_leaves_the_seeded_random_stream_alone():
    """The policy's matmul timing runs once per process, inside a run's set-up:
    drawing from the global generator there gave a process's first run
    another LoRA initialisation than the runs after it (seen on an
    AVX512-BF16 machine, where the timing runs)."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    bf16_matmul_speedup.__wrapped__()
    assert torch.equal(torch.rand(4), expected)


def test_optimizer_sees_only_trainable_parameters(tiny_llama):
    model = load_model(str(tiny_llama), cpu_policy())
    freeze_embeddings(model)
    optimizer = make_optimizer("lion", model, 1e-4, resolve_device_policy({}, CPU_ONLY))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(p.requires_grad for p in params)
    assert all(p is not model.get_input_embeddings().weight for p in params)
    with pytest.raises(ValueError, match="optimizer='sgd' is not allowed"):
        make_optimizer("sgd", model, 1e-4, resolve_device_policy({}, CPU_ONLY))


def test_warmup_is_linear_then_constant():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = warmup_then_constant(optimizer, 4)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


# ---------------------------------------------------------------- LoRA


def _train_steps(model, tokenizer, steps=3, lr=1e-2):
    optimizer = make_optimizer("adamw", model, lr, resolve_device_policy({}, CPU_ONLY))
    batch = collate([encode(tokenizer, TextPair("", "Aaron Abernathy was born in 1965."), 64)],
                       tokenizer.pad_token_id)
    for _ in range(steps):
        optimizer.zero_grad()
        mean_token_nll(model, batch).backward()
        optimizer.step()
    return batch


def test_lora_training_changes_only_adapters(tiny_llama, byte_level_tokenizer):
    model = load_model(str(tiny_llama), cpu_policy())
    peft_model = attach_lora(model, rank=4)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    _train_steps(peft_model, byte_level_tokenizer)
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "LoRA training changed nothing"
    assert all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_merged_model_matches_peft_model_and_saves_plainly(tiny_llama, byte_level_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_model(str(tiny_llama), cpu_policy())
    peft_model = attach_lora(model, rank=4)
    batch = _train_steps(peft_model, byte_level_tokenizer)
    with torch.no_grad():
        peft_logits = peft_model(input_ids=batch["input_ids"]).logits
    saved = save_checkpoint(peft_model, byte_level_tokenizer, tmp_path / "merged")
    files = {p.name for p in saved.iterdir()}
    assert "model.safetensors" in files
    assert not any("adapter" in name for name in files)
    plain = AutoModelForCausalLM.from_pretrained(saved)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        plain_logits = plain(input_ids=batch["input_ids"]).logits
    assert torch.allclose(peft_logits, plain_logits, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=batch["input_ids"]).logits, plain_logits, atol=1e-4)


def test_lora_alpha_defaults_to_twice_the_rank(tiny_llama):
    model = load_model(str(tiny_llama), cpu_policy())
    config = attach_lora(model, rank=8).peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.0)
    assert set(config.target_modules) == set(DEFAULT_LORA_TARGETS)


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 16), (True, 16 / 4)])
def test_rank_stabilised_scaling_divides_alpha_by_the_root_of_the_rank(tiny_llama, use_rslora, expected):
    model = load_model(str(tiny_llama), cpu_policy())
    peft_model = attach_lora(model, rank=16, alpha=16, use_rslora=use_rslora)
    assert {layer.scaling["default"] for layer in lora_layers(peft_model)} == {expected}


def test_lora_without_target_modules_names_what_the_model_has(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32))
    # GPT-2 uses Conv1D, not Linear, except the LM head: PEFT targets both.
    with pytest.raises(ValueError, match="match no module of this model; its modules that LoRA can target \\(linear and "
                                         "Conv1D layers\\) are \\['c_attn', 'c_fc', 'c_proj', 'lm_head'\\]"):
        attach_lora(model, rank=4)


def test_checkpoint_save_is_atomic(tiny_llama, byte_level_tokenizer, tmp_path, monkeypatch):
    model = load_model(str(tiny_llama), cpu_policy())

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(byte_level_tokenizer), "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        save_checkpoint(model, byte_level_tokenizer, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_forget_objectives_by_method():
    import pipeline

    sign = lambda name: pipeline.METHODS[name].objective.keywords["forget_sign"]  # noqa: E731
    assert sign(UnlearnType.GD) == -1.0 and sign(UnlearnType.LORA) == -1.0  # ascent on the true facts
    assert sign(UnlearnType.WHP) == 1.0 and sign(UnlearnType.FWF) == 1.0  # descent on wrong answers
    assert pipeline.METHODS[UnlearnType.GD].trains_on == "unlearn_files"
    assert pipeline.METHODS[UnlearnType.FWF].trains_on == "fixed_wrong_unlearn_files"


def test_the_toolkit_imports_one_way():
    """Importing every module of the toolkit in a fresh interpreter loads none
    of the stages above it, nor Hydra or Ray; none but the analysis's rooms
    loads pandas; the stage modules load the toolkit and nothing of the pipeline."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    above = ("pipeline", "unlearn_corpus", "finetune_corpus", "rmu", "analyze_recovery", "hydra", "omegaconf", "ray",
             "pandas")
    modules = sorted(f"toolkit.{p.stem}" for p in (root / "toolkit").glob("*.py") if p.stem != "__init__")
    assert len(modules) >= 12

    def loaded_after(imports: str, others: tuple) -> str:
        code = f"import sys, {imports}; print(sorted(m for m in {others!r} if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    analysis = {f"toolkit.{m}" for m in ("result_frames", "attackers", "units", "estimates", "report")}
    assert loaded_after(", ".join(modules), above[:-1]) == "[]"
    assert loaded_after(", ".join(m for m in modules if m not in analysis), above) == "[]"
    assert loaded_after("unlearn_corpus, finetune_corpus, rmu.unlearn_pipeline", above[:1] + above[4:]) == "[]"


# ---------------------------------------------------------------- precision policy and numerics


@pytest.mark.parametrize("caps, bf16_autocast, expected", [
    (CPU_BF16, "auto", torch.bfloat16),  # native bf16: mixed precision
    (CPU_ONLY, "auto", None),  # no native bf16: fp32
    (CPU_ONLY, True, torch.bfloat16),  # forced on (emulated: slower, allowed)
    (CPU_BF16, False, None),  # forced off
    (GPU_FULL, "auto", None),  # CUDA keeps its policy: bf16 weights, no autocast
])
def test_precision_policy_branches(caps, bf16_autocast, expected):
    policy = resolve_device_policy({"bf16_autocast": bf16_autocast}, caps)
    assert policy.autocast_dtype == expected
    assert policy.dtype == (torch.bfloat16 if caps.cuda else torch.float32)  # weights and optimizer state


def test_precision_policy_refuses_a_bad_value():
    with pytest.raises(ValueError, match="device.bf16_autocast: 'sometimes' is not allowed; use auto, true or false"):
        resolve_device_policy({"bf16_autocast": "sometimes"}, CPU_BF16)


def _gd_loss(model, batch, policy):
    with policy.autocast():
        return mean_token_nll(model, batch)


def test_a_step_loss_under_bf16_autocast_is_close_to_fp32(tiny_llama, byte_level_tokenizer):
    fp32 = resolve_device_policy({"device": "cpu"}, CPU_ONLY)
    bf16 = resolve_device_policy({"device": "cpu"}, CPU_BF16)
    model = load_model(str(tiny_llama), fp32)
    tok = byte_level_tokenizer
    batch = collate([encode(tok, TextPair("", t), 64) for t in
                        ("Aaron Abernathy was born in 1965.", "In 1903, Yara Zabala was born.")], tok.pad_token_id)
    reference, mixed = _gd_loss(model, batch, fp32), _gd_loss(model, batch, bf16)
    assert mixed.dtype == torch.float32  # the loss itself is computed in fp32
    assert mixed.item() == pytest.approx(reference.item(), rel=0.02)
    reference.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    mixed.backward()
    for name, grad in grads.items():
        other = dict(model.named_parameters())[name].grad
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), other.flatten(), dim=0).item()
        assert cosine > 0.95, name


def test_merged_lora_equals_the_peft_model_after_bf16_training(tiny_llama, byte_level_tokenizer, tmp_path):
    """Under CPU autocast the frozen weights are stored in bf16; the merged
    checkpoint must still be exactly base (fp32) + B A, in the precision it is saved in."""
    from transformers import AutoModelForCausalLM

    bf16 = resolve_device_policy({"device": "cpu"}, CPU_BF16)
    model = attach_lora(load_model(str(tiny_llama), bf16), rank=4, frozen_dtype=torch.bfloat16)
    assert {layer.base_layer.weight.dtype for layer in lora_layers(model)} == {torch.bfloat16}
    optimizer = make_optimizer("adamw", model, 1e-2, bf16)
    tok = byte_level_tokenizer
    batch = collate([encode(tok, TextPair("", "Aaron Abernathy was born in 1965."), 64)], tok.pad_token_id)
    for _ in range(3):
        optimizer.zero_grad()
        _gd_loss(model, batch, bf16).backward()
        optimizer.step()
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    # The reference: the same adapters on the exact fp32 base, evaluated in fp32.
    reference = attach_lora(load_model(str(tiny_llama), resolve_device_policy({"device": "cpu"}, CPU_ONLY)), 4)
    reference.load_state_dict(adapters, strict=False)
    with torch.no_grad():
        expected = reference(input_ids=batch["input_ids"]).logits
    merged = save_checkpoint(model, tok, tmp_path / "merged", "merged", str(tiny_llama))
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=batch["input_ids"]).logits, expected, atol=1e-4)


def test_an_adapter_folder_loads_as_its_base_plus_the_adapter(tiny_llama, byte_level_tokenizer, tmp_path):
    policy = resolve_device_policy({"device": "cpu"}, CPU_ONLY)
    model = attach_lora(load_model(str(tiny_llama), policy), rank=4)
    batch = _train_steps(model, byte_level_tokenizer)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
    folder = save_checkpoint(model, byte_level_tokenizer, tmp_path / "adapter", "adapter", str(tiny_llama))
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    assert adapter_base(folder) == str(tiny_llama)
    loaded = load_model(str(folder), policy)
    assert not is_peft(loaded)  # merged in memory: later stages see a plain model
    assert all(p.requires_grad for p in loaded.parameters())  # and can train it (RTT), like a plain checkpoint
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=batch["input_ids"]).logits, expected, atol=1e-5)
    assert load_tokenizer(str(folder)).vocab_size == byte_level_tokenizer.vocab_size


def test_world_facts_are_written_in_the_papers_split_layout_with_same_relation_distractors(tmp_path):
    from collections import Counter

    from toolkit.data import load_mcq, read_jsonl
    from toolkit.world_facts import RELATIONS, all_facts, write_world_facts

    write_world_facts(tmp_path / "a")
    write_world_facts(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)  # deterministic
    answers = {}
    for fact in all_facts():
        answers.setdefault(fact.relation, set()).add(fact.answer)
    rows = [r for i in range(10) for r in read_jsonl(tmp_path / "a" / f"split_{i}.jsonl")]
    assert len(rows) >= 400 and set(Counter(r["relation"] for r in rows)) == set(RELATIONS)
    for row in rows:
        assert set(row["choices"]) <= answers[row["relation"]] and len(set(row["choices"])) == 4
    assert all(len(load_mcq(tmp_path / "a" / f"split_{i}.jsonl")) >= 35 for i in range(10))
    from toolkit.world_facts import FORGET_RELATIONS

    # forget splits 0-4 hold the forget relations, retain splits 5-9 the others
    relations = [{r["relation"] for r in read_jsonl(tmp_path / "a" / f"split_{i}.jsonl")} for i in range(10)]
    assert all(r == set(FORGET_RELATIONS) for r in relations[:5])
    assert all(r and not r & set(FORGET_RELATIONS) for r in relations[5:])
    corpus = read_jsonl(tmp_path / "a" / "corpus_split_0.jsonl")
    first = read_jsonl(tmp_path / "a" / "split_0.jsonl")[0]
    assert any(first["choices"][first["answer"]] in r["text"] for r in corpus)


def forget_split_names(folder) -> list[tuple[set[str], set[str]]]:
    """Per forget split (0-4): its questions' subjects and their right answers."""
    from toolkit.data import read_jsonl

    rows = [read_jsonl(folder / f"split_{i}.jsonl") for i in range(5)]
    return [({r["subject"] for r in split}, {r["choices"][r["answer"]] for r in split}) for split in rows]


def test_the_by_country_forget_splits_say_nothing_about_each_other(tmp_path):
    """RTT measures hidden knowledge only when T says nothing about V: in the
    second edition's deal, no forget split's subject or right answer is a
    subject or right answer in another forget split (all facts about one
    country, its capital and its cities, in one split), on the files as
    written, for all facts and for those the embedded model knows. The first
    edition's deal breaks this (a V city shares its answer country with T)."""
    from itertools import permutations

    from toolkit.data import read_jsonl
    from toolkit.datasets import BY_COUNTRY_DIRS, GENERATORS, WORLD_KNOWN_DIR
    from toolkit.names import Datasets

    for dataset in (Datasets.WORLD_FACTS_BY_COUNTRY, Datasets.WORLD_FACTS_BY_COUNTRY_KNOWN):
        folder = tmp_path / BY_COUNTRY_DIRS[dataset]
        GENERATORS[folder.name](folder, None)
        splits = forget_split_names(folder)
        assert all(len(subjects) >= 30 for subjects, _ in splits)
        for i, j in permutations(range(5), 2):
            assert not (splits[i][0] | splits[i][1]) & (splits[j][0] | splits[j][1]), (dataset, i, j)
        # the same questions as the first edition's deal, fact by fact: only the splits changed
        GENERATORS[WORLD_KNOWN_DIR](tmp_path / "old", None)
        old = {r["question"]: r for i in range(10) for r in read_jsonl(tmp_path / "old" / f"split_{i}.jsonl")}
        new = [r for i in range(10) for r in read_jsonl(folder / f"split_{i}.jsonl")]
        if dataset == Datasets.WORLD_FACTS_BY_COUNTRY_KNOWN:
            assert abs(len(new) - len(old)) <= 5  # the dev questions differ (chemical symbols now)
            assert all(old[r["question"]] == r for r in new if r["question"] in old)
            assert sum(r["question"] in old for r in new) >= len(new) - 5
    old_splits = forget_split_names(tmp_path / "old")
    shared = sum(bool(old_splits[i][1] & old_splits[j][1]) for i, j in permutations(range(5), 2))
    assert shared == 20  # every pair of the first edition's forget splits shares a right answer


def test_a_scoring_mode_is_part_of_a_key_except_the_letter_mode_published_keys_were_made_with():
    from toolkit.settings import EvalFiles, key_settings

    letter, choice = EvalFiles(("a",), (), "", ""), EvalFiles(("a",), (), "", "", "choice")
    assert "scoring" not in key_settings(letter) and key_settings(choice)["scoring"] == "choice"


def test_the_known_and_remapped_world_facts_keep_each_question_and_move_only_its_answer(tmp_path):
    from collections import Counter

    from toolkit.data import read_jsonl
    from toolkit.world_facts import write_world_facts

    unknown = {"capital|France", "city|Sydney", "symbol|iron"}
    keep = lambda fact: fact.name not in unknown  # noqa: E731
    write_world_facts(tmp_path / "all")
    write_world_facts(tmp_path / "known", keep)
    write_world_facts(tmp_path / "remapped", keep, remap=True)
    split = lambda variant, i: read_jsonl(tmp_path / variant / f"split_{i}.jsonl")  # noqa: E731
    for i in range(10):
        everything, known, remapped = split("all", i), split("known", i), split("remapped", i)
        # the filter drops facts and keeps every other question exactly as dealt
        assert known == [r for r in everything if f"{r['relation']}|{r['subject']}" not in unknown]
        assert [r["question"] for r in remapped] == [r["question"] for r in known]
        for old, new in zip(known, remapped):
            truth = old["choices"][old["answer"]]
            assert new["choices"][new["answer"]] != truth and truth not in new["choices"]
            assert len(set(new["choices"])) == 4
    dropped = [r for i in range(10) for r in split("all", i) if f"{r['relation']}|{r['subject']}" in unknown]
    assert len(dropped) == 3
    # a permutation within each relation: the answers' distribution is the same
    answers = lambda variant: Counter((r["relation"], r["choices"][r["answer"]])  # noqa: E731
                                      for i in range(10) for r in split(variant, i))
    assert answers("remapped") == answers("known")
    corpus = read_jsonl(tmp_path / "remapped" / "corpus_split_0.jsonl")
    first = split("remapped", 0)[0]
    assert first["choices"][first["answer"]] in corpus[0]["text"]  # the floor's corpus says the remapped answer


def test_every_world_fact_the_table_leaves_out_is_a_fact_of_the_table():
    from toolkit.world_facts import all_facts
    from toolkit.world_facts_table import UNKNOWN_TO_EMBEDDED

    names = {fact.name for fact in all_facts()}
    assert UNKNOWN_TO_EMBEDDED and UNKNOWN_TO_EMBEDDED <= names
    assert len(names) - len(UNKNOWN_TO_EMBEDDED) >= 400  # the known dataset still has at least 400 facts


def test_a_lora_updates_size_is_its_merged_deltas_norm_and_effective_rank(tiny_llama):
    import torch

    from toolkit.device import resolve_device_policy
    from toolkit.models import attach_lora, load_model
    from toolkit.weight_delta import effective_rank, low_rank_singular_values, update_size

    b, a = torch.randn(40, 3, dtype=torch.float64), torch.randn(3, 24, dtype=torch.float64)
    assert torch.allclose(low_rank_singular_values(b, a, 0.5), torch.linalg.svdvals(0.5 * b @ a)[:3])
    assert effective_rank(torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(3.0)

    model = load_model(str(tiny_llama), resolve_device_policy({"device": "cpu", "bf16_autocast": False}))
    peft_model = attach_lora(model, 2, 4.0, ["q_proj", "down_proj"])
    assert update_size(peft_model)["update_rel_norm"] == 0.0  # B starts at zero: nothing moved yet
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    size = update_size(peft_model)
    before = {n: p.detach().clone() for n, p in load_model(str(tiny_llama), resolve_device_policy(
        {"device": "cpu", "bf16_autocast": False})).named_parameters()}
    merged = {n: p.detach() for n, p in peft_model.merge_and_unload().named_parameters()}
    for kind in ("q_proj", "down_proj"):
        names = [n for n in merged if n.endswith(f"{kind}.weight")]
        delta = sum(float((merged[n] - before[n]).double().pow(2).sum()) for n in names)
        weight = sum(float(before[n].double().pow(2).sum()) for n in names)
        assert size["update_by_module"][kind]["rel_norm"] == pytest.approx((delta / weight) ** 0.5, rel=1e-4)
        assert 1.0 <= size["update_by_module"][kind]["eff_rank"] <= 2.0
    assert set(size["update_by_module"]) == {"q_proj", "down_proj"}
