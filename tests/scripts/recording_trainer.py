"""R8Trainer that records the example indices of every training micro-batch (for the torchrun scripts here)."""

from __future__ import annotations

from hf_r8 import R8Trainer


class RecordingR8Trainer(R8Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "r8_index" in inputs and model.training:
            self.seen_indices = getattr(self, "seen_indices", []) + [inputs["r8_index"].tolist()]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
