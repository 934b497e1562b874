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
    return [row for _, row in numbered_rows(path)]


def numbered_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """The file's rows with their line numbers (blank lines skipped), each a
    JSON object; a line that is not one is refused naming the file and line."""
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
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataValidationError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataValidationError(f"{path}:{line_no}: a row must be a JSON object ({{...}}), got a "
                                      f"{JSON_TYPES.get(type(row), type(row).__name__)}")
        rows.append((line_no, row))
    return rows


JSON_TYPES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _is_choice(value) -> bool:
    """A choice is text or a whole number (YEARS), never a boolean, and never blank."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and bool(value.strip()))


def _mcq_row(raw: dict, where: str) -> McqRow:
    question, choices, answer = raw.get("question"), raw.get("choices"), raw.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise DataValidationError(f"{where}: 'question' must be a non-empty string, got {question!r}")
    if not isinstance(choices, list) or len(choices) != len(LETTERS):
        raise DataValidationError(f"{where}: 'choices' must be a list of 4 items, got {choices!r}")
    if bad := [c for c in choices if not _is_choice(c)]:
        raise DataValidationError(f"{where}: 'choices' must be non-empty strings or whole numbers, got {bad[0]!r} "
                                  f"in {choices!r}")
    # JSON true is 1 to Python: refused, as a boolean says nothing about which choice is right.
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(LETTERS):
        raise DataValidationError(f"{where}: 'answer' must be an integer 0..3, got {json.dumps(answer)}")
    return McqRow(question, tuple(str(c) for c in choices), answer)


def repeated_answer(row: McqRow) -> list[str]:
    """The letters that hold the right answer's text, when more than one does
    (a model that picks the twin is scored wrong); [] otherwise."""
    letters = [LETTERS[i] for i, c in enumerate(row.choices) if c.strip() == row.choices[row.answer].strip()]
    return letters if len(letters) > 1 else []


def _mcq_rows(rows: list[tuple[int, dict]], path) -> list[McqRow]:
    return [_mcq_row(raw, f"{path}:{line_no}") for line_no, raw in rows]


def _corpus_texts(rows: list[tuple[int, dict]], path) -> list[str]:
    for line_no, row in rows:
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataValidationError(f"{path}:{line_no}: corpus rows need a non-empty string 'text' field, got "
                                      f"{json.dumps(row.get('text'))}")
    return [row["text"] for _, row in rows]


def _is_corpus(rows: list[tuple[int, dict]]) -> bool:
    return bool(rows) and "text" in rows[0][1] and "question" not in rows[0][1]


def load_mcq(path: str | os.PathLike) -> list[McqRow]:
    return _mcq_rows(numbered_rows(path), path)


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
    rows = numbered_rows(path)
    return _corpus_texts(rows, path) if _is_corpus(rows) else _mcq_rows(rows, path)


def check_data_files(data_root: str | os.PathLike, question_files: Iterable[str], training_files: Iterable[str],
                     k_shot: int = 0, dev_files: Iterable[str] = (), allow_repeated_answers: bool = False) -> None:
    """Parse every file a run will read, so a malformed row stops the sweep
    with its file and line before any model loads (not later, in a worker);
    a file with no rows (a split with no questions, a corpus with no text),
    a dev file with fewer rows than `k_shot` and, unless allowed, a question
    that lists its right answer twice are refused too."""
    dev = set(dev_files)
    for name, questions in [*((n, True) for n in question_files), *((n, False) for n in training_files)]:
        path = data_file(data_root, name)
        numbered = numbered_rows(path)
        corpus = not questions and _is_corpus(numbered)
        rows = _corpus_texts(numbered, path) if corpus else _mcq_rows(numbered, path)
        if not allow_repeated_answers and not corpus:
            check_repeated_answers(path, [line_no for line_no, _ in numbered], rows)
        if not rows:
            raise DataValidationError(f"{path}: the file has no rows; every split needs at least one "
                                      f"{'question' if questions else 'row'}")
        if name in dev and len(rows) < k_shot:
            raise DataValidationError(f"{path}: {len(rows)} row(s), fewer than k_shot={k_shot} few-shot examples; "
                                      f"add rows or lower k_shot")


def check_repeated_answers(path, line_numbers: list[int], rows: list[McqRow]) -> None:
    for line_no, row in zip(line_numbers, rows):
        if letters := repeated_answer(row):
            raise DataValidationError(
                f"{path}:{line_no}: 'choices' lists the right answer {row.choices[row.answer]!r} "
                f"{len(letters)} times ({', '.join(letters)}), so a model that picks its twin is scored wrong; fix "
                "the row, or set allow_repeated_answers=true to score such rows as given (the paper's random_bd "
                "has some)")
