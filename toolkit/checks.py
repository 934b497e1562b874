"""Checks before any model loads: the model id and its architecture
against every run's settings, what each method can use, writable folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from toolkit.datasets import DATASETS
from toolkit.jobs import Run
from toolkit.models import (
    EMBEDDED_MODELS,
    adapter_base,
    check_safetensors_file,
    linear_module_names,
    load_tokenizer,
    model_checkpoint_path,
    model_config,
    model_skeleton,
)
from toolkit.names import DataFormat, Datasets
from toolkit.prompts import answer_letter_token_ids
from toolkit.registry import METHODS, method_objective
from toolkit.settings import LAYER_RANGES, ConfigError, first_line
from toolkit.sweep_settings import SweepSettings

if TYPE_CHECKING:  # the planner runs these checks
    from toolkit.planner import Plan


def check_methods(sweep: SweepSettings) -> None:
    """What a method cannot use is refused when it is set."""
    unlearn, names = sweep.config["unlearn"], sweep.methods
    no_mcq = sorted(n for n in names if not METHODS[n].mcq)
    if sweep.data_format == DataFormat.MCQ and no_mcq:
        raise ConfigError(f"unlearn.data_format: MCQ is not allowed with {', '.join(no_mcq)}; "
                          "they train on their wrong-answer corpora (use CORPUS)")
    LAYER_RANGES.check(unlearn["freeze_layers"], "unlearn.freeze_layers")
    for name in names:
        uses = method_objective(name).uses
        if unlearn["freeze_layers"] and "freeze_layers" not in uses:
            raise ConfigError(f"unlearn.freeze_layers: {unlearn['freeze_layers']!r} is not allowed with {name}; it does not "
                              "use frozen layers (leave it [] or drop the method from unlearn.types)")
    if not any(METHODS[n].lora for n in names) and unlearn["lora_alpha"] is not None:
        raise ConfigError(f"unlearn.lora_alpha: {unlearn['lora_alpha']!r} is set but no method in unlearn.types "
                          f"({', '.join(names)}) trains LoRA adapters; leave it null")


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


def check_lora_targets(skeleton, targets: Sequence[str], key: str, config) -> None:
    names = linear_module_names(skeleton)
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


def check_writable(path: str, key: str) -> None:
    """A folder the sweep writes must be writable: try its nearest existing
    ancestor with a file (created and removed), so nothing is left behind."""
    target = Path(path).absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path!r} is not allowed; {existing} is a file, not a folder")
    test_file = existing / f".write-test-{os.getpid()}"
    try:
        test_file.write_text("")
        test_file.unlink()
    except OSError as err:
        raise ConfigError(f"{key}: {path!r} cannot be written ({err.strerror} in {existing}); "
                          "use a writable folder") from None


def check_folders(sweep: SweepSettings, datasets: Iterable[Datasets]) -> None:
    check_writable(sweep.results_dir, "results_dir")
    check_writable(sweep.models_dir, "models_dir")
    generated = [DATASETS[d].generated_dir for d in datasets if DATASETS[d].generated_dir]
    if any(not Path(sweep.data_root, g).exists() for g in generated):
        check_writable(sweep.data_root, "data_root")
