"""TRL's PPOTrainer with R8Callback: its own loop, one `on_step_end` per PPO update of several optimizer steps.

PPOTrainer lives in `trl.experimental.ppo` up to TRL 1.12 and is gone after: these tests run in the second
environment `make test-ppo` builds (TRL 1.12) and are skipped in the main one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2ForSequenceClassification

from hf_r8 import R8Callback, R8Config
from hf_r8.demo.offline import english_paragraphs, tiny_gpt2
from tests.test_callback import UsedLearningRates, logged

ppo = pytest.importorskip("trl.experimental.ppo", reason="this TRL has no PPOTrainer (run `make test-ppo`)")

pytestmark = pytest.mark.integration

UPDATES = 8
BATCH = 8
OPTIMIZER_STEPS_PER_UPDATE = 4  # 2 PPO epochs x 2 mini-batches


class RisingScore(torch.nn.Module):
    """A reward head whose score grows with every scoring call, whatever the text: the reward trend is known."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return hidden.new_full((*hidden.shape[:-1], 1), 0.05 * self.calls)


def _ppo_run(tokenizer, tmp_path, callbacks, optimizer_groups=None, save_steps=None, **ppo_args):
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    prompts = [text[:40] for text in english_paragraphs()[:32]]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(prompt)["input_ids"] for prompt in prompts]})
    policy = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128)
    head_config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                             num_labels=1, pad_token_id=tokenizer.pad_token_id)
    reward_model = GPT2ForSequenceClassification(head_config)
    reward_model.score = RisingScore()
    value_model = GPT2ForSequenceClassification(head_config)
    optimizers = (None, None)
    if optimizer_groups is not None:
        optimizers = (torch.optim.AdamW(optimizer_groups(policy, value_model)), None)
    args = ppo.PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_mini_batches=2,
                         num_ppo_epochs=2, total_episodes=BATCH * UPDATES, response_length=8, learning_rate=1e-3,
                         report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0, stop_token=None,
                         missing_eos_penalty=None, num_sample_generations=0,
                         save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, **ppo_args)
    trainer = ppo.PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                             reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                             optimizers=optimizers, callbacks=callbacks)
    trainer.train()
    return trainer


def test_rising_score_raises_the_lr_once_per_update(tokenizer, tmp_path, reward_rl_with_reward_momentum):
    r8, used = R8Callback(reward_rl_with_reward_momentum), UsedLearningRates()
    trainer = _ppo_run(tokenizer, tmp_path, [r8, used])
    # Every update's score reached the controller in that update (not a step late).
    assert r8.controller.reward.ema.count == UPDATES
    assert logged(trainer, "objective/scores") == pytest.approx([0.05 * (i + 1) for i in range(UPDATES)])
    assert [event for event in r8.events if event.rule.startswith("reward")] and r8.controller.lr_gain() > 1.0
    # The LR is constant within an update and equals what PPO logs as `lr`: the LR used, not the schedule's.
    assert len(used.used) == UPDATES * OPTIMIZER_STEPS_PER_UPDATE
    per_update = [used.used[i:i + OPTIMIZER_STEPS_PER_UPDATE] for i in range(0, len(used.used),
                                                                            OPTIMIZER_STEPS_PER_UPDATE)]
    assert all(len({lrs[0] for lrs in update}) == 1 for update in per_update)
    assert logged(trainer, "lr") == pytest.approx([update[0][0] for update in per_update], rel=1e-9)
    betas = [momenta[0] for momenta in used.momenta]
    assert betas[0] == pytest.approx(0.9) and betas[-1] > betas[0]  # the reward momentum rule on AdamW's beta1
    # The last update used the linear schedule's value (1/UPDATES of the peak) times the gain it logged.
    last_gain = logged(trainer, "r8/lr_gain")[-1]
    assert last_gain > 1.0 and per_update[-1][0][0] == pytest.approx(1e-3 / UPDATES * last_gain, rel=1e-6)


def test_policy_and_value_groups_keep_their_own_state(tokenizer, tmp_path):
    def policy_and_value(policy, value_model):
        return [{"params": list(policy.parameters()), "lr": 1e-3},
                {"params": list(value_model.parameters()), "lr": 5e-4}]

    r8, used = R8Callback(R8Config.from_preset("reward_rl")), UsedLearningRates()
    _ppo_run(tokenizer, tmp_path, [r8, used], optimizer_groups=policy_and_value)
    assert [spec.base_lr for spec in r8.controller.specs] == [1e-3, 5e-4]
    policy_lr, value_lr = used.used[-1]
    # Both groups follow the policy's reward with their own base LR and bounds.
    assert policy_lr / value_lr == pytest.approx(2.0, rel=1e-6)
    assert r8.controller.lr_gain(0) > 1.0 and r8.controller.lr_gain(1) > 1.0


def test_the_logged_kl_reaches_the_controller_and_brakes_above_its_limit(tokenizer, tmp_path):
    config = R8Config.from_preset("reward_rl").to_dict()
    config["reward"]["kl_limit"] = 1e-6  # any positive KL estimate is over the limit
    r8 = R8Callback(R8Config.from_dict(config))
    # k3 is non-negative term by term, so the KL is positive as soon as the policy leaves its reference (the default
    # k1 estimate of a tiny random policy can stay negative for all 8 updates, as it did on one CI machine).
    trainer = _ppo_run(tokenizer, tmp_path, [r8], kl_estimator="k3")
    over = [step + 1 for step, kl in enumerate(logged(trainer, "objective/kl")) if kl > 1e-6]
    brakes = [event for event in r8.events if event.action == "kl_brake"]
    assert over and over[0] <= 2  # the first update moved the policy
    assert brakes and brakes[0].step == over[0] and "above reward.kl_limit=1e-06" in brakes[0].reason


def test_checkpoints_carry_the_controller_state(tokenizer, tmp_path):
    r8 = R8Callback(R8Config.from_preset("reward_rl"))
    _ppo_run(tokenizer, tmp_path, [r8], save_steps=4)
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    r8_state = saved["stateful_callbacks"]["R8Callback"]["attributes"]["r8_state"]["engine"]
    assert r8_state["controller"]["step"] == 4 and r8_state["controller"]["reward"]["ema"]["count"] == 4


def test_the_ppo_example_runs_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    example = Path(__file__).resolve().parent.parent / "examples" / "trl_ppo.py"
    completed = subprocess.run([sys.executable, str(example), "--steps", "3", "--model", "hf-r8-tests/no-such-model",
                                "--output-dir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "offline:tiny-gpt2" in completed.stdout and "final LR gain" in completed.stdout
    assert (tmp_path / "run" / "r8" / "r8_report" / "summary.md").is_file()
