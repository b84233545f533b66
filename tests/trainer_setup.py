"""What tests of real Trainer runs share: the tiny models' vocabulary, a scripted-loss wrapper and small
Trainer arguments (torch and transformers: `tests/control/` does without them)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import TrainingArguments

VOCAB_SIZE = 512


class ScriptedLossModel(torch.nn.Module):
    """A real GPT-2 whose training loss *value* follows a script while its gradient stays the real one.

    loss = real - real.detach() + script(step): backward sees the real loss, the Trainer and every
    callback see the scripted number. A non-finite scripted value gets a zero gradient instead.
    """

    def __init__(self, inner: torch.nn.Module, script: Callable[[int], float]) -> None:
        super().__init__()
        self.inner = inner
        self.script = script
        self.training_forwards = 0

    def forward(self, input_ids, labels=None, attention_mask=None):
        output = self.inner(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
        if not self.training or labels is None:
            return output
        self.training_forwards += 1
        value = self.script(self.training_forwards)
        real = output.loss
        loss = real - real.detach() + value if math.isfinite(value) else real * 0.0 + value
        return {"loss": loss, "logits": output.logits}


def training_args(output_dir, **overrides) -> TrainingArguments:
    """Small, quiet, CPU-only arguments; tests override what they are about."""
    values = dict(
        output_dir=str(output_dir), max_steps=40, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
        lr_scheduler_type="constant", seed=0, dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def as_saved_by_version_2(r8_state: dict) -> dict:
    """An R8Callback checkpoint entry as hf_r8 wrote it before version 3: the engine's state flattened into it."""
    rest = {key: value for key, value in r8_state.items() if key not in ("engine", "version")}
    engine = {key: value for key, value in r8_state["engine"].items() if key != "version"}
    return {"version": 2, **engine, **rest}
