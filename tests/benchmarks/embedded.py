"""What the knowledge benchmarks share: the project on the import path, their
model and folder options, and the embedded model loaded on the fp32 CPU path
(the path every CPU has, so their figures compare across machines)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from toolkit.device import DevicePolicy, resolve_device_policy  # noqa: E402
from toolkit.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--data-root", default=str(ROOT / "data"))


@dataclass(frozen=True)
class Loaded:
    path: str
    policy: DevicePolicy
    tokenizer: Any
    model: Any


def load_fp32(args: argparse.Namespace) -> Loaded:
    path = resolve_model_path(args.model, args.models_dir)
    policy = resolve_device_policy({"device": "cpu", "bf16_autocast": False})
    return Loaded(path, policy, load_tokenizer(path), load_model(path, policy))
