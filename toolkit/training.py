"""What a training step needs besides the model: optimizers (Lion, AdamW),
the warm-up schedule, frozen parameters, seeds."""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch

from toolkit.architecture import parameter_layers
from toolkit.device import DevicePolicy
from toolkit.settings import OPTIMIZER_NAMES


def _lion(params, lr: float, policy: DevicePolicy):
    from lion_pytorch import Lion

    return Lion(params, lr=lr, use_triton=policy.triton_lion)


OPTIMIZERS: dict[str, Callable] = {
    "lion": _lion,
    # The fused kernel (CPU and CUDA) updates 2-3x faster than the default per-tensor loop.
    "adamw": lambda params, lr, policy: torch.optim.AdamW(params, lr=lr, fused=True),
}


assert set(OPTIMIZERS) == set(OPTIMIZER_NAMES)


def make_optimizer(name: str, model, lr: float, policy: DevicePolicy):
    """The optimizer sees trainable parameters only (for LoRA: the adapters)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not allowed; use one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad], lr, policy)


def warmup_then_constant(optimizer, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def freeze_layer_ranges(model, ranges: Sequence[Sequence[int]]) -> None:
    """Freeze decoder layers in each half-open [start, end) range."""
    frozen = {i for start, end in ranges for i in range(start, end)}
    layer_of = parameter_layers(model)
    for name, param in model.named_parameters():
        if layer_of.get(name) in frozen:
            param.requires_grad_(False)


def freeze_embeddings(model) -> None:
    """Freeze the input embeddings (tied to the LM head in small Llamas): a
    49k x d dense gradient and its optimizer update are a third of a CPU step."""
    model.get_input_embeddings().weight.requires_grad_(False)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def seed_everything(seed: int) -> random.Random:
    torch.manual_seed(seed)
    return random.Random(seed)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass. The
    non-reentrant form, and inputs that require grad: with frozen embeddings
    (LoRA, or RTT with train_embeddings=false) the reentrant form would pass
    no gradient through a checkpointed layer, and LoRA would train nothing."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
