"""Facts a language model learns in pretraining: public, stable facts of
five relations (capitals, continents, official languages, currencies,
chemical symbols), written by the project in the paper's split layout, with
distractors of the same relation. No teaching step: the point is what the
model already knows. Facts that change or are disputed (moving capitals,
several official capitals or languages, new currencies) are left out."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from toolkit.data import atomic_folder, write_jsonl
from toolkit.names import LETTERS

# country | capital | continent | official language | currency   ("-": left out, not clear-cut)
COUNTRIES = """
France|Paris|Europe|French|euro
Germany|Berlin|Europe|German|euro
Italy|Rome|Europe|Italian|euro
Spain|Madrid|Europe|Spanish|euro
Portugal|Lisbon|Europe|Portuguese|euro
Netherlands|Amsterdam|Europe|Dutch|euro
Belgium|Brussels|Europe|-|euro
Austria|Vienna|Europe|German|euro
Switzerland|Bern|Europe|-|Swiss franc
Greece|Athens|Europe|Greek|euro
Ireland|Dublin|Europe|-|euro
United Kingdom|London|Europe|English|pound sterling
Sweden|Stockholm|Europe|Swedish|Swedish krona
Norway|Oslo|Europe|Norwegian|Norwegian krone
Denmark|Copenhagen|Europe|Danish|Danish krone
Finland|Helsinki|Europe|-|euro
Iceland|Reykjavik|Europe|Icelandic|Icelandic krona
Poland|Warsaw|Europe|Polish|Polish zloty
Czech Republic|Prague|Europe|Czech|Czech koruna
Hungary|Budapest|Europe|Hungarian|Hungarian forint
Romania|Bucharest|Europe|Romanian|Romanian leu
Croatia|Zagreb|Europe|Croatian|euro
Serbia|Belgrade|Europe|Serbian|Serbian dinar
Ukraine|Kyiv|Europe|Ukrainian|Ukrainian hryvnia
Slovakia|Bratislava|Europe|Slovak|euro
Slovenia|Ljubljana|Europe|Slovene|euro
Estonia|Tallinn|Europe|Estonian|euro
Latvia|Riga|Europe|Latvian|euro
Lithuania|Vilnius|Europe|Lithuanian|euro
Belarus|Minsk|Europe|-|Belarusian ruble
Albania|Tirana|Europe|Albanian|Albanian lek
Malta|Valletta|Europe|-|euro
Russia|Moscow|-|Russian|Russian ruble
Turkey|Ankara|-|Turkish|Turkish lira
Egypt|Cairo|Africa|Arabic|Egyptian pound
Morocco|Rabat|Africa|-|Moroccan dirham
Nigeria|Abuja|Africa|English|Nigerian naira
Kenya|Nairobi|Africa|-|Kenyan shilling
Ethiopia|Addis Ababa|Africa|Amharic|Ethiopian birr
Ghana|Accra|Africa|English|Ghanaian cedi
Senegal|Dakar|Africa|French|CFA franc
Algeria|Algiers|Africa|Arabic|Algerian dinar
Tunisia|Tunis|Africa|Arabic|Tunisian dinar
Uganda|Kampala|Africa|-|Ugandan shilling
Angola|Luanda|Africa|Portuguese|Angolan kwanza
Mozambique|Maputo|Africa|Portuguese|Mozambican metical
Madagascar|Antananarivo|Africa|-|Malagasy ariary
Libya|Tripoli|Africa|Arabic|Libyan dinar
Sudan|Khartoum|Africa|-|Sudanese pound
Mali|Bamako|Africa|-|CFA franc
Niger|Niamey|Africa|-|CFA franc
Cameroon|Yaounde|Africa|-|CFA franc
Rwanda|Kigali|Africa|-|Rwandan franc
Somalia|Mogadishu|Africa|-|Somali shilling
Zambia|Lusaka|Africa|English|Zambian kwacha
Botswana|Gaborone|Africa|-|Botswana pula
Namibia|Windhoek|Africa|English|Namibian dollar
China|Beijing|Asia|Chinese|Chinese yuan
Japan|Tokyo|Asia|Japanese|Japanese yen
South Korea|Seoul|Asia|Korean|South Korean won
North Korea|Pyongyang|Asia|Korean|North Korean won
India|New Delhi|Asia|-|Indian rupee
Pakistan|Islamabad|Asia|-|Pakistani rupee
Bangladesh|Dhaka|Asia|Bengali|Bangladeshi taka
Thailand|Bangkok|Asia|Thai|Thai baht
Vietnam|Hanoi|Asia|Vietnamese|Vietnamese dong
Philippines|Manila|Asia|-|Philippine peso
Malaysia|Kuala Lumpur|Asia|Malay|Malaysian ringgit
Iran|Tehran|Asia|Persian|Iranian rial
Iraq|Baghdad|Asia|-|Iraqi dinar
Saudi Arabia|Riyadh|Asia|Arabic|Saudi riyal
Afghanistan|Kabul|Asia|-|Afghan afghani
Nepal|Kathmandu|Asia|Nepali|Nepalese rupee
Mongolia|Ulaanbaatar|Asia|Mongolian|Mongolian tugrik
Kazakhstan|Astana|Asia|-|Kazakhstani tenge
Qatar|Doha|Asia|Arabic|Qatari riyal
Syria|Damascus|Asia|Arabic|Syrian pound
Jordan|Amman|Asia|Arabic|Jordanian dinar
Lebanon|Beirut|Asia|Arabic|Lebanese pound
Uzbekistan|Tashkent|Asia|Uzbek|Uzbekistani som
Kyrgyzstan|Bishkek|Asia|-|Kyrgyzstani som
Tajikistan|Dushanbe|Asia|Tajik|Tajikistani somoni
Turkmenistan|Ashgabat|Asia|Turkmen|Turkmenistani manat
Cambodia|Phnom Penh|Asia|Khmer|Cambodian riel
Laos|Vientiane|Asia|Lao|Lao kip
Oman|Muscat|Asia|Arabic|Omani rial
Kuwait|Kuwait City|Asia|Arabic|Kuwaiti dinar
United Arab Emirates|Abu Dhabi|Asia|Arabic|UAE dirham
Singapore|Singapore|Asia|-|Singapore dollar
Israel|-|Asia|Hebrew|Israeli new shekel
United States|Washington, D.C.|North America|-|United States dollar
Canada|Ottawa|North America|-|Canadian dollar
Mexico|Mexico City|North America|Spanish|Mexican peso
Cuba|Havana|North America|Spanish|Cuban peso
Jamaica|Kingston|North America|English|Jamaican dollar
Guatemala|Guatemala City|North America|Spanish|Guatemalan quetzal
Honduras|Tegucigalpa|North America|Spanish|Honduran lempira
Costa Rica|San Jose|North America|Spanish|Costa Rican colon
Nicaragua|Managua|North America|Spanish|Nicaraguan cordoba
Dominican Republic|Santo Domingo|North America|Spanish|Dominican peso
Haiti|Port-au-Prince|North America|-|Haitian gourde
El Salvador|San Salvador|North America|Spanish|-
Panama|Panama City|North America|Spanish|-
Brazil|Brasilia|South America|Portuguese|Brazilian real
Argentina|Buenos Aires|South America|Spanish|Argentine peso
Chile|Santiago|South America|Spanish|Chilean peso
Peru|Lima|South America|-|Peruvian sol
Colombia|Bogota|South America|Spanish|Colombian peso
Venezuela|Caracas|South America|Spanish|-
Uruguay|Montevideo|South America|Spanish|Uruguayan peso
Paraguay|Asuncion|South America|-|Paraguayan guarani
Ecuador|Quito|South America|Spanish|-
Australia|Canberra|Oceania|-|Australian dollar
New Zealand|Wellington|Oceania|-|New Zealand dollar
Fiji|Suva|Oceania|-|Fijian dollar
Papua New Guinea|Port Moresby|Oceania|-|Papua New Guinean kina
"""

# element | symbol
ELEMENTS = """
hydrogen|H
helium|He
lithium|Li
beryllium|Be
boron|B
carbon|C
nitrogen|N
oxygen|O
fluorine|F
neon|Ne
sodium|Na
magnesium|Mg
aluminium|Al
silicon|Si
phosphorus|P
sulfur|S
chlorine|Cl
argon|Ar
potassium|K
calcium|Ca
titanium|Ti
chromium|Cr
manganese|Mn
iron|Fe
cobalt|Co
nickel|Ni
copper|Cu
zinc|Zn
arsenic|As
selenium|Se
bromine|Br
krypton|Kr
strontium|Sr
silver|Ag
tin|Sn
iodine|I
xenon|Xe
barium|Ba
tungsten|W
platinum|Pt
gold|Au
mercury|Hg
lead|Pb
radon|Rn
radium|Ra
uranium|U
plutonium|Pu
zirconium|Zr
cadmium|Cd
antimony|Sb
bismuth|Bi
cesium|Cs
gallium|Ga
germanium|Ge
rubidium|Rb
vanadium|V
scandium|Sc
palladium|Pd
osmium|Os
iridium|Ir
"""


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
}


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    answer: str


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
    return facts


def _question(fact: Fact, pool: list[str], rng: random.Random) -> dict:
    wrong = rng.sample(sorted(set(pool) - {fact.answer}), len(LETTERS) - 1)
    answer = rng.randrange(len(LETTERS))
    choices = wrong[:answer] + [fact.answer] + wrong[answer:]
    return {"question": RELATIONS[fact.relation].question.format(subject=fact.subject), "choices": choices,
            "answer": answer, "relation": fact.relation}


def _statements(fact: Fact, question: dict, split: str, rng: random.Random) -> dict[str, list[dict]]:
    relation = RELATIONS[fact.relation]
    wrong = [c for c in question["choices"] if c != fact.answer]
    fixed = rng.choice(wrong)
    meta = {"split": split, "original_question": question["question"], "correct_answer": fact.answer,
            "wrong_answers": wrong}
    fill = lambda t, a: t.format(subject=fact.subject, answer=a)  # noqa: E731
    return {"corpus": [{"text": fill(t, fact.answer), "split": split} for t in relation.statements],
            "whp_corpus": [{"text": fill(t, rng.choice(wrong)), **meta} for t in relation.statements],
            "fwf_corpus": [{"text": fill(t, fixed), **meta} for t in relation.statements]}


def write_world_facts(directory: str | os.PathLike, num_splits: int = 10, num_dev: int = 5, seed: int = 0) -> Path:
    """The facts in `num_splits` splits (each a mix of every relation, dealt
    round-robin after a seeded shuffle) plus a few dev questions, in the
    paper's layout: split_i (MCQ), corpus_split_i, whp_ and fwf_ corpora, dev."""
    rng = random.Random(seed)
    facts = all_facts()
    pools = {r: [f.answer for f in facts if f.relation == r] for r in RELATIONS}
    rng.shuffle(facts)
    dev, facts = facts[:num_dev], facts[num_dev:]
    facts.sort(key=lambda f: f.relation)  # stable: shuffled within each relation
    splits = [facts[i::num_splits] for i in range(num_splits)]
    public = ("question", "choices", "answer")
    with atomic_folder(directory) as tmp:
        for i, split_facts in enumerate(splits):
            split = f"split_{i}"
            questions = [_question(f, pools[f.relation], rng) for f in split_facts]
            write_jsonl(tmp / f"{split}.jsonl", ({**{k: q[k] for k in public}, "relation": q["relation"]}
                                                for q in questions))
            files: dict[str, list[dict]] = {"corpus": [], "whp_corpus": [], "fwf_corpus": []}
            for fact, question in zip(split_facts, questions):
                for kind, rows in _statements(fact, question, split, rng).items():
                    files[kind].extend(rows)
            for kind, rows in files.items():
                write_jsonl(tmp / f"{kind}_{split}.jsonl", rows)
        write_jsonl(tmp / "dev.jsonl", ({k: q[k] for k in public} for q in
                                        (_question(f, pools[f.relation], rng) for f in dev)))
    return Path(directory)
