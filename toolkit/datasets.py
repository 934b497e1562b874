"""The dataset table: which files of the data root each dataset's forget
corpus, wrong-answer corpora, question files and retain files are, and the
made-up facts written when asked for and absent."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from toolkit.data import DataValidationError, check_data_files, missing_files
from toolkit.facts import RandomBdSpec, write_random_bd_dataset
from toolkit.names import DataFormat, Datasets
from toolkit.settings import EvalFiles
from toolkit.world_facts import known_to_embedded, write_world_facts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetFiles:
    """File names relative to the data root, without `.jsonl`."""

    unlearn_files: tuple[str, ...]
    wrong_unlearn_files: tuple[str, ...]
    fixed_wrong_unlearn_files: tuple[str, ...]
    val_files: tuple[str, ...]
    retain_files: tuple[str, ...]
    val_retain_files: tuple[str, ...]
    dev_file: str
    retain_dev_file: str
    generated_dir: str | None = None  # a folder the project writes itself when absent

    def training_files(self, data_format: DataFormat, corpus: str = "unlearn_files") -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(forget, retain) files to train on: the method's corpus, or with MCQ
        the question files of the same facts."""
        if data_format == DataFormat.MCQ:
            return self.val_files, self.val_retain_files
        return getattr(self, corpus), self.retain_files

    def question_files(self) -> set[str]:
        """Files read as multiple-choice questions (evaluation, k-shot, MCQ training)."""
        return {*self.val_files, *self.val_retain_files} | {f for f in (self.dev_file, self.retain_dev_file) if f}

    def text_files(self) -> set[str]:
        """Training files, corpus or MCQ."""
        return {*self.unlearn_files, *self.wrong_unlearn_files, *self.fixed_wrong_unlearn_files, *self.retain_files}

    def all_files(self) -> list[str]:
        return sorted(self.question_files() | self.text_files())

    def evals(self, with_retain: bool = True, val_files: Sequence[str] | None = None, scoring: str = "letter") -> EvalFiles:
        return EvalFiles(tuple(self.val_files if val_files is None else val_files),
                         self.val_retain_files if with_retain else (), self.dev_file, self.retain_dev_file, scoring)


MMLU_DIR = "mmlu_cats_random_trimmed"
MMLU_FORGET_CATS = ("STEM", "business", "chemistry", "culture", "geography")
MMLU_RETAIN_CATS = ("health", "history", "law", "philosophy", "social sciences")


YEARS_DIR, RANDOM_BD_DIR, WMDP_DIR = "dates-years-trimmed", "random_bd", "wmdp-deduped"
WORLD_DIR, WORLD_KNOWN_DIR, WORLD_REMAPPED_DIR = "world_facts", "world_facts_known", "world_facts_remapped"
BY_COUNTRY_DIRS = {Datasets.WORLD_FACTS_BY_COUNTRY: "world_facts_by_country",
                   Datasets.WORLD_FACTS_BY_COUNTRY_KNOWN: "world_facts_by_country_known",
                   Datasets.WORLD_FACTS_BY_COUNTRY_REMAPPED: "world_facts_by_country_remapped"}


def _files(directory: str, pattern: str, keys: Iterable) -> tuple[str, ...]:
    return tuple(f"{directory}/{pattern.format(k)}" for k in keys)


MMLU_RETAIN = _files(MMLU_DIR, "corpus_mmlu_{}", MMLU_RETAIN_CATS)
MMLU_VAL_RETAIN = _files(MMLU_DIR, "mmlu_{}", MMLU_RETAIN_CATS)


FIVE, TEN = range(5), range(10)


def _split_layout(directory: str) -> DatasetFiles:
    """A generated dataset of ten splits: forget 0-4, retain 5-9, with its own dev file."""
    return DatasetFiles(
        _files(directory, "corpus_split_{}", FIVE), _files(directory, "whp_corpus_split_{}", FIVE),
        _files(directory, "fwf_corpus_split_{}", FIVE), _files(directory, "split_{}", FIVE),
        _files(directory, "corpus_split_{}", range(5, 10)), _files(directory, "split_{}", range(5, 10)),
        f"{directory}/dev", f"{directory}/dev", generated_dir=directory)


