"""RMU: steer a middle layer's activations on forget text toward a fixed
random direction, while a frozen copy anchors them on retain text.

forget loss = mean over forget tokens of ||h_l(x) - c u||^2
retain loss = mean over retain tokens of ||h_l(x) - h_l^frozen(x)||^2
total       = forget loss + retain_coeff * retain loss

Only a few MLP weights at or below layer l train. Data, evaluation, loading,
saving and the training loop come from the shared toolkit (`toolkit/`);
this module holds RMU's own settings and its objective.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from toolkit.architecture import decoder_layers, parameter_layers
from toolkit.models import load_model
from toolkit.names import UnlearnType
from toolkit.registry import Axis, Method, register
from toolkit.settings import NON_NEGATIVE_INTS, POSITIVE_NUMBERS, SOME_NAMES, Allowed, UnlearnSettings, setting
from toolkit.stage import Stage
from unlearn_corpus import ForgetRetainData

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
    wanted = {(i, p) for i in layer_ids for p in param_names}
    layer_of = parameter_layers(model)  # by the model's structure, not Llama's `layers.{i}.` names
    chosen = []
    for name, param in model.named_parameters():
        keep = any(layer_of.get(name) == i and name.endswith(f".{p}") for i, p in wanted)
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
    layer = decoder_layers(model)[layer_id]
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


@dataclass(frozen=True)
class RmuSettings:
    """RMU's own settings: `unlearn.types_config.CUT.*` and the swept coefficient."""

    steering_coeff: float = setting(POSITIVE_NUMBERS)
    layer_id: int | None = setting(Allowed("null or an integer >= 0", lambda v: v is None or NON_NEGATIVE_INTS.test(v)))
    layer_ids: tuple[int, ...] | None = setting(Allowed(
        "null or a list of integers >= 0", lambda v: v is None or (isinstance(v, (list, tuple)) and v and all(
            NON_NEGATIVE_INTS.test(i) for i in v)), lambda v: None if v is None else tuple(v)))
    param_names: tuple[str, ...] = setting(SOME_NAMES)
    steering_seed: int = setting(NON_NEGATIVE_INTS)

    def check_model(self, skeleton) -> None:
        """Before any weights load: the layers exist and hold the parameters to train."""
        layers = choose_layers(skeleton.config.num_hidden_layers, self.layer_id, self.layer_ids)
        layer_of = parameter_layers(skeleton)
        for i in layers.layer_ids:
            for p in self.param_names:
                if not any(layer == i and n.endswith(f".{p}") for n, layer in layer_of.items()):
                    raise ValueError(f"param_names {list(self.param_names)!r}: layer {i} has no {p!r}")


def masked_sq_distance(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked tokens of the squared L2 distance."""
    per_token = (h.float() - target.float()).pow(2).sum(-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)


def steering_vector(hidden_size: int, coeff: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=generator)
    return coeff * u / u.norm()


@dataclass
class RmuLoss:
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


@dataclass
class RmuObjective:
    """The stage runner's view of RMU: it trains chosen MLP weights against a
    frozen copy of the model, so LoRA and frozen-layer settings do not apply."""

    settings: UnlearnSettings
    uses: frozenset[str] = frozenset()

    def prepare(self, model, stage: Stage):
        s, own = self.settings, self.settings.method
        frozen = load_model(s.train.model, stage.policy).eval().requires_grad_(False)
        layers = choose_layers(model.config.num_hidden_layers, own.layer_id, own.layer_ids)
        trained = select_trainable(model, layers.layer_ids, own.param_names)
        log.info("RMU: steering layer %d, training %s", layers.layer_id, trained)
        target = steering_vector(model.config.hidden_size, own.steering_coeff, own.steering_seed).to(stage.policy.device)
        self.stage, self.data = stage, ForgetRetainData.encode(s, stage)
        self.rmu = RmuLoss(model, frozen, target, layers.layer_id, s.retain_coeff)
        return model

    def epoch_steps(self, epoch: int):
        return self.data.epoch_steps(epoch)

    def loss(self, model, step):
        forget_batch, retain_batch = step
        return self.rmu(self.stage.batch(forget_batch), self.stage.batch(retain_batch) if retain_batch else None)


register(UnlearnType.CUT, Method(RmuObjective, axis=Axis("steering_coeff", "unlearn.cut_scs", POSITIVE_NUMBERS),
                                 settings=RmuSettings))
