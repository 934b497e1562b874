"""CUT/RMU: layer choice, what trains, the steering objective, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cpu_policy, sweep_frames, unlearn_settings
from rmu import unlearn_pipeline
from toolkit.models import load_model
from toolkit.names import LossType
from toolkit.prompts import collate, encode, load_examples_from
from toolkit.registry import METHODS
from toolkit.training import make_optimizer
from unlearn_corpus import UnlearnResult, unlearn

FORGET = [f"random_bd/corpus_split_{i}" for i in range(2)]
RETAIN = ["random_bd/corpus_split_2"]


@pytest.fixture
def facts(small_facts) -> Path:
    return small_facts


@pytest.mark.parametrize("layers, expected", [(32, (7, (5, 6, 7))), (30, (7, (5, 6, 7))), (3, (1, (0, 1))), (2, (0, (0,)))])
def test_default_layers_scale_with_depth(layers, expected):
    chosen = unlearn_pipeline.choose_layers(layers)
    assert (chosen.layer_id, chosen.layer_ids) == expected


def test_bad_layers_are_refused():
    with pytest.raises(ValueError, match="layer_id=5 is not allowed; the model has layers 0..2"):
        unlearn_pipeline.choose_layers(3, layer_id=5)
    with pytest.raises(ValueError, match="updated layers must be in 0..1"):
        unlearn_pipeline.choose_layers(3, layer_id=1, layer_ids=[2])


def _batch(tokenizer, root, names):
    encoded = [encode(tokenizer, p, 64) for p in load_examples_from(str(root), names, LossType.CORPUS)]
    return collate(encoded, tokenizer.pad_token_id)


def test_objective_trains_only_chosen_weights_and_steers_toward_target(tiny_llama, byte_level_tokenizer, facts):
    policy = cpu_policy()
    model, frozen = load_model(str(tiny_llama), policy), load_model(str(tiny_llama), policy).requires_grad_(False)
    layers = unlearn_pipeline.choose_layers(model.config.num_hidden_layers)
    trained = unlearn_pipeline.select_trainable(model, layers.layer_ids, ["mlp.down_proj.weight"])
    assert trained == [f"model.layers.{i}.mlp.down_proj.weight" for i in layers.layer_ids]
    target = unlearn_pipeline.steering_vector(model.config.hidden_size, 20.0, seed=0)
    assert target.norm().item() == pytest.approx(20.0, rel=1e-5)
    objective = unlearn_pipeline.RmuLoss(model, frozen, target, layers.layer_id, retain_coeff=1.0)
    forget, retain = _batch(byte_level_tokenizer, facts, FORGET), _batch(byte_level_tokenizer, facts, RETAIN)
    model_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen_before = {n: p.detach().clone() for n, p in frozen.named_parameters()}
    optimizer = make_optimizer("adamw", model, 1e-2, policy)
    def toward_target() -> float:
        h = unlearn_pipeline.layer_activations(model, forget, layers.layer_id)[forget["attention_mask"].bool()].mean(0)
        return torch.nn.functional.cosine_similarity(h, target, dim=0).item()

    with torch.no_grad():
        start, cos_start = objective.forget_loss(forget).item(), toward_target()
    for _ in range(30):
        loss, _ = objective(forget, retain)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end, cos_end = objective.forget_loss(forget).item(), toward_target()
    assert end < 0.8 * start
    assert cos_end > cos_start + 0.1  # forget activations turned toward c*u
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, model_before[n])}
    assert changed == set(trained)
    assert all(torch.equal(p, frozen_before[n]) for n, p in frozen.named_parameters())


def test_cut_returns_the_shared_record(tiny_llama, facts, tmp_path):
    settings = unlearn_settings(tiny_llama, facts, tmp_path / "cut", "CUT", forget=FORGET, retain=RETAIN,
                                val=["random_bd/split_0"], val_retain=["random_bd/split_2"], lr=1e-2, epochs=1,
                                retain_coeff=1.0, steering_coeff=10.0)
    result = unlearn(settings, METHODS["CUT"].objective(settings))
    assert isinstance(result, UnlearnResult)
    assert set(result.forget_accs["random_bd/split_0"]) == {0, 1}
    assert result.trainable_params == 2 * 128 * 64  # down_proj of layers 0 and 1
    from safetensors.torch import load_file

    base, after = load_file(Path(tiny_llama) / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert {k for k in base if not torch.equal(base[k], after[k])} == {
        "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}


def test_cut_end_to_end_through_pipeline(methods_sweep):
    rows = sweep_frames(methods_sweep)["unlearning"]
    rows = rows[rows.unlearn_type == "CUT"]
    assert list(rows.unlearn_type) == ["CUT"] and list(rows.steering_coeff) == [5.0] and list(rows.lora_rank) == [0]
    assert json.loads(rows.forget_accs.iloc[0])
    ft = sweep_frames(methods_sweep)["ft"]
    ft = ft[ft.upstream_key == rows.run_key.iloc[0]]
    assert list(ft.unlearn_type) == ["CUT"] and list(ft.condition) == ["unlearned"]
