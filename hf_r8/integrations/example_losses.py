"""Each example's loss in an R8Trainer training micro-batch, and InfoBatch's reweighting of the batch loss.

The per-example losses are recomputed from the forward's outputs (`data/per_example.py`) and trusted only once
the first batches prove them to be the model's own loss (`LossAgreement`): a model wrapped in the user's own
module, packed sequences or paired rows (DPO) give no one-loss-per-example, and the catalog then falls back to
the batch-loss surprise estimate, said once in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from hf_r8.data.per_example import LossAgreement, example_losses, router_aux_term, weighted_loss
from hf_r8.data.sampler import BalancedQuartileSampler
from hf_r8.integrations.compat import is_causal_lm_loss, loss_scaled_across_processes

logger = logging.getLogger(__name__)


class ExampleLosses:
    """The per-example losses of one R8Trainer's training micro-batches."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.agreement = LossAgreement()
        self._fallback_logged = False
        self._weights: tuple[int, torch.Tensor] | None = None
        """(epoch, InfoBatch's loss weights of that epoch on the loss's device)."""

    def of(self, outputs: Mapping[str, Any], labels: torch.Tensor | None, indices: torch.Tensor,
           num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | None:
        """This micro-batch's per-example losses, where they are one per example and agree with the model's loss."""
        agreement = self.agreement
        if agreement.verdict is False:
            return None  # refuted on the first batches: not recomputed again
        recomputed = example_losses(outputs, labels, self.shifts_labels(), num_items_in_batch)
        if recomputed is None or recomputed.losses.numel() != indices.numel():
            return None  # packed sequences (padding-free), paired rows (DPO): not one loss per example
        if agreement.verdict is True:
            return recomputed.losses  # proven: no comparison (and no sync) on later batches
        if agreement.accepts(recomputed, outputs.get("loss"), router_aux_term(self._model(), outputs)):
            return recomputed.losses
        if agreement.disagreement is not None:
            implied, model_loss = agreement.disagreement
            self.warn_fallback(
                f"R8: the per-example losses R8 recomputes average to {implied:.4f} (token-weighted), but the "
                f"model's own loss is {model_loss:.4f}: the model's loss is not the one R8 assumes (a model "
                "wrapped in your own module hides its label shift and loss function). The catalog uses the "
                "batch-loss surprise estimate.")
        return None

    def reweighted(self, loss: torch.Tensor, outputs: Mapping[str, Any], labels: torch.Tensor | None,
                   indices: torch.Tensor, num_items_in_batch: torch.Tensor | int | None,
                   sampler: BalancedQuartileSampler) -> torch.Tensor:
        """InfoBatch: the same loss, with the kept well-learned examples weighted 1/(1 - prune_ratio)."""
        epoch, _ = sampler.current_epoch_plan
        if self._weights is None or self._weights[0] != epoch:
            self._weights = (epoch, torch.as_tensor(sampler.loss_weights, device=loss.device))
        weights = self._weights[1][indices.to(loss.device)]
        shifts = self.shifts_labels()
        weighted = weighted_loss(outputs, labels, weights, shifts, num_items_in_batch)
        if weighted is None:
            return loss
        # Keep the stock loss (label smoothing, auxiliary terms) and add only what the weights change,
        # scaled as the stock compute_loss scales a token-averaged loss across processes.
        unweighted = weighted_loss(outputs, labels, torch.ones_like(weights), shifts, num_items_in_batch)
        trainer = self.trainer
        scale = trainer.accelerator.num_processes if loss_scaled_across_processes(trainer, num_items_in_batch) else 1
        return loss + (weighted - unweighted) * scale

    def shifts_labels(self) -> bool:
        """Causal LMs predict token t+1 at position t: their per-example loss needs the label shift."""
        model = self._model()
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        return is_causal_lm_loss(model) and not encoder_decoder

    def warn_fallback(self, message: str) -> None:
        """Say once why the catalog uses the batch-loss surprise estimate."""
        if not self._fallback_logged:
            logger.warning(message)
            self._fallback_logged = True

    def _model(self) -> torch.nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)
