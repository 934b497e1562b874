"""Checks against the model before its weights load: the model id, its
tokenizer's answer letters, and its architecture (built on the meta device)
against every run of the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from toolkit.architecture import lora_targets
from toolkit.checkpoints import EMBEDDED_MODELS, adapter_base, model_checkpoint_path
from toolkit.jobs import Run
from toolkit.models import check_safetensors_file, linear_module_names, load_tokenizer, model_config, model_skeleton
from toolkit.planner import Plan
from toolkit.prompts import answer_letter_token_ids
from toolkit.registry import METHODS
from toolkit.settings import ConfigError, first_line
from toolkit.sweep_settings import SweepSettings


def check_before_loading(sweep: SweepSettings, plan: Plan) -> None:
    """What can be checked without loading weights: the model id, its
    tokenizer's answer letters, and the architecture against every run's
    settings (built on the meta device)."""
    model_id = sweep.model_id
    if model_id not in EMBEDDED_MODELS and not is_model_folder(model_id) and not in_hub_cache(model_id):
        raise ConfigError(f"model_id: {model_id!r} is not allowed; use an embedded alias "
                          f"({', '.join(EMBEDDED_MODELS)}), a folder with config.json, or a Hugging Face hub id "
                          "already in the local cache")
    for weights in sorted(Path(model_id).glob("*.safetensors")) if is_model_folder(model_id) else ():
        try:
            check_safetensors_file(weights)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model_id: {model_id!r} is not allowed; its weights file {weights.name} is damaged "
                              f"({err})") from None
    try:
        config = model_config(model_id, sweep.models_dir)
        skeleton = model_skeleton(config)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad model_id
        raise ConfigError(f"model_id: {model_id!r} cannot be used: {type(err).__name__}: "
                          f"{first_line(err)}; the pipeline needs a causal language model") from None
    if model_id not in EMBEDDED_MODELS:
        try:
            answer_letter_token_ids(load_tokenizer(model_checkpoint_path(model_id, sweep.models_dir)))
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"model_id: {model_id!r}: its tokenizer cannot score answers ({first_line(err)})") from None
    checked: set[str] = set()
    for run in plan.runs:
        if run.point.unlearn_type not in checked:
            checked.add(run.point.unlearn_type)
            check_run_against_model(run, skeleton, config)
    lora_rtt = [job.settings.lora for run in plan.runs for job in run.rtt if job.settings.lora]
    if lora_rtt:
        check_lora_targets(skeleton, lora_rtt[0].lora_target_modules, "ft.lora_rtt.lora_target_modules", config)


def check_run_against_model(run: Run, skeleton, config) -> None:
    settings, name = run.settings, run.point.unlearn_type
    layers = getattr(config, "num_hidden_layers", None)
    if settings.lora is not None:
        check_lora_targets(skeleton, settings.lora.lora_target_modules, "unlearn.lora_target_modules", config)
    if settings.freeze_layers and (layers is None or max(end for _, end in settings.freeze_layers) > layers):
        raise ConfigError(f"unlearn.freeze_layers: {[list(r) for r in settings.freeze_layers]!r} is not allowed; "
                          f"the model has {layers} decoder layers")
    check = getattr(METHODS[name].settings, "check_model", None)
    if check is not None:
        try:
            check(settings.method, skeleton)
        except ValueError as err:
            raise ConfigError(f"unlearn.types_config.{name}: {err}") from None


def check_lora_targets(skeleton, targets: Sequence[str] | str, key: str, config) -> None:
    names = linear_module_names(skeleton)
    try:
        targets = lora_targets(skeleton, targets)
    except ValueError as err:  # auto, on a model whose decoder layers cannot be found
        raise ConfigError(f"{key}: auto is not allowed for this model ({err}); name the modules: {names}") from None
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"{key}: {missing!r} is not allowed; this {config.model_type} model's modules that LoRA "
                          f"can target (linear and Conv1D layers) are {names}")


def is_model_folder(path: str) -> bool:
    return Path(path, "config.json").is_file() or adapter_base(path) is not None if Path(path).is_dir() else False


def in_hub_cache(model_id: str) -> bool:
    """A hub id whose config is already downloaded (GPU clusters keep a cache; nothing is fetched here)."""
    if model_id.count("/") != 1 or Path(model_id).exists():
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unusable id is simply not in the cache
        return False
