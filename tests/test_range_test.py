"""The LR range test in a real Trainer run: its sweep, and its restore of the weights (the curve and the choice
are in tests/control/test_range_test_curve.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_r8 import R8Callback, R8Config
from hf_r8.control.config import RangeTestConfig
from hf_r8.demo.offline import tiny_gpt2
from tests.trainer_setup import training_args


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
    gains = [gain for gain, _ in written["curve"]]
    assert written["chosen_gain"] == pytest.approx(rebase.new_value) and len(gains) >= 10 and gains == sorted(gains)
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


@pytest.mark.integration
def test_a_lower_choice_keeps_the_users_lr_unless_the_sweep_blew_up_at_or_below_it(tokenizer, lm_dataset, tmp_path):
    """LR 0.1 on the tiny GPT-2: the sweep's valley lies ~40x lower, but nothing blows up before 0.1; the first
    run of the bench's tabular task lost 42% to such a cut. LR 1.0: blown up below it, and lowered."""
    chosen = {}
    for learning_rate in (0.1, 1.0):
        config = R8Config.from_preset("default")
        config.range_test.steps = 15
        r8 = R8Callback(config)
        model = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
        Trainer(model=model, args=training_args(tmp_path / str(learning_rate), max_steps=20,
                                                learning_rate=learning_rate),
                train_dataset=lm_dataset, callbacks=[r8]).train()
        [rebase] = [event for event in r8.events if event.rule == "range_test"]
        chosen[learning_rate] = (rebase.new_value, rebase.reason)
    gain, reason = chosen[0.1]
    assert gain == 1.0 and "does not show the LR set too high (range_test.keep_unless_too_high): kept" in reason
    gain, reason = chosen[1.0]
    assert gain < 0.2 and "gain / 10" in reason and "kept" not in reason
