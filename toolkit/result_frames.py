"""The analysis reads the result rows once: each stage's rows as a frame
(checked for the columns it reads), one row per key, one scoring mode."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from toolkit.comparison import check_one_scoring_mode, comparable_published
from toolkit.results import TABLES, Table, read_rows, table_dir

NEEDS = {"unlearn": ("model_path", "unlearn_type", "dataset", "lora_rank", "forget_accs", "val_files"),
         "rtt": ("base_model", "condition", "dataset", "skip_split", "forget_accs_local"),
         "quant": ("probe", "forget_accs")}


def read_table(results_dir: Path, stage: str) -> pd.DataFrame:
    """A stage's rows (through the results schema), each with the file it came from."""
    rows = [{**row, "_file": str(path)} for path, row in read_rows(results_dir, stage)]
    for row in rows:
        if missing := [c for c in NEEDS[stage] if c not in row]:
            raise ValueError(f"{row['_file']} is no {TABLES[stage].folder} row: it lacks {', '.join(missing)}; "
                             f"move it out of {Path(row['_file']).parent}")
    frame = pd.DataFrame(rows)
    for column in frame.columns:  # dicts and lists stay Python objects
        if frame[column].map(lambda v: isinstance(v, (dict, list))).any():
            frame[column] = frame[column].astype(object)
    return frame


def check_key_collisions(frame: pd.DataFrame, table: Table) -> None:
    """Rows merged from several slices or machines share a key only when they
    ran the same job; two rows of one key with other settings are refused."""
    key = table.key
    if frame.empty or key not in frame:
        return
    columns = [c for c in table.settings if c in frame]
    shared = frame[frame[key].notna() & frame.duplicated(key, keep=False)]
    for value, rows in shared.groupby(key):
        settings = rows[columns].map(lambda v: "nan" if v is None or v != v else str(v))  # empty cells compare equal
        if len(settings.drop_duplicates()) > 1:
            differ = [c for c in columns if settings[c].nunique() > 1]
            first, other = rows.iloc[0], rows[(settings != settings.iloc[0]).any(axis=1)].iloc[0]
            raise ValueError(f"{first['_file']} and {other['_file']} share {key} {value} but differ in "
                             f"{', '.join(differ)}; a key names one job, so one of these rows does not belong here")


def newest_per_key(frame: pd.DataFrame, table: Table) -> pd.DataFrame:
    """One row per job: the newest row of each key (files are named by time);
    rows of older versions, which carry no key, are told apart by `table.legacy`."""
    if frame.empty:
        return frame
    check_key_collisions(frame, table)
    frame = frame.sort_values("_file")
    cols = [c for c in table.legacy if c in frame]
    legacy = ("legacy:" + frame[cols].map(str).agg("|".join, axis=1)) if cols else frame["_file"]
    keys = frame[table.key] if table.key in frame else pd.Series([None] * len(frame), index=frame.index)
    ids = [k if isinstance(k, str) and k else old for k, old in zip(keys, legacy)]
    return frame.assign(_id=ids).drop_duplicates("_id", keep="last").drop(columns="_id").reset_index(drop=True)


@dataclass
class Results:
    unlearning: pd.DataFrame
    rtt: pd.DataFrame
    quant: pd.DataFrame


def load_results(results_dir: str | Path) -> Results:
    results_dir = Path(results_dir)
    unlearning, rtt, quant = (newest_per_key(read_table(results_dir, stage), TABLES[stage])
                              for stage in ("unlearn", "rtt", "quant"))
    if unlearning.empty:
        raise FileNotFoundError(f"no unlearning CSVs under {table_dir(results_dir, 'unlearn')}; run pipeline.py first")
    results = Results(unlearning, rtt, quant)
    check_one_scoring_mode(results, str(results_dir))
    return results


def published_results(mine: Results, results_dir: str | Path,
                      published_dirs: Sequence[str | Path]) -> tuple[list[str], Results]:
    """The published rows a comparison of `mine` (read from `results_dir`) can
    rest on (toolkit.comparison.comparable_published), as one Results."""
    published = [(str(folder), load_results(folder)) for folder in published_dirs]
    _, lines, kept = comparable_published(mine, str(results_dir), published)
    return lines, Results(*(pd.concat([getattr(r, stage) for r in kept], ignore_index=True)
                            for stage in ("unlearning", "rtt", "quant")))
