"""Data files: JSONL read and checked (file and line named on a bad row),
multiple-choice rows and corpus texts, folders written whole, fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from toolkit.names import LETTERS


class DataValidationError(ValueError):
    """A dataset file is missing or malformed (raised before any model loads)."""


@dataclass(frozen=True)
class McqRow:
    question: str
    choices: tuple[str, ...]
    answer: int


def data_file(data_root: str | os.PathLike, name: str) -> Path:
    """Dataset names in configs are paths under the data root without `.jsonl`."""
    return Path(data_root) / f"{name}.jsonl"


def missing_files(data_root: str | os.PathLike, names: Iterable[str]) -> list[str]:
    return [str(data_file(data_root, n)) for n in names if not data_file(data_root, n).is_file()]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = raw[: err.start].count(b"\n") + 1
        raise DataValidationError(f"{path}:{line_no}: not valid UTF-8 (byte {err.object[err.start]:#04x}); "
                                  "save the file as UTF-8") from None
    rows = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataValidationError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _mcq_row(raw: dict, where: str) -> McqRow:
    question, choices, answer = raw.get("question"), raw.get("choices"), raw.get("answer")
    if not isinstance(question, str):
        raise DataValidationError(f"{where}: 'question' must be a string, got {question!r}")
    if not isinstance(choices, list) or len(choices) != len(LETTERS):
        raise DataValidationError(f"{where}: 'choices' must be a list of 4 items, got {choices!r}")
    if not isinstance(answer, int) or not 0 <= answer < len(LETTERS):
        raise DataValidationError(f"{where}: 'answer' must be an integer 0..3, got {answer!r}")
    return McqRow(question, tuple(str(c) for c in choices), answer)


def _mcq_rows(rows: list[dict], path) -> list[McqRow]:
    return [_mcq_row(raw, f"{path}:{i}") for i, raw in enumerate(rows, 1)]


def _corpus_texts(rows: list[dict], path) -> list[str]:
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r.get("text"), str)), None)
    if bad is not None:
        raise DataValidationError(f"{path}:{bad}: corpus rows need a string 'text' field")
    return [r["text"] for r in rows]


def _is_corpus(rows: list[dict]) -> bool:
    return bool(rows) and "text" in rows[0] and "question" not in rows[0]


def load_mcq(path: str | os.PathLike) -> list[McqRow]:
    return _mcq_rows(read_jsonl(path), path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield a temporary sibling folder; it replaces `path` only if the block
    finishes, so a crash never leaves half a dataset or half a model."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (run keys, cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


def load_training_rows(path: str | os.PathLike) -> list[str] | list[McqRow]:
    """A training file holds corpus texts or MCQ rows; its first row tells which."""
    rows = read_jsonl(path)
    return _corpus_texts(rows, path) if _is_corpus(rows) else _mcq_rows(rows, path)


def check_data_files(data_root: str | os.PathLike, question_files: Iterable[str], training_files: Iterable[str],
                     k_shot: int = 0, dev_files: Iterable[str] = ()) -> None:
    """Parse every file a run will read, so a malformed row stops the sweep
    with its file and line before any model loads (not later, in a worker);
    a file with no rows (a split with no questions, a corpus with no text)
    and a dev file with fewer rows than `k_shot` are refused too."""
    dev = set(dev_files)
    for name, load in [*((n, load_mcq) for n in question_files), *((n, load_training_rows) for n in training_files)]:
        path = data_file(data_root, name)
        rows = load(path)
        if not rows:
            raise DataValidationError(f"{path}: the file has no rows; every split needs at least one "
                                      f"{'question' if load is load_mcq else 'row'}")
        if name in dev and len(rows) < k_shot:
            raise DataValidationError(f"{path}: {len(rows)} row(s), fewer than k_shot={k_shot} few-shot examples; "
                                      f"add rows or lower k_shot")
