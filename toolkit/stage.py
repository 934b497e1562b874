"""The stage runner: one training loop for unlearning, RMU, RTT and
teaching (load, evaluate, train under the stop rule, save), with its
progress, phase clock and wandb run."""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from toolkit.device import DevicePolicy, resolve_device_policy
from toolkit.evaluation import AccuracyLog, Check, Evaluator
from toolkit.models import is_peft, load_model, load_tokenizer, save_checkpoint
from toolkit.names import STOP_TARGET, LossType
from toolkit.objective import OPTIONAL_SETTINGS, Objective, unused_settings  # noqa: F401 - the protocol, re-exported
from toolkit.losses import grouped_token_nll, mean_token_nll
from toolkit.prompts import Encoded, collate, encode_files, shuffled_batches
from toolkit.settings import EvalFiles, SaveSettings, StopRule, TrainSettings, key_settings
from toolkit.training import (
    count_parameters,
    enable_gradient_checkpointing,
    make_optimizer,
    seed_everything,
    warmup_then_constant,
)
from toolkit.weight_delta import starting_weights, update_size

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """What an objective gets to prepare its model and data."""

    settings: TrainSettings
    policy: DevicePolicy
    tokenizer: Any
    rng: random.Random

    def encode(self, names: Sequence[str], loss_type: LossType, max_samples: int | None = None) -> list[Encoded]:
        return encode_files(self.tokenizer, self.settings.data_root, names, loss_type, max_samples=max_samples,
                            rng=self.rng, max_length=self.settings.max_length)

    def batch(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id, self.policy.device)

    def nll(self, model, examples: Sequence[Encoded]) -> torch.Tensor:
        """The examples' mean token NLL, computed as the `train:` settings say."""
        return mean_token_nll(model, self.batch(examples), self.settings.head_at_labels)

    def grouped_nll(self, model, groups: Sequence[Sequence[Encoded]]) -> list[torch.Tensor]:
        """Each non-empty group's mean token NLL, from one forward pass over all of them."""
        groups = [g for g in groups if g]
        return grouped_token_nll(model, self.batch([e for g in groups for e in g]), [len(g) for g in groups],
                                 self.settings.head_at_labels)

    def batches(self, examples: Sequence[Encoded], batch_size: int) -> list[list[Encoded]]:
        """An epoch's batches in random order (of similar length, under train.length_buckets)."""
        return shuffled_batches(examples, batch_size, self.rng, self.settings.length_buckets)


@dataclass(frozen=True)
class StopOutcome:
    step: int  # optimizer steps taken
    epoch: int
    reason: str  # "target": forget accuracy reached it; "retain_floor": retain fell below it; "epochs": never stopped
    forget_acc: float
    retain_acc: float

    TARGET: ClassVar[str] = STOP_TARGET  # the one reason that is not a flag

    @property
    def reached(self) -> bool:
        return self.reason == self.TARGET


