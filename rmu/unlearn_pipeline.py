"""RMU: steer a middle layer's activations on forget text toward a fixed
random direction, while a frozen copy anchors them on retain text.

forget loss = mean over forget tokens of ||h_l(x) - c u||^2
retain loss = mean over retain tokens of ||h_l(x) - h_l^frozen(x)||^2
total       = forget loss + retain_coeff * retain loss

Only a few MLP weights at or below layer l train. Data, evaluation, loading
and saving come from the shared toolkit in unlearn_corpus.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

import unlearn_corpus as uc
from pipeline import DataFormat, LossType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RmuLayers:
    layer_id: int  # whose activations are steered
    layer_ids: tuple[int, ...]  # whose parameters train


def choose_layers(num_layers: int, layer_id: int | None = None, layer_ids: Sequence[int] | None = None) -> RmuLayers:
    """Defaults scale with depth: the WMDP code steered layer 7 of 32 and
    updated layers 5, 6, 7."""
    if layer_id is None:
        layer_id = min(num_layers - 1, round(num_layers * 7 / 32))
    if not 0 <= layer_id < num_layers:
        raise ValueError(f"rmu layer_id={layer_id} is not allowed; the model has layers 0..{num_layers - 1}")
    chosen = tuple(layer_ids) if layer_ids is not None else tuple(sorted({max(0, layer_id - k) for k in (2, 1, 0)}))
    bad = [i for i in chosen if not 0 <= i <= layer_id]
    if bad:
        raise ValueError(f"rmu layer_ids={list(chosen)} is not allowed; updated layers must be in 0..{layer_id}")
    return RmuLayers(layer_id, chosen)


def select_trainable(model, layer_ids: Sequence[int], param_names: Sequence[str]) -> list[str]:
    """Freeze everything but `param_names` (e.g. mlp.down_proj.weight) of the given layers."""
    wanted = {f"layers.{i}.{p}" for i in layer_ids for p in param_names}
    chosen = []
    for name, param in model.named_parameters():
        keep = any(name.endswith(w) for w in wanted)
        param.requires_grad_(keep)
        if keep:
            chosen.append(name)
    if len(chosen) != len(wanted):
        raise ValueError(f"rmu param_names {list(param_names)} did not match every layer in {list(layer_ids)}; "
                         f"matched {chosen}")
    return chosen


class _Stop(Exception):
    """Raised by the hook: nothing above the steered layer is needed."""


def layer_activations(model, batch: Mapping[str, torch.Tensor], layer_id: int) -> torch.Tensor:
    """Output of decoder layer `layer_id`, [batch, seq, hidden]; the forward
    pass stops there, which saves most of the compute on a deep model."""
    layer = model.get_decoder().layers[layer_id]
    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


def masked_sq_distance(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked tokens of the squared L2 distance."""
    per_token = (h.float() - target.float()).pow(2).sum(-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)


@dataclass
class RmuObjective:
    """The RMU loss for one forget batch and one retain batch."""

    model: torch.nn.Module
    frozen: torch.nn.Module
    target: torch.Tensor  # c * u
    layer_id: int
    retain_coeff: float

    def forget_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h = layer_activations(self.model, batch, self.layer_id)
        return masked_sq_distance(h, self.target.expand_as(h), batch["attention_mask"])

    def retain_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h = layer_activations(self.model, batch, self.layer_id)
        with torch.no_grad():
            anchor = layer_activations(self.frozen, batch, self.layer_id)
        return masked_sq_distance(h, anchor, batch["attention_mask"])

    def __call__(self, forget_batch, retain_batch=None) -> tuple[torch.Tensor, dict]:
        forget = self.forget_loss(forget_batch)
        loss, metrics = forget, {"forget_loss": forget.item()}
        if retain_batch is not None and self.retain_coeff:
            retain = self.retain_loss(retain_batch)
            loss = loss + self.retain_coeff * retain
            metrics["retain_loss"] = retain.item()
        return loss, metrics


def steering_vector(hidden_size: int, coeff: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=generator)
    return coeff * u / u.norm()


