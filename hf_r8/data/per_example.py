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

Which loss a model uses is a guess (its `loss_function`; a model wrapped in a user module has none), so
`LossAgreement` proves it on the first batches: the batch loss the per-example losses imply must be the
model's own `loss`, or the caller falls back to the surprise estimate. The outputs are those of the first
training forward (`keep_first_training_output`), and an MoE model's loss is compared without its router
load-balancing term (`router_aux_term`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hf_r8.runtime.distributed import sum_across_processes

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


@dataclass
class ExampleLosses:
    """One loss per example, and the batch loss those imply under each normalisation a model may use."""

    losses: torch.Tensor
    """float32 `[batch]`; NaN for a sequence without target tokens."""
    batch_losses: tuple[torch.Tensor, ...]
    """Token losses: their sum over the batch's target tokens divided by the target-token count, and by
    `num_items_in_batch` when given (a model normalising over the whole accumulated batch). Otherwise the mean."""


@torch.no_grad()
def example_losses(outputs: Mapping[str, Any], labels: torch.Tensor | None, shifts_labels: bool,
                   num_items_in_batch: torch.Tensor | int | None = None) -> ExampleLosses | None:
    """Each example's loss and the batch losses it implies, or None when the loss cannot be recomputed."""
    tokens = _token_losses(outputs, labels, shifts_labels)
    if tokens is not None:
        losses, mask = tokens
        sums, counts = losses.sum(dim=1), mask.sum(dim=1)
        batch_losses = (sums.sum() / counts.sum(),)
        if num_items_in_batch is not None:
            batch_losses += (sums.sum() / num_items_in_batch,)
        return ExampleLosses(sums / counts, batch_losses)  # 0/0 = NaN for a sequence without targets
    logits = outputs.get("logits")
    if _is_classification(logits, labels):
        losses = F.cross_entropy(logits.detach().float(), labels, reduction="none")
        return ExampleLosses(losses, (losses.mean(),))
    if (torch.is_tensor(logits) and torch.is_tensor(labels) and labels.is_floating_point()
            and logits.numel() == labels.numel() == labels.shape[0]):
        losses = (logits.detach().float().reshape(-1) - labels.float().reshape(-1)) ** 2  # one regression target
        return ExampleLosses(losses, (losses.mean(),))
    return None


def per_example_losses(outputs: Mapping[str, Any], labels: torch.Tensor | None,
                       shifts_labels: bool) -> torch.Tensor | None:
    """A float32 tensor with one loss per example, or None when the loss cannot be recomputed."""
    recomputed = example_losses(outputs, labels, shifts_labels)
    return None if recomputed is None else recomputed.losses


class LossAgreement:
    """Proves on the first batches that recomputed per-example losses are the model's own, or that they are not.

    A batch agrees when one of the batch losses its per-example losses imply (`ExampleLosses.batch_losses`:
    token-weighted for token losses, as a causal LM averages) equals the model's own `loss`, less any auxiliary
    term the model adds to it (an MoE router's weighted load-balancing loss), within `rel_tol`/`abs_tol`.
    `batches` agreeing batches prove the losses exact for the rest of the run; one disagreeing batch (on any
    process: every process decides the same) proves them wrong, for good. A batch without a finite model loss
    proves nothing and is used as it is.

    Args:
        batches: how many agreeing batches make the proof (each costs one device sync).
        rel_tol: relative tolerance; a wrong label shift is off by percents, float32 rounding by ~1e-6.
        abs_tol: absolute tolerance, for losses near zero.
    """

    def __init__(self, batches: int = 3, rel_tol: float = 1e-3, abs_tol: float = 1e-6) -> None:
        if batches < 1:
            raise ValueError(f"batches={batches!r}: must be >= 1")
        self.batches = batches
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol
        self.agreed = 0
        self.verdict: bool | None = None
        """None while unproven, True once proven exact, False once a batch disagreed."""
        self.disagreement: tuple[float, float] | None = None
        """(implied batch loss, model loss) of this process's batch when the verdict became False."""

    def accepts(self, recomputed: ExampleLosses, model_loss: Any, auxiliary_loss: torch.Tensor | float = 0.0) -> bool:
        """Whether `recomputed` may be used as exact for this batch. A collective while unproven, when the
        model returned a loss: every process calls it for the same batches."""
        if self.verdict is not None:
            return self.verdict
        if not torch.is_tensor(model_loss) or model_loss.numel() != 1:
            return True  # nothing to compare with (a loss computed outside the model): trusted as recomputed
        if torch.is_tensor(auxiliary_loss):
            auxiliary_loss = auxiliary_loss.to(model_loss.device)
        reference = model_loss.detach().float().reshape(()) - auxiliary_loss
        implied = torch.stack([loss.float().reshape(()) for loss in recomputed.batch_losses]).to(reference.device)
        finite = torch.isfinite(reference) & torch.isfinite(implied).any()
        close = torch.isclose(implied, reference.expand_as(implied), rtol=self.rel_tol, atol=self.abs_tol).any()
        # [disagreeing processes, inconclusive processes], summed over processes in one collective
        counts = sum_across_processes(torch.stack([finite & ~close, ~finite]).float())
        disagreeing, inconclusive = counts.tolist()
        if disagreeing:
            self.verdict = False
            self.disagreement = (float(implied[0]), float(reference))
            return False
        if not inconclusive:
            self.agreed += 1
            if self.agreed >= self.batches:
                self.verdict = True
        return True


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


def keep_first_training_output(captured: list[Any]) -> Any:
    """A forward hook keeping the first training forward's outputs that carry gradients.

    Not `return_outputs=True`: some trainers (TRL's SFTTrainer) run an extra forward to build the
    outputs they return, and others run extra no-grad forwards (metrics, a reference model) inside
    `compute_loss`; the loss that trains is the first forward with gradients.
    """

    def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
        if not captured and module.training and torch.is_grad_enabled():
            captured.append(output)

    return keep


def router_aux_term(model: torch.nn.Module, outputs: Mapping[str, Any]) -> torch.Tensor | float:
    """What an MoE model adds to its loss beyond the per-example loss: its router load-balancing `aux_loss`
    times the coefficient it is weighted by (an attribute of the model or of its config); 0 for other models."""
    aux_loss = outputs.get("aux_loss")
    if not torch.is_tensor(aux_loss) or aux_loss.numel() != 1:
        return 0.0
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for owner in (model, text_config):
        for name in ("router_aux_loss_coef", "aux_loss_coef"):
            coefficient = getattr(owner, name, None)
            if isinstance(coefficient, (int, float)):
                return coefficient * aux_loss.detach().float().reshape(())
    return 0.0
