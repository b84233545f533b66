"""TRL's reward-driven trainers (GRPO, RLOO) with R8Callback: rewards reach the controller and move the LR."""

from __future__ import annotations

import asyncio
import inspect

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from hf_r8 import R8Callback, R8Config
from hf_r8.demo.offline import english_paragraphs, tiny_gpt2
from tests.test_callback import UsedLearningRates, logged

pytestmark = pytest.mark.integration

STEPS = 16


def rising(completions, trainer_state=None, **kwargs):
    """A reward that grows with the step, whatever the completions: the reward trend is known."""
    return [0.05 * trainer_state.global_step] * len(completions)


def _train(trainer_type, config_type, tokenizer, tmp_path, callback, reward_funcs):
    prompts = Dataset.from_dict({"prompt": [text[:40] for text in english_paragraphs()[:32]]})
    args = config_type(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, num_generations=4,
                       max_completion_length=8, learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1,
                       save_strategy="no", disable_tqdm=True, beta=0.0, seed=0)
    used = UsedLearningRates()
    model = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128)
    trainer = trainer_type(model=model, reward_funcs=reward_funcs, args=args, train_dataset=prompts,
                           processing_class=tokenizer, callbacks=[callback, used])
    trainer.train()
    return trainer, used


@pytest.fixture
def rl_tokenizer(tokenizer):
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


@pytest.mark.parametrize(("trainer_type", "config_type"), [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)])
def test_tracked_rising_reward_raises_the_lr(rl_tokenizer, tmp_path, trainer_type, config_type,
                                            reward_rl_with_reward_momentum):
    r8 = R8Callback(reward_rl_with_reward_momentum)
    trainer, used = _train(trainer_type, config_type, rl_tokenizer, tmp_path, r8, r8.track_rewards([rising]))
    assert r8.controller.reward.ema.value is not None and r8.controller.reward.ema.count >= STEPS - 1
    assert "rewards/rising/mean" in trainer.state.log_history[0]  # the wrapper kept the function's name
    reward_events = [event for event in r8.events if event.rule.startswith("reward")]
    assert reward_events and r8.controller.lr_gain() > 1.0
    assert logged(trainer, "learning_rate") == pytest.approx([lrs[0] for lrs in used.used], rel=1e-9)
    betas = [momenta[0] for momenta in used.momenta]
    assert betas[0] == pytest.approx(0.9) and betas[-1] > betas[0]  # the reward momentum rule on AdamW's beta1


def test_r8callback_as_written_fits_a_reward_trainer(rl_tokenizer, tmp_path, caplog):
    """`R8Callback()` with no config on GRPO: the reward drives the LR (GRPO's loss is ~0 by construction), no
    step is skipped as a spike of that loss, and the log says so once."""
    r8 = R8Callback()
    with caplog.at_level("WARNING"):
        _train(GRPOTrainer, GRPOConfig, rl_tokenizer, tmp_path, r8, r8.track_rewards([rising]))
    assert caplog.text.count("uses the reward_rl preset") == 1
    assert r8.config == R8Config.from_preset("reward_rl")
    assert not [event for event in r8.events if event.rule in ("guard", "rollback", "range_test")], r8.events
    assert r8.rollback_counts["skipped_steps"] == 0 and r8.controller.lr_gain() > 1.0  # the rising reward's


def test_untracked_rewards_fall_back_to_the_logged_reward(rl_tokenizer, tmp_path):
    r8 = R8Callback(R8Config.from_preset("reward_rl"))
    _train(GRPOTrainer, GRPOConfig, rl_tokenizer, tmp_path, r8, [rising])
    assert r8.controller.reward.ema.count >= STEPS - 2  # one logged reward per step (logging_steps=1), a step late


def test_track_rewards_refuses_what_it_cannot_wrap():
    for reward_model in ("a/reward-model", torch.nn.Linear(2, 1)):
        with pytest.raises(ValueError, match="reward models and model names cannot be wrapped"):
            R8Callback().track_rewards([reward_model])


def test_async_reward_functions_stay_async_and_are_tracked():
    async def constant_one(completions, **kwargs):
        return [1.0 for _ in completions]

    r8 = R8Callback()
    tracked = r8.track_rewards(constant_one)[0]
    assert inspect.iscoroutinefunction(tracked) and tracked.__name__ == "constant_one"
    assert asyncio.run(tracked(["a", "b"])) == [1.0, 1.0]
    rewards = r8._rewards
    assert rewards.take_step_reward() == (1.0, 1.0) and rewards.take_step_reward() == (0.0, 0.0)  # used up by the step


def test_controller_state_comes_back_on_resume(rl_tokenizer, tmp_path):
    prompts = Dataset.from_dict({"prompt": [text[:40] for text in english_paragraphs()[:32]]})

    def trainer_for(r8, steps):
        args = GRPOConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=8, learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1,
                          save_strategy="steps", save_steps=6, disable_tqdm=True, beta=0.0, seed=0)
        model = tiny_gpt2(len(rl_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128)
        return GRPOTrainer(model=model, reward_funcs=r8.track_rewards([rising]), args=args, train_dataset=prompts,
                           processing_class=rl_tokenizer, callbacks=[r8])

    whole = R8Callback(R8Config.from_preset("reward_rl"))
    trainer_for(whole, 10).train()  # a checkpoint at step 6 on the way
    resumed = R8Callback(R8Config.from_preset("reward_rl"))
    trainer_for(resumed, 10).train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert resumed.controller.state_dict() == whole.controller.state_dict()
    assert resumed.controller.reward.ema.count >= 9
