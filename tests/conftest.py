"""Shared fixtures: the offline tokenizer and corpus, a tiny GPT-2, and a scripted-loss wrapper."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import settings
from transformers import TrainingArguments

from hf_r8 import R8Config
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2

VOCAB_SIZE = 512

# CI must not fail on a different random draw than the one a developer saw: derandomize there.
# Locally the property tests keep exploring new inputs on every run.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(VOCAB_SIZE)


@pytest.fixture
def reward_rl_with_reward_momentum():
    """The `reward_rl` preset with the reward momentum rule on (off in the preset: see configs/reward_rl.yaml)
    and a trend test that starts after 4 rewards, for short runs."""
    config = R8Config.from_preset("reward_rl").to_dict()
    config["momentum"]["rule"] = "reward"
    config["reward"]["trend_window"] = 8
    return R8Config.from_dict(config)


@pytest.fixture(scope="session")
def lm_dataset(tokenizer):
    return language_modeling_dataset(tokenizer, seq_len=32, max_examples=512)


@pytest.fixture
def model(tokenizer):
    return tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)


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
