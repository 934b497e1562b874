"""Models and adapters: loading plain checkpoints and adapter folders,
saving whole, the embedded model (materialized once from its GGUF file),
LoRA adapters attached and merged."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from toolkit.architecture import lora_targets
from toolkit.checkpoints import (  # noqa: F401 - re-exported: the model's paths and digests, torch-free
    ADAPTER_CONFIG,
    EMBEDDED_MODELS,
    EmbeddedModel,
    adapter_base,
    model_checkpoint_path,
    package_dir,
    weights_digest,
)
from toolkit.data import atomic_folder
from toolkit.device import DevicePolicy
from toolkit.settings import LoraSettings
from toolkit.training import count_parameters

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_base(path) or path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, policy: DevicePolicy):
    """A plain checkpoint, or an adapter folder: its base model with the
    adapter merged in memory (adapter-format runs save only the adapter)."""
    from transformers import AutoModelForCausalLM

    base = adapter_base(path)
    if base is not None:
        from peft import PeftModel

        merged = PeftModel.from_pretrained(load_model(base, policy), path).merge_and_unload()
        return merged.requires_grad_(True)  # PEFT froze the base; a loaded checkpoint trains like any other
    model = AutoModelForCausalLM.from_pretrained(path, dtype=policy.dtype, attn_implementation=policy.attn_implementation)
    return model.to(policy.device)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_checkpoint(model, tokenizer, path: str | os.PathLike, save_format: str = "merged",
                    base_path: str | None = None) -> Path:
    """Save a run's model, written to a temporary folder and renamed, so a
    crash never leaves half a model. A LoRA model is saved merged (a plain
    Hugging Face checkpoint, no adapter files) or, with `adapter`, as its
    adapter folder alone, pointing at `base_path`."""
    with atomic_folder(path) as tmp:
        if is_peft(model) and save_format == "adapter":
            model.peft_config["default"].base_model_name_or_path = base_path
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            plain = merge_lora(model, base_path) if is_peft(model) else model
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return Path(path)


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise ValueError when a safetensors file is damaged: opening it reads
    only the header, and safetensors checks that the header parses and that
    the tensors cover the file. A truncated download fails here, not in a
    worker mid-sweep."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as err:
        raise ValueError(str(err)) from None


def checkpoint_tensor_reader(path: str | os.PathLike) -> Callable[[str], torch.Tensor]:
    """Read single tensors of a safetensors checkpoint (one file or shards)."""
    from safetensors import safe_open

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else {}

    def read(name: str) -> torch.Tensor:
        with safe_open(folder / where.get(name, "model.safetensors"), framework="pt") as handle:
            return handle.get_tensor(name)

    return read


def materialize_gguf(gguf_dir: str | os.PathLike, gguf_file: str, target: str | os.PathLike) -> Path:
    """De-quantize a GGUF model into a plain safetensors checkpoint. The model
    transformers builds from GGUF cannot be saved as is, so its weights are
    copied into a fresh model of the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    if fresh.generation_config is not None:
        fresh.generation_config = loaded.generation_config
    return save_checkpoint(fresh, tokenizer, target)


def resolve_model_path(model_id: str, models_dir: str | os.PathLike = "models") -> str:
    """`model_checkpoint_path`, materializing an embedded model on first use."""
    path = model_checkpoint_path(model_id, models_dir)
    embedded = EMBEDDED_MODELS.get(model_id)
    if embedded and not (Path(path) / "config.json").is_file():
        log.info("materializing %s from its GGUF file into %s (once)", model_id, path)
        materialize_gguf(package_dir(embedded.package), embedded.gguf_file, path)
    return path


def model_config(model_id: str, models_dir: str | os.PathLike = "models"):
    """A model's config without its weights: from its folder (an adapter
    folder's base), or for an embedded model not yet materialized from its
    GGUF file's metadata."""
    from transformers import AutoConfig

    embedded = EMBEDDED_MODELS.get(model_id)
    path = model_checkpoint_path(model_id, models_dir)
    if embedded and not (Path(path) / "config.json").is_file():
        return AutoConfig.from_pretrained(package_dir(embedded.package), gguf_file=embedded.gguf_file)
    return AutoConfig.from_pretrained(adapter_base(path) or path)


def model_skeleton(config):
    """The model built on the meta device: its modules and shapes, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_module_names(model) -> list[str]:
    """The distinct last names of the modules PEFT's LoRA can target: linear
    layers, and the Conv1D layers GPT-2 style models use for attention and MLP."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))})


def attach_lora(model, rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None,
                frozen_dtype: torch.dtype | None = None, use_rslora: bool = False):
    """Wrap `model` with LoRA adapters (fp32); only adapter weights train.

    With `frozen_dtype` (bf16 under CPU autocast) the frozen weights of the
    wrapped layers are stored in that dtype: autocast would otherwise cast
    them on every forward (it caches casts only of weights that train), and
    they take half the memory. Merging restores their exact values first."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, target_modules or DEFAULT_LORA_TARGETS)
    names = linear_module_names(model)
    if not set(targets) & set(names):
        raise ValueError(f"LoRA targets {targets} match no module of this model; its modules that LoRA can target "
                         f"(linear and Conv1D layers) are {names}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM", use_rslora=use_rslora)
    peft_model = get_peft_model(model, config)
    if frozen_dtype is not None:
        for layer in lora_layers(peft_model):
            layer.base_layer.weight.data = layer.base_layer.weight.data.to(frozen_dtype)
    trainable, total = count_parameters(peft_model)
    log.info("LoRA rank %d: %d trainable of %d parameters (%.3f%%)", rank, trainable, total, 100 * trainable / total)
    return peft_model


def with_lora(model, settings: LoraSettings, frozen_dtype: torch.dtype | None = None):
    """`model` wrapped with the adapters `settings` describe (see attach_lora)."""
    return attach_lora(model, settings.lora_rank, settings.lora_alpha, settings.lora_target_modules, frozen_dtype,
                       settings.use_rslora)


def lora_layers(peft_model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


def merge_lora(peft_model, base_path: str | None):
    """The merged plain model. Frozen weights stored in a lower precision for
    speed get their checkpoint values back first, so merged = base + B A exactly."""
    layers = set(lora_layers(peft_model))
    lowered = [(name, m) for name, m in peft_model.named_modules()
               if m in layers and m.base_layer.weight.dtype != m.lora_A["default"].weight.dtype]
    if lowered:
        read = checkpoint_tensor_reader(base_path)
        for name, layer in lowered:
            exact = read(name.removeprefix("base_model.model.") + ".weight")
            layer.base_layer.weight.data = exact.to(layer.lora_A["default"].weight)
    return peft_model.merge_and_unload()
