"""A method added through the registry alone: one row and one objective (the
config block comes from the command line). Used by a pipeline test as a
plugin (`plugins=[toy_method]`): forget-only gradient ascent, no retain term."""

from __future__ import annotations

from dataclasses import dataclass

import pipeline
import unlearn_corpus as uc


@dataclass
class ForgetOnlyAscent:
    settings: uc.UnlearnSettings
    uses: frozenset[str] = frozenset()

    def prepare(self, model, stage: uc.Stage):
        self.stage, self.data = stage, uc.ForgetRetainData.encode(self.settings, stage)
        return model

    def epoch_steps(self, epoch: int):
        return self.data.epoch_steps(epoch)

    def loss(self, model, step):
        forget_batch, _ = step
        nll = uc.mean_token_nll(model, self.stage.batch(forget_batch))
        return -nll, {"forget_nll": nll.item()}


pipeline.METHODS["TOY"] = pipeline.Method(ForgetOnlyAscent)
