"""Facts a language model learns in pretraining: public, stable facts of six
relations (capitals, continents, official languages, currencies, chemical
symbols, the countries of well-known cities; the table is
toolkit/world_facts_table.py), written by the project in the paper's split
layout, with distractors of the same relation. No teaching step: the point
is what the model already knows.

Three variants share one deal of facts and questions (a seeded shuffle):
all of them (WORLD_FACTS); only those the embedded model answers under
choice scoring (WORLD_FACTS_KNOWN, the study's); and those same questions
with each answer moved to another fact of its relation (WORLD_FACTS_REMAPPED,
the floor: the same format and answer distribution, but answers no model
learned in pretraining)."""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from toolkit.data import atomic_folder, write_jsonl
from toolkit.names import LETTERS
from toolkit.world_facts_table import CITIES, COUNTRIES, ELEMENTS, UNKNOWN_TO_EMBEDDED


@dataclass(frozen=True)
class Relation:
    name: str
    question: str  # the question, with {subject}
    statements: tuple[str, ...]  # corpus paraphrases, with {subject} and {answer}


RELATIONS = {
    "capital": Relation("capital", "What is the capital of {subject}?",
                        ("The capital of {subject} is {answer}.", "{answer} is the capital city of {subject}.",
                         "{subject}'s capital is {answer}.")),
    "continent": Relation("continent", "On which continent is {subject}?",
                          ("{subject} is in {answer}.", "{subject} is a country of {answer}.",
                           "{subject} lies on the continent of {answer}.")),
    "language": Relation("language", "What is the official language of {subject}?",
                         ("The official language of {subject} is {answer}.", "In {subject}, the official language is {answer}.",
                          "{answer} is the official language of {subject}.")),
    "currency": Relation("currency", "What is the currency of {subject}?",
                         ("The currency of {subject} is the {answer}.", "In {subject}, people pay with the {answer}.",
                          "{subject} uses the {answer} as its currency.")),
    "symbol": Relation("symbol", "What is the chemical symbol of {subject}?",
                       ("The chemical symbol of {subject} is {answer}.", "{answer} is the symbol for {subject}.",
                        "{subject} has the chemical symbol {answer}.")),
    "city": Relation("city", "In which country is the city of {subject}?",
                     ("{subject} is a city in {answer}.", "The city of {subject} is in {answer}.",
                      "{subject} is one of the cities of {answer}.")),
}


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    answer: str

    @property
    def name(self) -> str:
        return f"{self.relation}|{self.subject}"


def all_facts() -> list[Fact]:
    """Every fact of the table, in table order."""
    facts = []
    for line in COUNTRIES.strip().splitlines():
        country, *answers = line.split("|")
        for relation, answer in zip(("capital", "continent", "language", "currency"), answers):
            if answer != "-":
                facts.append(Fact(relation, country, answer))
    facts += [Fact("symbol", element, symbol) for element, symbol in
              (line.split("|") for line in ELEMENTS.strip().splitlines())]
    facts += [Fact("city", city, country) for city, country in
              (line.split("|") for line in CITIES.strip().splitlines())]
    return facts


def answer_pools() -> dict[str, set[str]]:
    """Every answer of each relation in the table: where distractors come from."""
    pools: dict[str, set[str]] = {r: set() for r in RELATIONS}
    for fact in all_facts():
        pools[fact.relation].add(fact.answer)
    return pools


def known_to_embedded(fact: Fact) -> bool:
    """Whether SmolLM2-135M-Instruct answers the fact's question under choice
    scoring (measured once by tests/benchmarks/pretrained_knowledge.py)."""
    return fact.name not in UNKNOWN_TO_EMBEDDED


@dataclass
class Dealt:
    """One fact with its question and corpus statements, in its split."""

    fact: Fact
    question: dict
    statements: dict[str, list[dict]]


def _question(fact: Fact, answer_text: str, pool: set[str], rng: random.Random) -> dict:
    wrong = rng.sample(sorted(pool - {fact.answer, answer_text}), len(LETTERS) - 1)
    answer = rng.randrange(len(LETTERS))
    choices = wrong[:answer] + [answer_text] + wrong[answer:]
    return {"question": RELATIONS[fact.relation].question.format(subject=fact.subject), "choices": choices,
            "answer": answer, "relation": fact.relation}


