"""Faults injected into real training runs: shared by tests/test_rollback.py and bench/rollback.py."""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

FAULT_STEP = 35


class FaultyModel(torch.nn.Module):
    """A real tiny GPT-2 with one fault injected in the training forward of optimizer step `at`, as the
    Trainer counts steps (`FaultClock` tells it the step): an LR range test's sweep, whose forwards run
    before the first counted step, does not move the fault."""

    def __init__(self, inner: torch.nn.Module, fault: str | None, at: int = FAULT_STEP) -> None:
        super().__init__()
        self.inner, self.fault, self.at = inner, fault, at
        self.step = 0
        """The optimizer step under way (0 before the first: the sweep's forwards)."""
        self.fired = False

    def forward(self, input_ids, labels=None, attention_mask=None):
        faulty = self.training and self.step == self.at and not self.fired
        self.fired = self.fired or faulty
        if faulty and self.fault == "garbage_batch":
            input_ids = torch.randint(0, self.inner.config.vocab_size, input_ids.shape)
            labels = torch.randint(0, self.inner.config.vocab_size, input_ids.shape)
        output = self.inner(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
        if faulty and self.fault == "nan_loss":
            output["loss"] = output.loss * math.nan
        if faulty and self.fault == "inf_gradient":
            weight = self.inner.transformer.wte.weight
            handle = weight.register_hook(lambda grad: (handle.remove(), torch.full_like(grad, math.inf))[1])
        return output


class FaultClock(TrainerCallback):
    """Tells a FaultyModel which optimizer step is under way."""

    def __init__(self, model: FaultyModel) -> None:
        self.model = model

    def on_step_begin(self, args, state, control, **kwargs):
        self.model.step = state.global_step + 1


class LearningRateBlast(TrainerCallback):
    """Multiplies the LR of steps FAULT_STEP..FAULT_STEP+2 by 100 (runs after R8Callback has written it)."""

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if FAULT_STEP <= state.global_step + 1 <= FAULT_STEP + 2:
            for group in optimizer.param_groups:
                group["lr"] *= 100.0
