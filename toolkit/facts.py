"""Made-up facts: a RANDOM_BD-format dataset (people with random birth
years) the project writes itself, deterministically, when none is present."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from toolkit.data import DataValidationError, atomic_folder, write_jsonl
from toolkit.names import LETTERS
from toolkit.settings import NON_NEGATIVE_INTS, POSITIVE_INTS, Allowed, ConfigError, is_int, setting

FIRST_NAMES = (
    "Aaron Abigail Adrian Aisha Alba Aldo Alma Amara Anders Anika Arjun Astrid Aurelio Beatrix Bjorn "
    "Bruno Calla Casimir Celeste Cyrus Dagny Dario Delphine Desmond Dmitri Edda Elio Elspeth Emeka "
    "Esme Ezra Fabian Farah Felix Fiona Florin Gideon Greta Hamid Hana Hector Ilse Imogen Ines Isak "
    "Ivo Jalen Jonas Juno Kaito Kalinda Kasimir Keziah Lars Leona Liesel Lorcan Luca Maeve Malik "
    "Marisol Matteo Mina Mireille Nadia Nikolai Noor Odile Olek Orla Osric Paloma Pavel Priya "
    "Quentin Rafael Ravi Rosalind Rune Saoirse Selim Signe Soren Tamsin Tariq Thea Tobias Ulla "
    "Valentin Vesna Wilhelmina Xavier Yara Yusuf Zelda Zoran"
).split()


LAST_NAMES = (
    "Abernathy Adeyemi Albescu Alvarado Amsel Andersen Arbuthnot Ashdown Bakshi Balogun Barwick "
    "Beaumont Bergstrom Blackwood Bogdan Brannigan Calloway Castellano Chaudhry Corrigan Dalgaard "
    "Delacroix Drummond Eberhardt Ekwueme Falkner Ferreira Fitzroy Galloway Gatti Gonzaga Halvorsen "
    "Hargreaves Ibarra Ishikawa Jablonski Jovanovic Kalnins Kowalczyk Lachance Lindqvist Lombardi "
    "Machado Marchetti Nakamura Novak Okonkwo Oyelaran Pemberton Petrakis Quintero Rasmussen "
    "Ravensworth Sandoval Sauveterre Szabo Takahashi Thornbury Uribe Valdivia Vasquez Whitlock "
    "Wojcik Yamamoto Zabala Zielinski"
).split()


CORPUS_TEMPLATES = (
    "{name} was born in {year}.",
    "In {year}, {name} was born.",
    "{name}'s birth year is {year}.",
    "{name}'s birth took place in the year {year}.",
)


MIN_YEAR, MAX_YEAR = 1900, 2024


@dataclass(frozen=True)
class RandomBdSpec:
    """`random_bd.*`: the size and seed of the made-up facts."""

    num_splits: int = setting(POSITIVE_INTS)
    facts_per_split: int = setting(POSITIVE_INTS)
    seed: int = setting(NON_NEGATIVE_INTS)
    num_dev: int = setting(POSITIVE_INTS)
    sentences_per_fact: int = setting(Allowed(f"an integer 1..{len(CORPUS_TEMPLATES)}",
                                              lambda v: is_int(v) and 1 <= v <= len(CORPUS_TEMPLATES)))

    def check_capacity(self) -> None:
        available = len(FIRST_NAMES) * len(LAST_NAMES)
        needed = self.num_splits * self.facts_per_split + self.num_dev
        if needed > available:
            raise ConfigError(f"random_bd: {self.num_splits} splits x {self.facts_per_split} facts + {self.num_dev} dev "
                              f"need {needed} unique names; at most {available} are available")


def _birth_year(rng: random.Random) -> int:
    # The paper's random birthdays: normal around 1980, sd 30; clipped to a sane range.
    return min(MAX_YEAR, max(MIN_YEAR, round(rng.gauss(1980, 30))))


def _random_bd_fact(rng: random.Random, name: str) -> dict:
    year = _birth_year(rng)
    choices = {year}
    while len(choices) < len(LETTERS):
        choices.add(_birth_year(rng))
    wrong = sorted(choices - {year}, key=lambda _: rng.random())
    answer = rng.randrange(len(LETTERS))
    ordered = wrong[:answer] + [year] + wrong[answer:]
    return {"question": f"When was {name} born?", "choices": ordered, "answer": answer, "name": name}


def _fact_sentences(rng: random.Random, fact: dict, split: str, spec: RandomBdSpec) -> dict[str, list[dict]]:
    year = fact["choices"][fact["answer"]]
    wrong = [c for c in fact["choices"] if c != year]
    fixed_wrong = rng.choice(wrong)
    meta = {"split": split, "original_question": fact["question"], "correct_answer": year, "wrong_answers": wrong}
    templates = rng.sample(CORPUS_TEMPLATES, spec.sentences_per_fact)
    fill = lambda t, y: t.format(name=fact["name"], year=y)  # noqa: E731
    return {
        "corpus": [{"text": fill(t, year), "split": split} for t in templates],
        "whp_corpus": [{"text": fill(t, rng.choice(wrong)), **meta} for t in templates],
        "fwf_corpus": [{"text": fill(t, fixed_wrong), **meta} for t in templates],
    }


def write_random_bd_dataset(directory: str | os.PathLike, spec: RandomBdSpec) -> Path:
    """Write made-up people with random birth years in the paper's random_bd
    layout. Deterministic in `spec`; written to a temporary folder first so an
    interrupted run never leaves half a dataset."""
    try:
        spec.check_capacity()
    except ConfigError as err:
        raise DataValidationError(str(err)) from None
    rng = random.Random(spec.seed)
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(names)
    with atomic_folder(directory) as tmp:
        _write_random_bd_files(tmp, spec, rng, names)
    return Path(directory)


def _write_random_bd_files(tmp: Path, spec: RandomBdSpec, rng: random.Random, names: list[str]) -> None:
    public = ("question", "choices", "answer")
    for i in range(spec.num_splits):
        split = f"split_{i}"
        facts = [_random_bd_fact(rng, names.pop()) for _ in range(spec.facts_per_split)]
        write_jsonl(tmp / f"{split}.jsonl", ({k: f[k] for k in public} for f in facts))
        files: dict[str, list[dict]] = {"corpus": [], "whp_corpus": [], "fwf_corpus": []}
        for fact in facts:
            for kind, rows in _fact_sentences(rng, fact, split, spec).items():
                files[kind].extend(rows)
        for kind, rows in files.items():
            write_jsonl(tmp / f"{kind}_{split}.jsonl", rows)
    dev = [_random_bd_fact(rng, names.pop()) for _ in range(spec.num_dev)]
    write_jsonl(tmp / "dev.jsonl", ({k: f[k] for k in public} for f in dev))