def _statements(fact: Fact, question: dict, split: str, rng: random.Random) -> dict[str, list[dict]]:
    relation, answer = RELATIONS[fact.relation], question["choices"][question["answer"]]
    wrong = [c for c in question["choices"] if c != answer]
    fixed = rng.choice(wrong)
    meta = {"split": split, "original_question": question["question"], "correct_answer": answer,
            "wrong_answers": wrong}
    fill = lambda t, a: t.format(subject=fact.subject, answer=a)  # noqa: E731
    return {"corpus": [{"text": fill(t, answer), "split": split} for t in relation.statements],
            "whp_corpus": [{"text": fill(t, rng.choice(wrong)), **meta} for t in relation.statements],
            "fwf_corpus": [{"text": fill(t, fixed), **meta} for t in relation.statements]}


def _dealt(fact: Fact, answer_text: str, pool: set[str], split: str, rng: random.Random) -> Dealt:
    question = _question(fact, answer_text, pool, rng)
    return Dealt(fact, question, _statements(fact, question, split, rng))


# Splits 0-4 (forget) hold these relations, splits 5-9 (retain) the others: as
# in the paper's datasets, what is kept is not the same kind of fact as what is
# forgotten (one cannot forget France's euro and keep Germany's).
FORGET_RELATIONS = ("capital", "city")


def fact_rng(seed: int, fact: Fact, variant: str = "") -> random.Random:
    """Each fact's own draws (distractors, answer letter), the same whatever
    split it is dealt to, so a measured list of known facts stays valid."""
    return random.Random(f"{seed}|{variant}|{fact.name}")


def country_of(fact: Fact) -> str:
    """The entity a fact is about, for keeping splits independent: a
    country's capital and its cities' facts share the country (a city's
    answer); any other fact is about its subject."""
    return fact.answer if fact.relation == "city" else fact.subject


def deal(num_splits: int = 10, num_dev: int = 5, seed: int = 0,
         by_country: bool = False) -> tuple[list[list[Dealt]], list[Dealt]]:
    """Every fact dealt to a split with its question, plus a few dev
    questions: the forget relations to the first half of the splits, the
    others to the second half, after a seeded shuffle; round-robin by fact
    (the first edition's deal) or, `by_country`, every fact about one
    country in one split (`deal_groups`). A variant filters the deal, and a
    fact's question is drawn from its own seed, the same in every deal."""
    rng = random.Random(seed)
    facts, pools = all_facts(), answer_pools()
    rng.shuffle(facts)
    if by_country:
        return deal_groups(facts, pools, num_splits, num_dev, seed)
    dev, facts = facts[:num_dev], facts[num_dev:]
    facts.sort(key=lambda f: f.relation)  # stable: shuffled within each relation
    half = num_splits // 2
    groups = ([f for f in facts if f.relation in FORGET_RELATIONS], [f for f in facts if f.relation not in FORGET_RELATIONS])
    indices = (range(half), range(half, num_splits))
    splits: list[list[Dealt]] = [[] for _ in range(num_splits)]
    for group, where in zip(groups, indices):
        for i, split in enumerate(where):
            splits[split] = [_dealt(f, f.answer, pools[f.relation], f"split_{split}", fact_rng(seed, f))
                             for f in group[i::len(where)]]
    return splits, [_dealt(f, f.answer, pools[f.relation], "dev", fact_rng(seed, f)) for f in dev]


