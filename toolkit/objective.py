"""The training objective protocol: what a method gives the stage runner.
It lives apart from the runner so that the registry and the planner see it
without importing torch or the training stack."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

from toolkit.settings import UnlearnSettings

if TYPE_CHECKING:  # the runner imports this module, never the other way round
    import torch

    from toolkit.stage import Stage


class Objective(Protocol):
    """What a stage trains. `uses` names the optional unlearning settings it
    honours ("lora", "freeze_layers"); the planner refuses the others when set."""

    uses: frozenset[str]

    def prepare(self, model, stage: Stage): ...  # returns the model to train (e.g. wrapped with LoRA)

    def epoch_steps(self, epoch: int) -> Sequence: ...  # one item per optimizer step

    def loss(self, model, step) -> tuple[torch.Tensor, dict[str, float]]: ...


OPTIONAL_SETTINGS = {"lora": "unlearn.lora_*", "freeze_layers": "unlearn.freeze_layers"}


def unused_settings(settings: UnlearnSettings, uses: Iterable[str]) -> list[str]:
    """The optional settings set for this run that its objective would ignore."""
    return [key for name, key in OPTIONAL_SETTINGS.items() if getattr(settings, name) and name not in uses]