@dataclass
class PhaseClock:
    """Seconds spent per phase of a stage (load, evaluate, steps, checks,
    save): where a run's time goes, written with its row."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - start

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 1) for name, value in self.seconds.items()}


@dataclass
class StageResult:
    forget: AccuracyLog
    retain: AccuracyLog
    trainable_params: int
    steps: int
    stop: StopOutcome | None
    save_path: str | None
    save_format: str | None
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)
    update: dict = field(default_factory=dict)  # a LoRA run's update size (toolkit.weight_delta)
    by_step: AccuracyLog | None = None  # V by optimizer step (RTT scored along its budget)
    retain_by_step: AccuracyLog | None = None  # the retain files by step, where asked


class Progress:
    """A run's progress: a live bar (drawn by the Ray driver when inside a Ray
    worker), a few log lines, or nothing."""

    def __init__(self, mode: str, label: str, total: int | None):
        self.label, self.bar = label, None
        if mode == "auto":
            mode = "bars" if sys.stderr.isatty() else "lines"
        self.mode = mode
        if mode == "bars":
            self.bar = _progress_bar(label, total)

    def expect(self, total: int) -> None:
        """The number of steps, once the first epoch's batches are known."""
        if self.bar is not None and self.bar.total is None:
            self.bar.total = total

    def step(self, metrics: Mapping[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def note(self, message: str) -> None:
        if self.mode == "lines":
            log.info("%s: %s", self.label, message)
        elif self.bar is not None:
            self.bar.set_description(f"{self.label} {message}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_bar(label: str, total: int | None):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        from ray.experimental import tqdm_ray

        return tqdm_ray.tqdm(desc=label, total=total)
    from tqdm.auto import tqdm

    return tqdm(desc=label, total=total, leave=False)


@dataclass
class Training:
    """A stage set up to train: the prepared model, its optimizer and schedule."""

    stage: Stage
    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any

    @classmethod
    def setup(cls, train: TrainSettings, objective: Objective) -> "Training":
        policy = resolve_device_policy(train.device)
        tokenizer, model = load_tokenizer(train.model), load_model(train.model, policy)
        # Seeded after loading: an adapter folder's load draws from the generator (a plain
        # checkpoint's does not), and a LoRA attacker's init must not depend on the format.
        stage = Stage(train, policy, tokenizer, seed_everything(train.seed))
        model = objective.prepare(model, stage)
        if train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        optimizer = make_optimizer(train.optimizer, model, train.lr, policy, train.lion_update)
        return cls(stage, model, objective, optimizer, warmup_then_constant(optimizer, train.warmup_steps))

    def step(self, item) -> dict[str, float]:
        """One optimizer step: the objective's loss under the precision policy, backward, update."""
        with self.stage.policy.autocast():
            loss, metrics = self.objective.loss(self.model, item)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return {"lr": self.scheduler.get_last_lr()[0], **metrics}


def run_stage(train: TrainSettings, evals: EvalFiles, objective: Objective, *,
              stop: StopRule | None = None, save: SaveSettings | None = None,
              budget: Callable[[int], bool] | None = None, budget_retain: bool = False,
              measure_update: bool = False) -> StageResult:
    """Load, prepare, evaluate before training, train `train.epochs` epochs
    (evaluating every `eval_every` and after the last, stopping early under
    the stop rule), save. Every stage's training loop is this one."""
    started, clock = time.monotonic(), PhaseClock()
    with clock.phase("load"):
        training = Training.setup(train, objective)
        model, tokenizer = training.model, training.stage.tokenizer
        evaluator = Evaluator.build(tokenizer, evals, train.data_root, train.k_shot, train.val_batch_size,
                                    training.stage.policy, train.head_at_labels)
        if budget is not None:
            evaluator.by_step = AccuracyLog()
            evaluator.retain_by_step = AccuracyLog() if budget_retain else None
    run = start_wandb(train.wandb_mode, train.wandb_project_name, train.label, key_settings(train))
    trainable, _ = count_parameters(model)
    # a full-parameter unlearning run measures how far it moved against its starting weights (LoRA: its factors)
    start = starting_weights(model) if measure_update and not is_peft(model) else None
    progress = Progress(train.progress, train.label, total=None)
    checker = StopChecker(stop, evaluator, train.seed) if stop is not None and stop.active else None

    def evaluate(epoch: int) -> None:
        with clock.phase("evaluate"):
            forget_acc, retain_acc = evaluator(model, epoch, step)
        run.log({"epoch": epoch, "forget_acc": forget_acc, "retain_acc": retain_acc})
        progress.note(f"epoch {epoch}: forget {forget_acc:.3f}, retain {retain_acc:.3f}")

    step = 0
    evaluate(0)
    outcome = checker.check(model, 0, 0, first=True) if checker else None
    model.train()
    for epoch in range(1, train.epochs + 1):
        if outcome is not None:
            break
        steps = objective.epoch_steps(epoch)
        progress.expect(len(steps) * train.epochs)
        # this epoch's last step, when it is evaluated below (V is scored there once, for both logs)
        evaluated_end = step + len(steps) if epoch % train.eval_every == 0 or epoch == train.epochs else None
        for item in steps:
            with clock.phase("steps"):
                metrics = training.step(item)
            step += 1
            run.log({"epoch": epoch, **metrics})
            progress.step(metrics)
            if budget is not None and budget(step) and step != evaluated_end:
                with clock.phase("evaluate"):
                    run.log({"step": step, "forget_acc_at_step": evaluator.score_at_step(model, step)})
            if checker and step % stop.stop_check_every == 0:
                with clock.phase("checks"):
                    outcome = checker.check(model, step, epoch)
                progress.note(f"step {step}: stop check {checker.describe()}")
                if outcome is not None:
                    break
        if outcome is not None or epoch % train.eval_every == 0 or epoch == train.epochs:
            evaluate(epoch)
    if checker and outcome is None:
        last = train.epochs
        outcome = StopOutcome(step, last, "epochs", evaluator.forget_log.mean_at(last), evaluator.retain_log.mean_at(last))
    if outcome is not None:
        progress.note(f"stopped at step {outcome.step} ({outcome.reason})")
    progress.close()
    run.finish()
    update = update_size(model, start) if is_peft(model) or start else {}
    saved = None
    if save is not None and save.path:
        with clock.phase("save"):
            saved = str(save_checkpoint(model, tokenizer, save.path, save.save_format, train.model))
    fmt = (save.save_format if is_peft(model) else "merged") if saved else None
    return StageResult(evaluator.forget_log, evaluator.retain_log, trainable, step, outcome, saved, fmt,
                       time.monotonic() - started, clock.rounded(), update, evaluator.by_step,
                       evaluator.retain_by_step)


@dataclass
class StopChecker:
    rule: StopRule
    evaluator: Evaluator
    seed: int = 0  # the run's: which questions a check's random sample draws, step by step
    last: tuple[float, float] = (float("nan"), float("nan"))  # the last check's forget and retain (bounds that decided it)

    def check(self, model, step: int, epoch: int, first: bool = False) -> StopOutcome | None:
        """Stop at the first check at or below the forget target; a retain
        accuracy below the floor stops (and flags) the run first."""
        rule = self.rule
        forget, retain = self.last = self.means(model, step, first)
        if rule.stop_retain_floor is not None and retain < rule.stop_retain_floor:
            return StopOutcome(step, epoch, "retain_floor", forget, retain)
        if rule.stop_at_forget_acc is not None and forget <= rule.stop_at_forget_acc:
            return StopOutcome(step, epoch, StopOutcome.TARGET, forget, retain)
        return None

    def describe(self) -> str:
        """The last check's forget and retain accuracy, a bound marked as one
        (">= 0.578 bound"): a check stops scoring once its decision is certain."""
        check = self.evaluator.last_check
        parts = []
        for name, value, scoring in (("forget", self.last[0], check and check.forget),
                                     ("retain", self.last[1], check and check.retain)):
            exact = not scoring or scoring.complete
            parts.append(f"{name} {value:.3f}" if exact else f"{name} >= {value:.3f} (bound)")
        return ", ".join(parts)

    def means(self, model, step: int, first: bool) -> tuple[float, float]:
        """Mean forget and retain accuracy now, as far as the rule needs them:
        exact where the run stops (or could), else a bound that already
        decides it, so a check scores only the questions its decision needs
        (same decision, same recorded values; the rest is scored only if an
        evaluation at this step needs it). With `stop_check_sample`, a random
        sample's bound at confidence 1 - alpha may decide that the run goes
        on; a stop is always decided on counts. At step 0 the evaluation
        before training has already scored the files."""
        ev, rule = self.evaluator, self.rule
        if first:
            return ev.forget_log.mean_at(0), ev.retain_log.mean_at(0)
        floor, target = rule.stop_retain_floor, rule.stop_at_forget_acc

        def scoring(files, side: str):
            rng = random.Random(f"{self.seed}:{step}:{side}")
            return ev.scoring(model, files, rule.stop_check_sample, rule.stop_check_alpha, rng)

        check = ev.last_check = Check(step, scoring(ev.forget, "forget"),
                                      scoring(ev.retain, "retain") if floor is not None else None)
        retain = check.retain.at_least(floor) if check.retain else float("nan")
        below_floor = check.retain is not None and check.retain.complete and retain < floor
        if below_floor or target is None:
            return check.forget.mean(), retain  # a stop records both exactly
        forget = check.forget.above(target)
        if check.forget.complete and forget <= target and check.retain is not None:
            retain = check.retain.mean()  # it stops here: the retain accuracy is recorded too
        return forget, retain


def start_wandb(mode: str, project: str, name: str, config: Mapping):
    """wandb never prompts: its mode is always given (online/offline/disabled)."""
    if mode == "disabled":
        return _NoRun()
    import wandb

    return wandb.init(mode=mode, project=project, name=name, config=dict(config), reinit="create_new")


class _NoRun:
    """wandb disabled: a run that records nothing (and costs no import)."""

    def log(self, *_args, **_kwargs) -> None:
        pass

    def finish(self) -> None:
        pass
