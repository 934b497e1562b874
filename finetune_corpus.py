"""RTT: fine-tune all weights on some forgotten facts (T) and measure how much
comes back on held-out facts (V). The same routine teaches the embedded
demo its made-up facts before unlearning."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

import unlearn_corpus as uc
from pipeline import LossType

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """Per-epoch accuracies (epoch 0 = before fine-tuning); forget = V."""

    forget_accs_local: dict[int, float]
    forget_accs_calibrated_local: dict[int, float]
    retain_accs_local: dict[int, float]
    retain_accs_calibrated_local: dict[int, float]
    save_name: str | None = None


def _mean_by_epoch(by_file: Mapping[str, Mapping[int, float]]) -> dict[int, float]:
    epochs = sorted({e for accs in by_file.values() for e in accs})
    return {e: sum(accs[e] for accs in by_file.values()) / len(by_file) for e in epochs}


def main(
    train_files: Sequence[str] = (),
    val_files: Sequence[str] = (),
    val_retain_files: Sequence[str] = (),
    dev_set: str = "",
    base_model: str = "",
    lr: float = 1e-6,
    epochs: int = 3,
    batch_size: int = 4,
    val_batch_size: int = 8,
    loss_type: LossType = LossType.QUESTION_LETTER_ANSWER,
    extra_corpus_files: Sequence[str] = (),
    data_root: str = "data",
    data_seed: int = 0,
    warmup_steps: int = 0,
    eval_every: int = 1,
    k_shot: int = 0,
    optimizer: str = "lion",
    device: Mapping | None = None,
    max_length: int = 256,
    train_embeddings: bool = True,
    save_name: str | None = None,
    name: str = "rtt",
    project_name: str = "rtt",
    wandb_mode: str = "disabled",
) -> FinetuneResult:
    """Fine-tune on `train_files` (formatted by `loss_type`; `extra_corpus_files`
    add plain-text examples) and evaluate `val_files` and `val_retain_files`
    before training and each `eval_every` epochs."""
    rng = random.Random(data_seed)
    torch.manual_seed(data_seed)
    policy = uc.resolve_device_policy(device)
    tokenizer = uc.load_tokenizer(base_model)
    model = uc.load_model(base_model, policy)
    if not train_embeddings:
        uc.freeze_embeddings(model)

    pairs = uc.load_examples_from(data_root, train_files, loss_type)
    pairs += uc.load_examples_from(data_root, extra_corpus_files, LossType.CORPUS)
    examples = [uc.encode(tokenizer, pair, max_length) for pair in pairs]
    run = uc.start_wandb(wandb_mode, project_name, name, {"lr": lr, "epochs": epochs, "loss_type": loss_type.name})
    evaluator = uc.ForgetRetainEval.load(data_root, val_files, val_retain_files, dev_set=dev_set, k_shot=k_shot,
                                         batch_size=val_batch_size, run=run, name=name)

    def step_loss(batch):
        loss = uc.mean_token_nll(model, uc.collate(batch, tokenizer.pad_token_id, policy.device))
        return loss, {"train_nll": loss.item()}

    uc.fit(model, uc.make_optimizer(optimizer, model, lr, policy), epochs=epochs,
           steps_per_epoch=lambda _: uc.shuffled_batches(examples, batch_size, rng), step_loss=step_loss,
           warmup_steps=warmup_steps, evaluate=lambda epoch: evaluator(model, tokenizer, epoch),
           eval_every=eval_every, desc=name, on_step=run.log)
    run.finish()
    if save_name:
        uc.save_checkpoint(model, tokenizer, save_name)
    return FinetuneResult(
        forget_accs_local=_mean_by_epoch(evaluator.forget_log.accs),
        forget_accs_calibrated_local=_mean_by_epoch(evaluator.forget_log.calibrated),
        retain_accs_local=_mean_by_epoch(evaluator.retain_log.accs),
        retain_accs_calibrated_local=_mean_by_epoch(evaluator.retain_log.calibrated),
        save_name=save_name,
    )
