"""The LR range test: its sweep, its choice, and its restore of the weights in a real Trainer run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_r8 import R8Callback, R8Config
from hf_r8.control.config import RangeTestConfig
from hf_r8.control.range_test import LRRangeTest, no_range_test_reason, range_test_length
from hf_r8.demo.offline import tiny_gpt2
from tests.conftest import training_args


def test_gains_sweep_exponentially_from_min_to_max():
    test = LRRangeTest(RangeTestConfig(gain_min=0.01, gain_max=100.0), steps=6)
    assert [test.gain(i) for i in range(6)] == pytest.approx([0.01, 0.1, 1.0, 10.0, 100.0, 100.0])


def test_choice_is_the_denoised_minimum_over_backoff_and_losses_credit_the_previous_gain():
    test = LRRangeTest(RangeTestConfig(gain_min=0.01, gain_max=100.0, smoothing=0.0, backoff=2.0, keep_band=1.0,
                                       significance=0.0), steps=6)
    for index, loss in enumerate([5.0, 5.0, 4.0, 2.0, 2.0, 3.0]):
        test.observe(index, loss)
    # credited to gains 0.01 .. 100; centered means 4.5, 3.67, 2.67, 2.33, 2.5: the lowest is at gain(3) = 10
    gain, loss = test.best()
    assert gain == pytest.approx(10.0) and loss == pytest.approx(7.0 / 3.0)
    assert test.chosen_gain() == pytest.approx(5.0)


def test_the_denoised_curve_is_centered_and_not_shifted_to_higher_gains():
    test = LRRangeTest(RangeTestConfig(gain_min=1.0, gain_max=1e4), steps=6)
    for index, loss in enumerate([9.0, 6.0, 5.0, 1.0, 5.0, 6.0]):
        test.observe(index, loss)
    assert [loss for _, loss in test.denoised()] == pytest.approx([5.5, 4.0, 11.0 / 3.0, 4.0, 5.5])
    assert test.best()[0] == pytest.approx(test.gain(2)), "the dip's own gain, where a causal EMA lags past it"


def test_one_fault_is_left_out_and_only_faults_in_a_row_are_the_blow_up():
    test = LRRangeTest(RangeTestConfig(smoothing=0.0, divergence_ratio=4.0), steps=20)
    verdicts = [test.observe(index, loss) for index, loss in enumerate([5.0, 4.0, float("nan"), 3.0, 90.0, 2.5])]
    assert verdicts == [True, True, False, True, False, True]  # the NaN and the outlier: updates not applied
    assert not test.diverged and test.faults == 2 and [loss for _, loss in test.history] == [4.0, 3.0, 2.5]
    for index, loss in enumerate([float("nan"), 50.0, float("inf")], start=6):
        assert not test.observe(index, loss)
    assert test.diverged and test.finished and test.divergence_gain == test.gain(5)  # the first fault's gain


def test_a_test_that_cannot_conclude_keeps_the_users_lr_and_says_so():
    test = LRRangeTest(RangeTestConfig(), steps=10)
    for index in range(4):
        test.observe(index, float("nan"))
    assert test.finished and test.diverged and test.chosen_gain() == 1.0
    assert "no conclusion from 0 losses (3 are needed): the LR set is kept" in test.summary("restored")


def test_runaway_loss_ends_the_test_early():
    test = LRRangeTest(RangeTestConfig(smoothing=0.0, divergence_ratio=4.0, divergence_patience=1), steps=20)
    for index, loss in enumerate([5.0, 4.0, 3.0, 2.0, 9.0]):
        test.observe(index, loss)
    assert test.diverged and test.finished and test.observed == 3


def _swept(losses: list[float], **config) -> LRRangeTest:
    test = LRRangeTest(RangeTestConfig(gain_min=0.01, gain_max=10_000.0, smoothing=0.0, divergence_ratio=100.0,
                                       **config), steps=len(losses))
    for index, loss in enumerate(losses):
        test.observe(index, loss)
    return test


def test_a_suggestion_within_the_keep_band_keeps_the_users_lr():
    # a clear valley at gain ~17 (credited): the suggestion, ~1.7, is within the band of 3
    test = _swept([6.0, 6.0, 6.01, 5.99, 6.0, 6.0, 5.5, 4.5, 3.0, 2.5, 9.0, 40.0, 80.0, 90.0, 99.0])
    assert test.has_valley() and 1 / 3 <= test.suggested_gain() <= 3
    assert test.chosen_gain() == 1.0


def test_a_clear_valley_far_above_the_users_lr_raises_it_to_the_minimum_over_backoff():
    # flat (noise 0.01) until gain ~100, then a deep valley at ~400: the user's LR is far too low
    test = _swept([6.0, 6.01, 5.99, 6.0, 6.01, 5.99, 6.0, 6.0, 6.0, 5.8, 5.0, 3.0, 2.0, 9.0, 30.0])
    assert test.has_valley()
    assert test.chosen_gain() == pytest.approx(test.best()[0] / 10) and test.chosen_gain() > 10


def test_a_curve_flat_within_its_noise_is_judged_by_where_it_blows_up():
    # a pre-trained model: flat within noise (spread ~0.1) until it blows up; its lowest point is noise
    losses = [3.86, 4.08, 3.75, 4.01, 3.90, 3.94, 4.03, 3.90, 3.93, 3.95, 3.85, 3.75, 3.90, 10.0, 20.0]
    test = _swept(losses)
    assert not test.has_valley()
    blow_up = test.blow_up_gain()
    assert blow_up == pytest.approx(test.gain(12)), "the first loss far above the level (10.0), credited"
    assert test.suggested_gain() == pytest.approx(blow_up / 10)
    assert _swept(losses, significance=0.0).suggested_gain() == pytest.approx(test.best()[0] / 10), \
        "without the noise test the noisy minimum would be taken"


def test_a_flat_curve_that_never_rises_keeps_the_users_lr():
    assert _swept([4.0, 4.1, 3.9, 4.0, 4.05, 3.95, 4.0, 4.1, 3.9, 4.0]).chosen_gain() == 1.0


@pytest.mark.parametrize(("total_steps", "expected"), [
    (None, None), (100, None), (149, None), (150, 15), (600, 24), (1000, 40), (10_000, 100), (100_000, 100)])
def test_the_default_test_is_sized_to_the_run(total_steps, expected):
    assert range_test_length(RangeTestConfig(), total_steps) == expected


def test_a_fixed_length_is_used_as_is_and_a_disabled_test_has_none():
    assert range_test_length(RangeTestConfig(steps=30), 100) == 30
    assert range_test_length(RangeTestConfig(steps=30), 20) is None
    assert range_test_length(RangeTestConfig(enabled=False), 10_000) is None


def test_a_run_without_a_test_is_told_why():
    assert no_range_test_reason(RangeTestConfig(), 600) is None
    assert no_range_test_reason(RangeTestConfig(enabled=False), 600).startswith("off (range_test.enabled: false)")
    assert no_range_test_reason(RangeTestConfig(), 100) == (
        "skipped: a run of 100 steps is too short (15 test steps would be over 10% of it), so the LR set is kept "
        "(and not annealed at the end)")
    assert "steps=30 leaves no room in a run of 20 steps" in no_range_test_reason(RangeTestConfig(steps=30), 20)
    assert "length is unknown" in no_range_test_reason(RangeTestConfig(), None)


@pytest.mark.integration
def test_a_skipped_test_is_an_event_and_a_log_line(model, lm_dataset, tmp_path, caplog):
    r8 = R8Callback()
    with caplog.at_level("INFO", logger="hf_r8"):
        Trainer(model=model, args=training_args(tmp_path, max_steps=10), train_dataset=lm_dataset,
                callbacks=[r8]).train()
    skips = [event for event in r8.events if event.rule == "range_test"]
    assert [(event.step, event.action) for event in skips] == [(0, "skip")]
    assert "a run of 10 steps is too short" in skips[0].reason
    assert "R8: LR range test skipped: a run of 10 steps is too short" in caplog.text


class StopAt(TrainerCallback):
    """Ends training after `step` steps (a run interrupted early)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


