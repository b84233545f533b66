"""The LR range test: its sweep, its choice, and its restore of the weights in a real Trainer run."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_r8 import R8Callback, R8Config
from hf_r8.config import RangeTestConfig
from hf_r8.range_test import LRRangeTest
from tests.conftest import training_args


def test_gains_sweep_exponentially_from_min_to_max():
    test = LRRangeTest(RangeTestConfig(steps=5, gain_min=0.01, gain_max=100.0))
    assert [test.gain(i) for i in range(6)] == pytest.approx([0.01, 0.1, 1.0, 10.0, 100.0, 100.0])


def test_choice_is_the_smoothed_minimum_over_backoff_and_losses_credit_the_previous_gain():
    test = LRRangeTest(RangeTestConfig(steps=6, gain_min=0.01, gain_max=1000.0, smoothing=0.0, backoff=10.0))
    for index, loss in enumerate([5.0, 4.0, 3.0, 2.0, 2.5, 9.0]):
        test.observe(index, loss)
    # the minimum (2.0) was measured at step 3, so it belongs to gain(2) = 1.0
    assert test.best_gain == pytest.approx(1.0)
    assert test.chosen_gain() == pytest.approx(0.1)
    assert test.diverged  # 9.0 > 4 x 2.0


def test_non_finite_loss_ends_the_test_and_nothing_measured_means_gain_one():
    test = LRRangeTest(RangeTestConfig(steps=10))
    test.observe(1, float("nan"))
    assert test.finished and test.chosen_gain() == 1.0


def test_smoothing_is_bias_corrected():
    test = LRRangeTest(RangeTestConfig(steps=10, smoothing=0.7))
    test.observe(1, 4.0)
    assert test.smoothed == pytest.approx(4.0)
    test.observe(2, 2.0)
    assert test.smoothed == pytest.approx((0.7 * 0.3 * 4.0 + 0.3 * 2.0) / (1 - 0.49))


class ParameterProbe(TrainerCallback):
    """A fingerprint of the weights at the start of every step."""

    def __init__(self, model):
        self.model, self.sums = model, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.sums[state.global_step] = sum(float(p.double().sum()) for p in self.model.parameters())


@pytest.mark.integration
def test_range_test_restores_the_weights_and_rebases_the_gain(model, lm_dataset, tmp_path):
    config = R8Config(range_test=RangeTestConfig(enabled=True, steps=10, gain_min=0.1, gain_max=1000.0))
    r8, probe = R8Callback(config), ParameterProbe(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=30, learning_rate=1e-4),
                      train_dataset=lm_dataset, callbacks=[r8, probe])
    trainer.train()
    rebase = next(event for event in r8.events if event.rule == "range_test")
    assert rebase.step in (10, 11)
    assert probe.sums[rebase.step] == pytest.approx(probe.sums[0], rel=1e-12), "weights restored after the test"
    assert probe.sums[rebase.step - 1] != pytest.approx(probe.sums[0], rel=1e-9)
    gain = rebase.new_value
    assert 0.1 <= gain <= 1000.0 and gain != 1.0
    assert [spec.initial_gain for spec in r8.controller.specs] == [gain, gain]
    lr_after = [entry["learning_rate"] for entry in trainer.state.log_history if entry.get("step") == rebase.step + 1]
    assert lr_after == pytest.approx([1e-4 * gain], rel=1e-12)  # constant schedule x the chosen gain
    assert math.isfinite(trainer.state.log_history[-2]["loss"])


@pytest.mark.integration
def test_a_run_that_ends_inside_the_test_gets_the_weights_from_before_it(model, lm_dataset, tmp_path, caplog):
    config = R8Config(range_test=RangeTestConfig(enabled=True, steps=10, gain_min=0.1, gain_max=1000.0))
    r8 = R8Callback(config)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=6, learning_rate=1e-3),
                      train_dataset=lm_dataset, callbacks=[r8])
    trainer.train()
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())
    abandon = [event for event in r8.events if event.rule == "range_test"]
    assert [(event.step, event.action) for event in abandon] == [(6, "abandon")]
    assert "inside the LR range test of range_test.steps=10" in caplog.text


@pytest.mark.integration
def test_range_test_sweeps_the_lr_it_claims(model, lm_dataset, tmp_path):
    config = R8Config(range_test=RangeTestConfig(enabled=True, steps=6, gain_min=0.01, gain_max=100.0))
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=12, learning_rate=1e-3),
                      train_dataset=lm_dataset, callbacks=[R8Callback(config)])
    trainer.train()
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged[:6] == pytest.approx([1e-3 * 10 ** (-2 + 4 * i / 5) for i in range(6)], rel=1e-9)


@pytest.mark.integration
def test_after_the_test_the_schedule_continues_where_it_is(model, lm_dataset, tmp_path):
    from transformers import get_scheduler

    config = R8Config(rules=[], range_test=RangeTestConfig(enabled=True, steps=6, gain_min=0.1, gain_max=10.0))
    r8 = R8Callback(config)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=16, learning_rate=1e-3,
                      lr_scheduler_type="linear", warmup_steps=12), train_dataset=lm_dataset, callbacks=[r8])
    trainer.train()
    rebase = next(event for event in r8.events if event.rule == "range_test")
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_scheduler("linear", reference, num_warmup_steps=12, num_training_steps=16)
    scheduled = []
    for _ in range(16):
        scheduled.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    logged = {entry["step"]: entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry}
    step = rebase.step + 1  # the first step after the weights were restored: warmup LR x the chosen gain
    assert logged[step] == pytest.approx(scheduled[step - 1] * rebase.new_value, rel=1e-9)
    assert scheduled[step - 1] > 0
