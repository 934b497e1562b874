"""Checks while planning, before any model loads: what each method can
use, writable folders. The checks against the model's architecture are in
toolkit.model_checks (they read its config; this module needs no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from toolkit.datasets import DATASETS
from toolkit.names import DataFormat, Datasets
from toolkit.registry import METHODS, method_objective
from toolkit.settings import LAYER_RANGES, ConfigError
from toolkit.sweep_settings import SweepSettings


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


def nearest_existing(path: str | os.PathLike) -> Path:
    """The path itself if it exists, else its nearest ancestor that does."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def check_writable(path: str, key: str) -> None:
    """A folder the sweep writes must be writable: try its nearest existing
    ancestor with a file (created and removed), so nothing is left behind."""
    existing = nearest_existing(path)
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