class ParameterProbe(TrainerCallback):
    """A fingerprint of the weights at the start of every step."""

    def __init__(self, model):
        self.model, self.sums = model, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.sums[state.global_step] = sum(float(p.double().sum()) for p in self.model.parameters())


@pytest.mark.integration
def test_range_test_restores_the_weights_and_rebases_the_gain(model, lm_dataset, tmp_path):
    config = R8Config(range_test=RangeTestConfig(enabled=True, steps=10, gain_min=0.1, gain_max=1000.0,
                                                 keep_band=1.0, significance=0.0))
    r8, probe = R8Callback(config), ParameterProbe(model)
    before = sum(float(p.double().sum()) for p in model.parameters())
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=30, learning_rate=1e-4),
                      train_dataset=lm_dataset, callbacks=[r8, probe])
    trainer.train()
    rebase = next(event for event in r8.events if event.rule == "range_test")
    assert rebase.step == 0 and "sweep steps before training" in rebase.reason
    assert probe.sums[0] == pytest.approx(before, rel=1e-12), "weights restored after the test, before step 1"
    assert probe.sums[1] != pytest.approx(before, rel=1e-9)
    gain = rebase.new_value
    assert 0.1 <= gain <= 1000.0 and gain != 1.0
    assert [spec.initial_gain for spec in r8.controller.specs] == [gain, gain]
    lr_first = [entry["learning_rate"] for entry in trainer.state.log_history if entry.get("step") == 1]
    assert lr_first == pytest.approx([1e-4 * gain], rel=1e-12)  # constant schedule x the chosen gain, from step 1
    assert math.isfinite(trainer.state.log_history[-2]["loss"])


