"""The one seam for model families: where a model keeps its decoder layers
and which parameters belong to which layer, found from the model's own
structure (its config's layer count and its module tree) instead of Llama's
`model.layers.{i}` names, so a GPT-2, Gemma or Qwen checkpoint needs no code
change in RMU's steered layer or in frozen layer ranges."""

from __future__ import annotations

import torch


def _unwrapped(model):
    """The model under a PEFT wrapper (its layers are the same modules)."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of decoder layers: the module list as long as the config's layer count."""
    model = _unwrapped(model)
    count = getattr(model.config, "num_hidden_layers", None)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if not count or not stacks:
        raise ValueError(f"cannot find the decoder layers of this {model.config.model_type} model (no module list of "
                         f"num_hidden_layers={count} layers)")
    return stacks[0]


def parameter_layers(model) -> dict[str, int]:
    """Each parameter's name -> the index of the decoder layer that holds it
    (embeddings, final norm and head are in no layer, so not listed)."""
    owner = {id(p): i for i, layer in enumerate(decoder_layers(model)) for p in layer.parameters()}
    return {name: owner[id(p)] for name, p in model.named_parameters() if id(p) in owner}


def lora_targets(model, targets) -> list[str]:
    """The module names LoRA wraps: `auto` gives the last names of every
    linear layer (and GPT-2's Conv1D) inside the decoder layers, so the head
    and embeddings stay out; a list is taken as given."""
    if targets != "auto":
        return list(targets)
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in decoder_layers(model).named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D))})
