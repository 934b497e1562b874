"""Names shared by every stage: the methods, loss types, data formats and
datasets, and the answer letters."""

from __future__ import annotations

from enum import Enum, auto

LETTERS = "ABCD"
CHANCE = 1 / len(LETTERS)
# The probes beside RTT, as named in the rows and the table's columns.
PROBES = ("lora_rtt", "quant8", "quant4")
IGNORE_INDEX = -100


def on_log2_budget(step: int) -> bool:
    """Steps 1, 2, 4, 8, ...: the attacker's budget on a log scale (ft.budget: log2), where RTT scores V."""
    return step > 0 and step & (step - 1) == 0


class _Named(str, Enum):
    """An enum whose members are their own names as strings, so a member and
    its name compare equal and CSV cells and JSON need no conversion."""

    @staticmethod
    def _generate_next_value_(name, start, count, last_values):
        return name

    def __str__(self) -> str:
        return self.value


class UnlearnType(_Named):
    CUT = auto()
    GD = auto()
    WHP = auto()
    FWF = auto()
    LORA = auto()


class LossType(_Named):
    LETTER = auto()
    CORPUS = auto()
    LETTER_ANSWER = auto()
    QUESTION_LETTER_ANSWER = auto()
    QUESTION_ANSWER = auto()
    NUMBER = auto()


class DataFormat(_Named):
    CORPUS = auto()
    MCQ = auto()


class Datasets(_Named):
    YEARS_MMLU_RETAIN = auto()
    MMLU = auto()
    RANDOM_BD_SAME_RETAIN = auto()
    WORLD_FACTS = auto()  # facts the model learned in pretraining (toolkit.world_facts)
    WORLD_FACTS_KNOWN = auto()  # those the embedded model answers under choice scoring
    WORLD_FACTS_REMAPPED = auto()  # the same questions, each answer moved to another fact (the floor)
    # The second edition's: the same facts and questions, every fact about one country in one split
    WORLD_FACTS_BY_COUNTRY = auto()
    WORLD_FACTS_BY_COUNTRY_KNOWN = auto()
    WORLD_FACTS_BY_COUNTRY_REMAPPED = auto()
    RANDOM_BD_ALL_SPLITS = auto()
    WMDP_MCQ_CORPUS = auto()


# The stop rule's one reason that is not a flag (a run that reached its forget target).
STOP_TARGET = "target"

# The bit widths the quantization probe rounds weights to.
QUANT_BITS = (8, 4)