DATASETS: dict[Datasets, DatasetFiles] = {
    Datasets.MMLU: DatasetFiles(
        _files(MMLU_DIR, "corpus_mmlu_{}", MMLU_FORGET_CATS), _files(MMLU_DIR, "whp_corpus_mmlu_{}", MMLU_FORGET_CATS),
        _files(MMLU_DIR, "fwf_corpus_mmlu_{}", MMLU_FORGET_CATS), _files(MMLU_DIR, "mmlu_{}", MMLU_FORGET_CATS),
        MMLU_RETAIN, MMLU_VAL_RETAIN, f"{MMLU_DIR}/dev", f"{MMLU_DIR}/dev"),
    Datasets.YEARS_MMLU_RETAIN: DatasetFiles(
        _files(YEARS_DIR, "corpus_split_{}", FIVE), _files(YEARS_DIR, "whp_corpus_split_{}", FIVE),
        _files(YEARS_DIR, "fwf_corpus_split_{}", FIVE), _files(YEARS_DIR, "split_{}", FIVE),
        MMLU_RETAIN, MMLU_VAL_RETAIN, f"{YEARS_DIR}/dev", f"{MMLU_DIR}/dev"),
    Datasets.RANDOM_BD_SAME_RETAIN: _split_layout(RANDOM_BD_DIR),
    Datasets.RANDOM_BD_ALL_SPLITS: DatasetFiles(
        _files(RANDOM_BD_DIR, "corpus_split_{}", TEN), _files(RANDOM_BD_DIR, "whp_corpus_split_{}", TEN),
        _files(RANDOM_BD_DIR, "fwf_corpus_split_{}", TEN), _files(RANDOM_BD_DIR, "split_{}", TEN),
        (), (), f"{RANDOM_BD_DIR}/dev", f"{RANDOM_BD_DIR}/dev", generated_dir=RANDOM_BD_DIR),
    # Facts from pretraining, the same split roles as RANDOM_BD_SAME_RETAIN (forget 0-4, retain 5-9):
    # all of them, those the embedded model knows (the study's), and those remapped (its floor).
    **{dataset: _split_layout(directory) for dataset, directory in (
        (Datasets.WORLD_FACTS, WORLD_DIR), (Datasets.WORLD_FACTS_KNOWN, WORLD_KNOWN_DIR),
        (Datasets.WORLD_FACTS_REMAPPED, WORLD_REMAPPED_DIR), *BY_COUNTRY_DIRS.items())},
    # The paper's WMDP retain corpus (wikitext) was never published: MMLU retain stands in.
    Datasets.WMDP_MCQ_CORPUS: DatasetFiles(
        _files(WMDP_DIR, "corpus_split_{}", FIVE), _files(WMDP_DIR, "whp_corpus_split_{}", FIVE),
        _files(WMDP_DIR, "fwf_corpus_split_{}", FIVE), _files(WMDP_DIR, "split_{}", FIVE),
        MMLU_RETAIN, MMLU_VAL_RETAIN, f"{WMDP_DIR}/dev", f"{MMLU_DIR}/dev"),
}


# A dataset whose floor is RTT on another: facts from pretraining have no
# never-taught model, so their floor is RTT from the model before unlearning
# on the same questions with the answers remapped (same format, same answer
# distribution, nothing learned in pretraining to bring back).
FLOOR_DATASETS = {Datasets.WORLD_FACTS_KNOWN: Datasets.WORLD_FACTS_REMAPPED,
                  Datasets.WORLD_FACTS_BY_COUNTRY_KNOWN: Datasets.WORLD_FACTS_BY_COUNTRY_REMAPPED}


# The datasets the project writes itself, by folder.
def world_facts_writer(known: bool, remap: bool, by_country: bool):
    """A generator of one world-facts variant: all facts or those the embedded model knows, remapped or not,
    dealt by fact (the first edition's) or by country."""
    keep = known_to_embedded if known else (lambda fact: True)
    return lambda directory, _made_up: write_world_facts(directory, keep, remap=remap, by_country=by_country)


WORLD_VARIANTS = {  # folder -> (known only, remapped, dealt by country)
    WORLD_DIR: (False, False, False), WORLD_KNOWN_DIR: (True, False, False), WORLD_REMAPPED_DIR: (True, True, False),
    **{BY_COUNTRY_DIRS[d]: (known, remap, True) for d, known, remap in (
        (Datasets.WORLD_FACTS_BY_COUNTRY, False, False), (Datasets.WORLD_FACTS_BY_COUNTRY_KNOWN, True, False),
        (Datasets.WORLD_FACTS_BY_COUNTRY_REMAPPED, True, True))}}
GENERATORS = {RANDOM_BD_DIR: write_random_bd_dataset,
              **{folder: world_facts_writer(*variant) for folder, variant in WORLD_VARIANTS.items()}}


def ensure_dataset(data_root: str, dataset: Datasets, made_up: RandomBdSpec, k_shot: int = 0,
                   allow_repeated_answers: bool = False) -> None:
    """Write the made-up-facts dataset when it is asked for and absent; fail
    with the list of missing files otherwise (the paper's registry points at
    files that were never published); parse every file."""
    files = DATASETS[dataset]
    root = Path(data_root)
    if files.generated_dir and not (root / files.generated_dir).exists():
        log.info("writing %s to %s", files.generated_dir, root / files.generated_dir)
        GENERATORS[files.generated_dir](root / files.generated_dir, made_up)
    missing = missing_files(root, files.all_files())
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise DataValidationError(f"dataset {dataset.name} is missing {len(missing)} file(s) under {root}: {shown}")
    check_data_files(root, sorted(files.question_files()), sorted(files.text_files() - files.question_files()),
                     k_shot, [f for f in (files.dev_file, files.retain_dev_file) if f], allow_repeated_answers)