def main(
    train_files: Sequence[str] = (),
    wrong_unlearn_files: Sequence[str] = (),
    fixed_wrong_unlearn_files: Sequence[str] = (),
    val_files: Sequence[str] = (),
    dev_set: str = "",
    retain_files: Sequence[str] = (),
    val_retain_files: Sequence[str] = (),
    retain_dev_file: str = "",
    base_model: str = "",
    lr: float = 5e-5,
    name: str = "rmu",
    k_shot: int = 0,
    epochs: int = 3,
    batch_size: int = 4,
    val_batch_size: int = 8,
    retain_coeff: float = 100.0,
    warmup_steps: int = 0,
    data_seed: int = 0,
    eval_every: int = 1,
    save_name: str | None = None,
    project_name: str = "unlearn",
    freeze_layers: Sequence[Sequence[int]] = (),
    data_format: DataFormat = DataFormat.CORPUS,
    loss_type: LossType = LossType.CORPUS,
    retain_loss_type: LossType | None = None,
    max_samples: int | None = None,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_target_modules: Sequence[str] | None = None,
    data_root: str = "data",
    device: Mapping | None = None,
    optimizer: str = "adamw",
    max_length: int = 256,
    wandb_mode: str = "disabled",
    steering_coeff: float = 20.0,
    layer_id: int | None = None,
    layer_ids: Sequence[int] | None = None,
    param_names: Sequence[str] = ("mlp.down_proj.weight",),
    steering_seed: int = 0,
) -> uc.UnlearnResult:
    """RMU with the keyword interface of `unlearn_corpus.main` plus the
    steering coefficient and layer choices. RMU trains chosen MLP weights, so
    LoRA and freeze_layers settings do not apply and must be left unset."""
    if lora_rank:
        raise ValueError(f"lora_rank={lora_rank} is not allowed for CUT/RMU; it trains chosen MLP weights")
    rng = random.Random(data_seed)
    torch.manual_seed(data_seed)
    policy = uc.resolve_device_policy(device)
    tokenizer = uc.load_tokenizer(base_model)
    model = uc.load_model(base_model, policy)
    frozen = uc.load_model(base_model, policy).eval().requires_grad_(False)
    layers = choose_layers(model.config.num_hidden_layers, layer_id, layer_ids)
    trained = select_trainable(model, layers.layer_ids, param_names)
    log.info("RMU: steering layer %d, training %s", layers.layer_id, trained)
    target = steering_vector(model.config.hidden_size, steering_coeff, steering_seed).to(policy.device)

    sizes = {"max_samples": max_samples, "rng": rng, "max_length": max_length}
    forget = uc.encode_files(tokenizer, data_root, train_files, loss_type, **sizes)
    retain = uc.encode_files(tokenizer, data_root, retain_files, retain_loss_type or loss_type, **sizes)
    run = uc.start_wandb(wandb_mode, project_name, name, {"lr": lr, "steering_coeff": steering_coeff,
                                                          "retain_coeff": retain_coeff, "layer_id": layers.layer_id})
    evaluator = uc.ForgetRetainEval.load(data_root, val_files, val_retain_files, dev_set=dev_set,
                                         retain_dev_file=retain_dev_file, k_shot=k_shot, batch_size=val_batch_size,
                                         run=run, name=name)

    objective = RmuObjective(model, frozen, target, layers.layer_id, retain_coeff)

    def step_loss(pair):
        forget_batch, retain_batch = pair
        return objective(uc.collate(forget_batch, tokenizer.pad_token_id, policy.device),
                         uc.collate(retain_batch, tokenizer.pad_token_id, policy.device) if retain_batch else None)

    uc.fit(model, uc.make_optimizer(optimizer, model, lr, policy), epochs=epochs,
           steps_per_epoch=lambda _: uc.unlearn_steps(forget, retain, batch_size, rng), step_loss=step_loss,
           warmup_steps=warmup_steps, evaluate=lambda epoch: evaluator(model, tokenizer, epoch),
           eval_every=eval_every, desc=name, on_step=run.log)
    run.finish()
    if save_name:
        uc.save_checkpoint(model, tokenizer, save_name)
    trainable, _ = uc.count_parameters(model)
    return uc.evaluator_result(evaluator, save_name, trainable)
