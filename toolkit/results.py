"""The results schema, in one place: the table of each stage (its folder
and key column), the columns of each row, a row written whole, and rows read
back with their keys as text. The pipeline writes through it and the analysis
reads through it; it needs no torch (a job's row is built in toolkit.rows)."""

from __future__ import annotations

import csv
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from toolkit.names import STOP_TARGET
from toolkit.settings import ConfigError, first_line


@dataclass(frozen=True)
class Table:
    """One stage's rows: one CSV file per finished job in `folder`."""

    folder: str
    key: str  # the column holding the job's key
    settings: tuple[str, ...]  # what a key stands for, in columns that read the same on every machine
    legacy: tuple[str, ...]  # what told rows apart before rows carried keys


# The RTT folder keeps the paper's name, `ft`.
TABLES = {
    "unlearn": Table("unlearning", "run_key",
                     ("unlearn_type", "dataset", "lora_rank", "lr", "epochs", "retain_coeff", "steering_coeff", "seed"),
                     ("model_path", "data_seed", "unlearn_type", "dataset", "lora_rank", "lr", "epochs",
                      "retain_coeff", "steering_coeff", "max_samples")),
    "rtt": Table("ft", "rtt_key", ("condition", "dataset", "probe", "lr", "epochs", "skip_split", "seed"),
                 ("base_model", "condition", "dataset", "lr", "epochs", "skip_split", "data_seed")),
    "quant": Table("quant", "probe_key", ("condition", "dataset", "probe", "lora_rank", "seed"),
                   ("model_path", "probe", "condition")),
}
# Read as text whatever they look like: a key or commit such as "07270824e702" is not a number.
TEXT_COLUMNS = {"code_version", "torch_version", "machine_cpu", "machine_cpu_features", "machine_gpu", "model_path",
                "base_model", "start_weights", "save_name", "project_name", "upstream_key", "ray_node",
                *(table.key for table in TABLES.values())}


def table_dir(results_dir: str | os.PathLike, stage: str) -> Path:
    return Path(results_dir) / TABLES[stage].folder


def write_cell(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return "" if value is None else value


def read_cell(column: str, text: str) -> Any:
    """A cell as written: JSON for dicts and lists, numbers, booleans, "" for None."""
    if text == "":
        return None
    if column in TEXT_COLUMNS:
        return text
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except ValueError:
            return text
    if text in ("True", "False"):
        return text == "True"
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows written to a temporary file and renamed: a crash never leaves a
    torn file, and concurrent workers never interleave."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: write_cell(v) for k, v in row.items()} for row in rows)
    os.replace(tmp, path)


def write_result_csv(directory: str | os.PathLike, index: int, row: Mapping[str, Any]) -> Path:
    """One job's row as `{time}--num{index}.csv` in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S-%f")
    path = directory / f"{stamp}--num{index}.csv"
    write_csv(path, [row])
    return path


def write_row(results_dir: str | os.PathLike, stage: str, index: int, row: Mapping[str, Any],
              replaces: Sequence[str] = ()) -> Path:
    """Write a job's row, then remove the rows an earlier run with the same key
    left, so a key has one row (analysis also keeps only the newest)."""
    path = write_result_csv(table_dir(results_dir, stage), index, row)
    for old in replaces:
        Path(old).unlink(missing_ok=True)
    return path


FAILURES = "failures.csv"


def write_failures(results_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], name: str, detail: str) -> None:
    """The sweep's failures so far (one row each, rewritten whole) and the full
    traceback of the latest, `failures/{name}.txt`, beside the results."""
    directory = Path(results_dir)
    (directory / "failures").mkdir(parents=True, exist_ok=True)
    write_csv(directory / FAILURES, rows)
    (directory / "failures" / f"{name}.txt").write_text(detail)


def read_text_rows(path: Path) -> list[dict[str, str]]:
    """A results file's rows; a file that is no whole results row (not UTF-8,
    not CSV, a header without a row, a row cut short or with extra cells) is
    refused naming it: rows are written whole, so such a file came from elsewhere."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"results_dir: {path} cannot be read as a results row ({type(err).__name__}: "
                          f"{first_line(err)}); move it out of {path.parent}") from None
    width = len(reader.fieldnames or ())
    torn = next((i for i, row in enumerate(rows, 2) if None in row or None in row.values()), None)
    if not rows or torn is not None:
        what = "has no row under its header" if not rows else f"line {torn} does not have the header's {width} cells"
        raise ConfigError(f"results_dir: {path} is not a whole results row ({what}); move it out of {path.parent}")
    return rows


def read_rows(results_dir: str | os.PathLike, stage: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every row of a stage's table, oldest file first, with the file it came from."""
    for path in sorted(table_dir(results_dir, stage).glob("*.csv")):
        for row in read_text_rows(path):
            yield path, {column: read_cell(column, text or "") for column, text in row.items() if column is not None}


@dataclass
class Recorded:
    """The rows already written, {stage: {key: [csv paths]}}, and the runs
    among them that the stop rule flagged (stopped short of its target)."""

    keys: dict[str, dict[str, list[str]]]
    flagged: set[str]


def recorded_rows(results_dir: str | os.PathLike) -> Recorded:
    recorded = Recorded({}, set())
    for stage, table in TABLES.items():
        keys = recorded.keys[stage] = {}
        for path in sorted(table_dir(results_dir, stage).glob("*.csv")):
            for row in read_text_rows(path):
                key, reason = row.get(table.key), row.get("stop_reason")
                if key:
                    keys.setdefault(key, []).append(str(path))
                    if reason and reason != STOP_TARGET:
                        recorded.flagged.add(key)
    return recorded


def drop_superseded_rows(results_dir: str | os.PathLike) -> int:
    """Keep the newest row of each key. A driver killed mid-sweep leaves Ray
    workers that can still write a row for a few seconds, after a quick rerun
    has planned that job again; that rerun then writes a second row."""
    superseded = [old for keys in recorded_rows(results_dir).keys.values() for paths in keys.values()
                  for old in sorted(paths)[:-1]]  # file names start with their time
    for path in superseded:
        Path(path).unlink(missing_ok=True)
    return len(superseded)