@pytest.mark.integration
def test_an_exception_inside_the_sweep_leaves_the_weights_from_before_it(model, lm_dataset, tmp_path):
    class RaisesAtForward(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.forwards = inner, 0

        def forward(self, input_ids, labels=None, attention_mask=None):
            self.forwards += 1
            if self.forwards == 6:
                raise RuntimeError("a bad batch inside the sweep")
            return self.inner(input_ids=input_ids, labels=labels, attention_mask=attention_mask)

    config = R8Config(range_test=RangeTestConfig(enabled=True, steps=10, gain_min=0.1, gain_max=1000.0))
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainer = Trainer(model=RaisesAtForward(model), args=training_args(tmp_path, max_steps=30, learning_rate=1e-3),
                      train_dataset=lm_dataset, callbacks=[R8Callback(config)])
    with pytest.raises(RuntimeError, match="inside the sweep"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())


@pytest.mark.integration
def test_range_test_sweeps_the_lr_it_claims(model, lm_dataset, tmp_path):
    used = []

    class Used(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            optimizer.optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))

    config = R8Config(range_test=RangeTestConfig(enabled=True, steps=6, gain_min=0.01, gain_max=100.0))
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=12, learning_rate=1e-3),
                      train_dataset=lm_dataset, callbacks=[Used(), R8Callback(config)])
    trainer.train()
    # 5 sweep updates at 0.01x .. 100x (the 6th step reads the loss of the last gain), then the 12 counted steps
    assert len(used) == 5 + 12
    assert used[:5] == pytest.approx([1e-3 * 10 ** (-2 + 4 * i / 4) for i in range(5)], rel=1e-9)
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == pytest.approx(used[5:], rel=1e-12)  # the Trainer logs the LRs training used, no sweep LR


