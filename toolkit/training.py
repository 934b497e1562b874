"""What a training step needs besides the model: optimizers (Lion, AdamW),
the warm-up schedule, frozen parameters, seeds."""

from __future__ import annotations

import functools
import logging
import random
from typing import Callable, Sequence

import torch

from toolkit.architecture import parameter_layers
from toolkit.device import DevicePolicy
from toolkit.settings import LION_UPDATES, OPTIMIZER_NAMES

log = logging.getLogger(__name__)


def lean_lion_update(p, grad, exp_avg, lr, wd, beta1, beta2):
    """lion-pytorch's update with the same arithmetic, so the same bits, in
    fewer passes over memory (no weight decay pass when there is none, no
    copy of the momentum): on a CPU the update of every weight is memory-bound,
    and the library's function was a third of an RTT step."""
    if wd:
        p.mul_(1.0 - lr * wd)
    update = torch.mul(exp_avg, beta1).add_(grad, alpha=1.0 - beta1).sign_()
    p.add_(update, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)


def _one_pass_update(p, grad, exp_avg, lr, wd, beta1, beta2):
    update = (exp_avg * beta1 + grad * (1.0 - beta1)).sign()
    p.copy_(p * (1.0 - lr * wd) - lr * update)
    exp_avg.copy_(exp_avg * beta2 + grad * (1.0 - beta2))


@functools.lru_cache(maxsize=None)
def _compiled_one_pass():
    # dynamic shapes: one kernel for every weight's shape; the hyper-parameters as 0-d tensors, so a changing
    # lr (warm-up) does not recompile
    return torch.compile(_one_pass_update, dynamic=True, fullgraph=True)


def compiled_lion_update(p, grad, exp_avg, lr, wd, beta1, beta2):
    """Lion's update as one compiled pass (read weight, gradient, momentum;
    write weight, momentum): equal to the library's to rounding (the compiler
    may fuse a multiply-add). Falls back to the lean update, once and said,
    where this machine cannot compile (no C++ compiler, say)."""
    global _COMPILE_FAILED
    if not _COMPILE_FAILED and p.is_contiguous() and grad.is_contiguous() and exp_avg.is_contiguous():
        try:
            scalars = [torch.tensor(float(v), dtype=p.dtype, device=p.device) for v in (lr, wd, beta1, beta2)]
            # flat views of plain tensors: a parameter's shape is static to the compiler (every LoRA and layer
            # shape would compile anew, up to its recompile limit); one 1-d kernel serves them all
            flat = [t.view(-1) for t in (p.data, grad, exp_avg)]
            return _compiled_one_pass()(*flat, *scalars)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the lean update is the same arithmetic
            _COMPILE_FAILED = True
            log.warning("train.lion_update=compiled could not compile here (%s); using the lean update",
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
    return lean_lion_update(p, grad, exp_avg, lr, wd, beta1, beta2)


_COMPILE_FAILED = False


def _library_update():
    from lion_pytorch.lion_pytorch import update_fn

    return update_fn


LION_UPDATE_FUNCTIONS: dict[str, Callable[[], Callable]] = {
    "library": _library_update,
    "lean": lambda: lean_lion_update,
    "compiled": lambda: compiled_lion_update,
}


def lion_update_name(setting: str, policy: DevicePolicy) -> str:
    """`train.lion_update` resolved: auto is Triton where the device policy picks it, else the lean update."""
    if setting == "auto":
        return "triton" if policy.triton_lion else "lean"
    return setting


def _lion(params, lr: float, policy: DevicePolicy, update: str = "auto"):
    from lion_pytorch import Lion

    name = lion_update_name(update, policy)
    optimizer = Lion(params, lr=lr, use_triton=name == "triton")
    if name != "triton":
        # the library's own hook for its update function (it sets Triton's there)
        optimizer.update_fn = LION_UPDATE_FUNCTIONS[name]()
    return optimizer


OPTIMIZERS: dict[str, Callable] = {
    "lion": _lion,
    # The fused kernel (CPU and CUDA) updates 2-3x faster than the default per-tensor loop.
    "adamw": lambda params, lr, policy, update="auto": torch.optim.AdamW(params, lr=lr, fused=True),
}


assert set(OPTIMIZERS) == set(OPTIMIZER_NAMES)
assert set(LION_UPDATE_FUNCTIONS) | {"auto"} == set(LION_UPDATES)


def make_optimizer(name: str, model, lr: float, policy: DevicePolicy, lion_update: str = "auto"):
    """The optimizer sees trainable parameters only (for LoRA: the adapters)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not allowed; use one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad], lr, policy, lion_update)


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