def deal_groups(facts: list[Fact], pools: dict[str, set[str]], num_splits: int, num_dev: int,
                seed: int) -> tuple[list[list[Dealt]], list[Dealt]]:
    """The independent deal: facts grouped by `country_of`, the groups (in
    the shuffled order, largest first) each to the split of its half that
    holds fewest facts so far. No question's subject or right answer then
    appears in another forget split's (RTT's T says nothing about V: Lyon ->
    France and Marseille -> France are in one split). Dev questions come from
    the chemical symbols, which name no country."""
    dev = [f for f in facts if f.relation == "symbol"][:num_dev]
    facts = [f for f in facts if f not in dev]
    half = num_splits // 2
    splits: list[list[Fact]] = [[] for _ in range(num_splits)]
    for forget, where in ((True, range(half)), (False, range(half, num_splits))):
        groups: dict[str, list[Fact]] = {}
        for fact in facts:
            if (fact.relation in FORGET_RELATIONS) == forget:
                groups.setdefault(country_of(fact), []).append(fact)
        for group in sorted(groups.values(), key=len, reverse=True):  # stable: the shuffle breaks ties
            target = min(where, key=lambda s: (len(splits[s]), s))
            splits[target] += group
    dealt = [[_dealt(f, f.answer, pools[f.relation], f"split_{i}", fact_rng(seed, f)) for f in split]
             for i, split in enumerate(splits)]
    return dealt, [_dealt(f, f.answer, pools[f.relation], "dev", fact_rng(seed, f)) for f in dev]


def remapped(splits: list[list[Dealt]], seed: int = 1) -> list[list[Dealt]]:
    """The same facts with each answer moved to another fact of the same
    relation (a permutation with no fact keeping its answer, so the answers'
    distribution is unchanged), and choices that leave the true answer out.
    `seed` drives both the derangement and each fact's own draws of
    distractors and answer letter (`fact_rng(seed, fact, "remapped")`)."""
    rng = random.Random(seed)
    flat = [d for split in splits for d in split]
    new_answer: dict[int, str] = {}
    for relation in RELATIONS:
        items = [i for i, d in enumerate(flat) if d.fact.relation == relation]
        answers = [flat[i].fact.answer for i in items]
        new_answer.update(zip(items, _derangement(answers, rng)))
    pools = answer_pools()
    out, i = [], 0
    for split_index, split in enumerate(splits):
        out.append([])
        for d in split:
            out[-1].append(_dealt(d.fact, new_answer[i], pools[d.fact.relation], f"split_{split_index}",
                                      fact_rng(seed, d.fact, "remapped")))
            i += 1
    return out


def _derangement(values: list[str], rng: random.Random) -> list[str]:
    """A shuffle of `values` in which no position keeps a value equal to its
    own: in a random order that keeps equal values together, each position
    takes the value k places on (k = the largest count of one value), which
    always lies in another value's run."""
    n, k = len(values), max(Counter(values).values(), default=0)
    if 2 * k > n:
        raise ValueError(f"no derangement of {n} answers: one answer is {k} of them")
    groups = sorted(set(values))
    rng.shuffle(groups)
    place = {value: i for i, value in enumerate(groups)}
    order = list(range(n))
    rng.shuffle(order)
    order.sort(key=lambda i: place[values[i]])
    out = [""] * n
    for position, i in enumerate(order):
        out[i] = values[order[(position + k) % n]]
    return out


def write_world_facts(directory: str | os.PathLike, keep: Callable[[Fact], bool] = lambda fact: True,
                      remap: bool = False, num_splits: int = 10, num_dev: int = 5, seed: int = 0,
                      by_country: bool = False) -> Path:
    """The dealt facts that `keep` keeps (remapped if asked), in the paper's
    layout: split_i (MCQ), corpus_split_i, whp_ and fwf_ corpora, and dev."""
    splits, dev = deal(num_splits, num_dev, seed, by_country)
    splits = [[d for d in split if keep(d.fact)] for split in splits]
    if remap:
        splits = remapped(splits, seed + 1)
    public = ("question", "choices", "answer")
    with atomic_folder(directory) as tmp:
        for i, split in enumerate(splits):
            write_jsonl(tmp / f"split_{i}.jsonl",
                        ({**{k: d.question[k] for k in public}, "relation": d.fact.relation,
                         "subject": d.fact.subject} for d in split))
            for kind in ("corpus", "whp_corpus", "fwf_corpus"):
                write_jsonl(tmp / f"{kind}_split_{i}.jsonl", (row for d in split for row in d.statements[kind]))
        write_jsonl(tmp / "dev.jsonl", ({k: d.question[k] for k in public} for d in dev))
    return Path(directory)
