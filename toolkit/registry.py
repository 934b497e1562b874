"""The method registry: everything method-specific, one row each. A
method's module registers its row (`register`); a plugin module named in
`plugins:` does the same."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from toolkit.objective import Objective
from toolkit.settings import POSITIVE_INTS, Allowed, UnlearnSettings


@dataclass(frozen=True)
class Axis:
    """A sweep axis of one method: a GridPoint field and the config list it comes from."""

    field: str
    key: str
    allowed: Allowed


@dataclass(frozen=True)
class Method:
    """One unlearning method. Adding a method is one `register` call (in its
    own module, or a plugin module named in `plugins: [module]`), one
    objective and one block in `unlearn.types_config`."""

    objective: Callable[[UnlearnSettings], Objective]  # builds the stage runner's objective
    trains_on: str = "unlearn_files"  # the DatasetFiles corpus it trains on (data_format CORPUS)
    mcq: bool = True  # whether unlearn.data_format=MCQ applies (False: it needs its own corpora)
    lora: bool = False  # trains LoRA adapters, swept over unlearn.lora_ranks
    axis: Axis | None = None  # a sweep axis of its own
    settings: type | None = None  # its own settings, built from its config block (plus the axis value)

    @property
    def axes(self) -> list[Axis]:
        rank = [Axis("lora_rank", "unlearn.lora_ranks", POSITIVE_INTS)] if self.lora else []
        return rank + ([self.axis] if self.axis else [])


# Filled by the modules that define the methods (unlearn_corpus: GD, WHP, FWF,
# LORA; rmu: CUT) and by plugin modules, each through `register`.
METHODS: dict[str, Method] = {}


def register(name: str, method: Method) -> None:
    """Add a method's row; a name registered twice is a mistake, not an override."""
    if name in METHODS and METHODS[name] != method:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[str(name)] = method


def method_objective(name: str) -> Objective:
    """A method's objective class (its `uses` tells which optional settings it honours)."""
    objective = METHODS[name].objective
    return getattr(objective, "func", objective)
