"""Shared fixtures: the offline tokenizer and corpus, a tiny GPT-2 (the helpers of real Trainer runs are in
trainer_setup.py). Nothing here imports torch or transformers until a fixture needs them: `tests/control/`
runs with them blocked."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from hf_r8 import R8Config

# CI must not fail on a different random draw than the one a developer saw: derandomize there.
# Locally the property tests keep exploring new inputs on every run.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tokenizer():
    from hf_r8.demo.offline import build_tokenizer
    from tests.trainer_setup import VOCAB_SIZE

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
    from hf_r8.demo.offline import language_modeling_dataset

    return language_modeling_dataset(tokenizer, seq_len=32, max_examples=512)


@pytest.fixture
def model(tokenizer):
    from hf_r8.demo.offline import tiny_gpt2

    return tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
