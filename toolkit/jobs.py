"""The jobs of a sweep as records: each carries its settings, its key (what
decides its result) and the rows an earlier run with that key left."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from toolkit.grid import GridPoint
from toolkit.names import Datasets, LossType
from toolkit.settings import EvalFiles, FinetuneSettings, TrainSettings, UnlearnSettings


@dataclass(frozen=True)
class JobReport:
    """What a finished job tells the driver (for progress and the summary)."""

    key: str
    summary: str
    value: float = float("nan")
    flagged: bool = False  # an unlearning run the stop rule flagged (not matched)
    row: dict | None = None  # the job's result row, written by the driver
    node: str = ""  # the Ray node it ran on


@dataclass(frozen=True)
class Run:
    """One unlearning run; its probes (RTT, adapter RTT, quantization) follow it."""

    index: int
    point: GridPoint
    base_model: str
    model_path: str
    rtt: tuple["RttJob", ...] = ()
    settings: UnlearnSettings | None = None
    key: str = ""
    results_dir: str = ""
    quant: tuple["QuantJob", ...] = ()
    replaces: tuple[str, ...] = ()  # rows of an earlier run with this key (a rerun replaces them)
    probes: tuple = ()  # the jobs of registered probes (toolkit.probes) on its model
    stage = "unlearn"

    @property
    def label(self) -> str:
        return f"{self.point.label} unlearn"

    @property
    def model_needed(self) -> bool:
        return bool(self.settings and self.settings.save.path)


@dataclass(frozen=True)
class RttJob:
    """One RTT run: fine-tune `base_model` on every val file but `skip_split`,
    score the held-out one. `probe` says which attacker: `rtt` (all weights,
    the paper's) or `lora_rtt` (a LoRA adapter only)."""

    index: int
    base_model: str
    dataset: Datasets
    condition: str  # "unlearned", "baseline" (the pre-unlearning model), "never_taught", "given"
    loss_type: LossType
    lr: float
    epochs: int
    skip_split: int
    train_files: tuple[str, ...]
    val_file: str
    unlearn_type: str = ""
    lora_rank: int = 0
    key: str = ""
    settings: FinetuneSettings | None = None
    seed: int = 0
    probe: str = "rtt"
    upstream: str = ""  # the key of the run whose model this starts from
    results_dir: str = ""
    replaces: tuple[str, ...] = ()
    stage = "rtt"

    @property
    def label(self) -> str:
        return self.settings.train.label if self.settings else f"{self.probe} v{self.skip_split}"


@dataclass(frozen=True)
class QuantJob:
    """The quantization probe (or, with `bits` None and no results folder, a
    plain evaluation: the pre-flight check): score a model's forget and
    retain files after rounding its linear weights to `bits` bits."""

    index: int
    model_path: str
    dataset: Datasets
    condition: str  # "unlearned" or "reference" (the pre-unlearning model)
    bits: int | None
    evals: EvalFiles
    train: TrainSettings
    blocksize: int = 64
    key: str = ""
    upstream: str = ""
    point: GridPoint | None = None
    results_dir: str = ""
    replaces: tuple[str, ...] = ()
    stage = "quant"

    @property
    def label(self) -> str:
        return self.train.label


@dataclass(frozen=True)
class TeachJob:
    """Fine-tune the base model on the facts before unlearning them."""

    base_model: str
    model_path: str
    dataset: Datasets
    settings: FinetuneSettings | None = None
    key: str = ""
    stage = "teach"
    label = "teach"


MARKER = "pipeline_run.json"


def write_marker(model_path: str, key: str) -> None:
    """Mark a saved model folder with the run key that produced it (resume
    trusts a folder only when its marker matches)."""
    (Path(model_path) / MARKER).write_text(json.dumps({"run_key": key}))


def marker_key(model_path: str) -> str | None:
    path = Path(model_path) / MARKER
    try:
        return json.loads(path.read_text()).get("run_key")
    except (OSError, ValueError):
        return None