@pytest.mark.integration
def test_after_the_test_the_schedule_starts_at_its_first_step(model, lm_dataset, tmp_path):
    from transformers import get_scheduler

    config = R8Config(rules=[], range_test=RangeTestConfig(enabled=True, steps=6, gain_min=0.1, gain_max=10.0,
                                                           keep_band=1.0, significance=0.0))
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
    # The sweep took none of the schedule's steps: its warmup runs from step 1, times the chosen gain.
    assert rebase.step == 0
    assert [logged[step] for step in range(1, 13)] == pytest.approx(  # (the anneal takes the last 20%)
        [scheduled[step - 1] * rebase.new_value for step in range(1, 13)], rel=1e-9)


class SnapshotProbe(TrainerCallback):
    """Which snapshot objects R8's rollback holds after every step, and the gain stored with the first one."""

    def __init__(self, r8: R8Callback) -> None:
        self.r8, self.snapshot_ids, self.stored_gains = r8, set(), {}

    def on_step_end(self, args, state, control, **kwargs):
        snapshots = self.r8._run.rollback.snapshots
        self.snapshot_ids.update(id(snapshot) for snapshot in snapshots)
        if snapshots:
            self.stored_gains[state.global_step] = snapshots[0].extras["engine"]["controller"]["groups"][0]["lr_gain"]


def _train_lm(tokenizer, dataset, output_dir, callbacks, learning_rate, lr_scheduler_type="cosine"):
    model = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    args = training_args(output_dir, max_steps=150, learning_rate=learning_rate, logging_steps=10,
                         lr_scheduler_type=lr_scheduler_type, warmup_steps=15, per_device_train_batch_size=8)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset.select(range(64)),
                      callbacks=callbacks)
    trainer.train()
    return trainer.evaluate()["eval_loss"]


@pytest.mark.integration
def test_the_default_finds_its_way_up_from_an_lr_100x_too_low(tokenizer, lm_dataset, tmp_path):
    r8 = R8Callback()  # no config: the default preset
    probe = SnapshotProbe(r8)
    with_r8 = _train_lm(tokenizer, lm_dataset, tmp_path / "r8", [r8, probe], learning_rate=3e-5)
    stock = _train_lm(tokenizer, lm_dataset, tmp_path / "stock", [], learning_rate=3e-5)
    rebase = next(event for event in r8.events if event.rule == "range_test")
    assert rebase.step == 0 and "after 15 steps" in rebase.reason, "4% of 150 steps, at least 15"
    assert rebase.new_value > 10, rebase.reason
    assert with_r8 < stock - 0.3, (with_r8, stock)
    # The test restored rollback's own snapshot: one snapshot object all run long, holding the chosen gain.
    assert len(probe.snapshot_ids) == 1
    assert probe.stored_gains[1] == pytest.approx(rebase.new_value)
    written = json.loads((tmp_path / "r8" / "r8" / "r8_range_test.json").read_text())
    assert written["chosen_gain"] == pytest.approx(rebase.new_value) and len(written["curve"]) == 14
    # shown: a plot in the end-of-run report, and a line of the dashboard
    assert (tmp_path / "r8" / "r8" / "r8_report" / "range_test.png").stat().st_size > 0
    assert "LR range test: 15 steps" in (tmp_path / "r8" / "r8" / "r8_report" / "summary.md").read_text()
    assert r8._outputs.view.range_test.startswith(f"chose LR {3e-5 * rebase.new_value:.3g}")


@pytest.mark.integration
def test_one_field_turns_the_search_off(tokenizer, lm_dataset, tmp_path):
    config = R8Config.from_dict({"range_test": {"enabled": False}, "anneal": {"enabled": False}})
    r8 = R8Callback(config)
    _train_lm(tokenizer, lm_dataset, tmp_path, [r8], learning_rate=3e-5)
    assert not [event for event in r8.events if event.rule == "range_test"]
    assert not (tmp_path / "r8_range_test.json").exists()
