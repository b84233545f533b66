"""Each example's own loss, recomputed from what the model's forward already returned (no extra forward).

`outputs` is the model's output mapping. What can be split per example:

* causal LM logits `[batch, tokens, vocab]` (labels shifted by one inside the model): token-mean
  cross-entropy per sequence, `-100` ignored; a sequence with no target token gets NaN (the catalog
  skips it);
* a fused LM head's per-token `log_probs` and `label_mask` (TRL's `SFTTrainer`, which never builds
  the logits): the same token mean, from the negative log-probabilities;
* classification (logits `[batch, classes]`, integer labels `[batch]`): cross-entropy per example;
* regression with one target (logits `[batch]` or `[batch, 1]`, float labels `[batch]`): squared error.

Anything else returns None, and the caller falls back to the catalog's surprise estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _token_losses(outputs: Mapping[str, Any], labels: torch.Tensor | None,
                  shifts_labels: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`[batch, tokens]` float32 losses (0 where ignored) and the target mask, for token-level losses."""
    log_probs, label_mask = outputs.get("log_probs"), outputs.get("label_mask")
    if torch.is_tensor(log_probs) and torch.is_tensor(label_mask) and log_probs.dim() == 2:
        return -log_probs.float() * label_mask, label_mask
    logits = outputs.get("logits")
    if not (torch.is_tensor(logits) and torch.is_tensor(labels)):
        return None
    if logits.dim() == 3 and labels.dim() == 2 and logits.shape[:2] == labels.shape:
        if shifts_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        # -log p(label) = logsumexp(logits) - logits[label]: one pass over the vocabulary and no copy of the
        # logits (cross_entropy would first copy this view; twice the time for a large vocabulary).
        logits = logits.float()
        targets = labels != IGNORE_INDEX
        picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (torch.logsumexp(logits, dim=-1) - picked).masked_fill(~targets, 0.0), targets
    return None


def _is_classification(logits: Any, labels: Any) -> bool:
    return (torch.is_tensor(logits) and torch.is_tensor(labels) and logits.dim() == 2 and labels.dim() == 1
            and not labels.is_floating_point() and logits.shape[0] == labels.shape[0] and logits.shape[1] > 1)


@torch.no_grad()
def per_example_losses(outputs: Mapping[str, Any], labels: torch.Tensor | None,
                       shifts_labels: bool) -> torch.Tensor | None:
    """A float32 tensor with one loss per example, or None when the loss cannot be recomputed."""
    tokens = _token_losses(outputs, labels, shifts_labels)
    if tokens is not None:
        losses, mask = tokens
        return losses.sum(dim=1) / mask.sum(dim=1)  # 0/0 = NaN for a sequence without targets
    logits = outputs.get("logits")
    if _is_classification(logits, labels):
        return F.cross_entropy(logits.detach().float(), labels, reduction="none")
    if (torch.is_tensor(logits) and torch.is_tensor(labels) and labels.is_floating_point()
            and logits.numel() == labels.numel() == labels.shape[0]):
        return (logits.detach().float().reshape(-1) - labels.float().reshape(-1)) ** 2  # one regression target
    return None


def weighted_loss(outputs: Mapping[str, Any], labels: torch.Tensor | None, weights: torch.Tensor,
                  shifts_labels: bool, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | None:
    """The batch loss with each example's loss multiplied by its weight, normalised like the stock loss.

    Token losses: sum_i w_i * sum_t loss_it / (num_items_in_batch, or the target-token count);
    classification: mean_i w_i * loss_i. With all weights 1 this is the model's own loss. None where
    `per_example_losses` would return None for a reason other than regression.
    """
    tokens = _token_losses(outputs, labels, shifts_labels)
    if tokens is not None:
        losses, mask = tokens
        denominator = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        return (losses.sum(dim=1) * weights.to(losses.device, torch.float32)).sum() / denominator
    logits = outputs.get("logits")
    if _is_classification(logits, labels):
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        return (losses * weights.to(losses.device, torch.float32)).mean()
    return None
