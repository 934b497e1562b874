"""How far an unlearning run moved the weights: the LoRA update dW = s B A
of every adapted module, per module type (q_proj, ..., down_proj), as its
Frobenius norm relative to the frozen weight's and its effective rank.
Relearning resistance has been linked to how far unlearning moves the
weights; these columns let the analysis ask that of rank at matched
forgetting."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch


@dataclass
class ModuleDelta:
    """One module's update: squared Frobenius norms of dW and W, and the singular values of dW."""

    kind: str
    delta_sq: float
    weight_sq: float
    singular_values: torch.Tensor


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli
    2007): 1 for a rank-one update, r for r equal directions."""
    s = singular_values[singular_values > 0].double()
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def low_rank_singular_values(b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values of scale * B @ A without forming it: with B = Qb Rb and
    A^T = Qa Ra, they are those of the r x r matrix scale * Rb Ra^T."""
    _, rb = torch.linalg.qr(b.double())
    _, ra = torch.linalg.qr(a.double().T)
    return torch.linalg.svdvals(scale * rb @ ra.T)


def lora_deltas(peft_model, adapter: str = "default") -> list[ModuleDelta]:
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        with torch.no_grad():
            b, a = module.lora_B[adapter].weight, module.lora_A[adapter].weight
            s = low_rank_singular_values(b, a, float(module.scaling[adapter]))
            weight = module.get_base_layer().weight
            out.append(ModuleDelta(name.rsplit(".", 1)[-1], float((s ** 2).sum()),
                                   float(weight.double().pow(2).sum()), s))
    return out


def starting_weights(model) -> dict[str, torch.Tensor]:
    """A copy of the matrices a full-parameter run trains (2-D weights inside
    the decoder layers, the ones LoRA would wrap), so its update can be
    measured as LoRA's is."""
    from toolkit.architecture import parameter_layers

    inside = parameter_layers(model)
    return {name: param.detach().clone() for name, param in model.named_parameters()
            if param.requires_grad and param.ndim == 2 and name in inside}


def full_deltas(model, start: dict[str, torch.Tensor]) -> list[ModuleDelta]:
    """dW = W - W0 of every matrix in `start`: its norm and singular values."""
    out = []
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, before in start.items():
            delta = (params[name].detach().double() - before.double())
            kind = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1]
            out.append(ModuleDelta(kind, float(delta.pow(2).sum()), float(before.double().pow(2).sum()),
                                   torch.linalg.svdvals(delta)))
    return out


def update_size(model, start: dict[str, torch.Tensor] | None = None) -> dict:
    """Row columns: the whole update's relative norm sqrt(sum |dW|^2 / sum |W|^2),
    the mean effective rank over modules, and both per module type; a LoRA
    model's from its factors, a full-parameter run's against `start`."""
    deltas = full_deltas(model, start) if start is not None else lora_deltas(model)
    if not deltas:
        return {}
    kinds: dict[str, list[ModuleDelta]] = defaultdict(list)
    for d in deltas:
        kinds[d.kind].append(d)

    def summary(group: list[ModuleDelta]) -> dict[str, float]:
        return {"rel_norm": math.sqrt(sum(d.delta_sq for d in group) / sum(d.weight_sq for d in group)),
                "eff_rank": sum(effective_rank(d.singular_values) for d in group) / len(group)}

    whole = summary(deltas)
    return {"update_rel_norm": whole["rel_norm"], "update_eff_rank": whole["eff_rank"],
            "update_by_module": {kind: summary(group) for kind, group in sorted(kinds.items())}}
