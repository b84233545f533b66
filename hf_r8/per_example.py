"""Each example's own loss, recomputed from the logits the model already returned (no extra forward).

* causal LM (labels shifted by one inside the model): token-mean cross-entropy per sequence,
  `-100` ignored; a sequence with no target token gets NaN (the catalog skips it);
* classification (logits `[batch, classes]`, integer labels `[batch]`): cross-entropy per example;
* regression with one target (logits `[batch]` or `[batch, 1]`, float labels `[batch]`): squared error.

Anything else returns None, and the caller falls back to the catalog's surprise estimate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@torch.no_grad()
def per_example_losses(logits: torch.Tensor, labels: torch.Tensor, shifts_labels: bool) -> torch.Tensor | None:
    """A float32 tensor with one loss per example, or None when the loss cannot be recomputed."""
    if not (torch.is_tensor(logits) and torch.is_tensor(labels)) or logits.shape[0] != labels.shape[0]:
        return None
    logits = logits.detach().float()
    if logits.dim() == 3 and labels.dim() == 2 and logits.shape[1] == labels.shape[1]:
        if shifts_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        counted = (labels != IGNORE_INDEX).sum(dim=1)
        return tokens.sum(dim=1) / counted  # 0/0 = NaN for a sequence without targets
    if logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point() and logits.shape[1] > 1:
        return F.cross_entropy(logits, labels, reduction="none")
    if labels.is_floating_point() and logits.numel() == labels.numel() == labels.shape[0]:
        return (logits.reshape(-1) - labels.float().reshape(-1)) ** 2  # one regression target per example
    return None


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, shifts_labels: bool,
                  num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | None:
    """The batch loss with each example's loss multiplied by its weight, normalised like the stock loss.

    Causal LM / token losses: sum_i w_i * sum_t loss_it / (num_items_in_batch, or the target-token count);
    classification: mean_i w_i * loss_i. With all weights 1 this is the model's own loss. None where
    `per_example_losses` would return None.
    """
    weights = weights.to(logits.device, torch.float32)
    if logits.dim() == 3 and labels.dim() == 2 and logits.shape[1] == labels.shape[1]:
        if shifts_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        tokens = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        denominator = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE_INDEX).sum()
        return (tokens.sum(dim=1) * weights).sum() / denominator
    if logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point() and logits.shape[1] > 1:
        return (F.cross_entropy(logits.float(), labels, reduction="none") * weights).mean()
    return None
