"""Token losses: mean NLL over the positions that carry a label, for one
batch or for groups of rows in one forward pass."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from toolkit.names import IGNORE_INDEX


def decoder_and_head(model):
    """The transformer body and the LM head, so logits are computed only where
    they are needed: at 49k vocabulary the head is a large share of a step."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def hidden_states(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    decoder, _ = decoder_and_head(model)
    return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def mean_token_nll(model, batch: Mapping[str, torch.Tensor], head_at_labels: bool = True) -> torch.Tensor:
    """Mean next-token NLL over labelled tokens; padding and prefixes carry no weight."""
    return grouped_token_nll(model, batch, [batch["input_ids"].shape[0]], head_at_labels)[0]


def grouped_token_nll(model, batch: Mapping[str, torch.Tensor], sizes: Sequence[int],
                      head_at_labels: bool = True) -> list[torch.Tensor]:
    """The mean token NLL of consecutive groups of rows (e.g. forget, then
    retain) from one forward pass: rows of a right-padded causal batch do not
    see each other, and one pass of 8 rows costs less than two of 4 (the
    weight gradients are accumulated once). The LM head runs only at the
    labelled positions (`head_at_labels=false`: at every position, as a plain
    forward computes the logits; the same loss)."""
    hidden = hidden_states(model, batch)
    targets = batch["labels"][:, 1:]
    _, head = decoder_and_head(model)
    logits = None if head_at_labels else head(hidden[:, :-1])
    out, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        keep = targets[rows] != IGNORE_INDEX
        scores = head(hidden[rows, :-1][keep]) if logits is None else logits[rows][keep]
        out.append(F.cross_entropy(scores.float(), targets[rows][keep]))
        start += size
    return out
