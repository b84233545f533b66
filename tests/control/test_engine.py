"""The engine every adapter runs: its state in one `state_dict`, one rollback semantics, the range test's rebase.

Pure Python, driven by hand-made losses (the adapters' runs on real models are in test_callback.py,
test_scheduler.py, test_loop.py and the golden trajectories)."""

from __future__ import annotations

import json
import math

import pytest

from hf_r8.control.config import R8Config
from hf_r8.control.controller import GroupSpec, Observation
from hf_r8.control.engine import Engine


class RecordingPlan:
    """A data plan that remembers how many low-loss batches it was asked for."""

    def __init__(self) -> None:
        self.requests: list[int] = []

    def stabilize(self, batches: int) -> None:
        self.requests.append(batches)


def _engine(preset: str = "aggressive", **kwargs) -> Engine:
    config = R8Config.from_preset(preset)
    config.rollback.enabled = True
    return Engine(config, [GroupSpec(1e-3, momentum=0.9), GroupSpec(1e-4)], total_steps=200, **kwargs)


def _loss(step: int) -> float:
    return 2.0 + 3.0 * math.exp(-step / 20) + 0.05 * math.sin(step * 1.7)


def _drive(engine: Engine, steps: range) -> list[tuple[float, float, float | None]]:
    """Check and observe each step as an adapter does; the LRs and momentum written before each."""
    written = []
    for step in steps:
        written.append((engine.lr(0, 1e-3, step - 1), engine.lr(1, 1e-4, step - 1), engine.momentum(0)))
        assert engine.check(step, _loss(step)).kind == "apply"
        engine.observe(Observation(step=step, loss=_loss(step), grad_norm=1.0 + 0.1 * math.cos(step)))
    return written


def test_a_state_dict_through_json_continues_the_same_run():
    straight = _engine()
    _drive(straight, range(1, 61))
    saved = json.loads(json.dumps(straight.state_dict()))
    assert saved["events"], "the aggressive preset decided something in 60 steps"

    resumed = _engine()
    resumed.load_state_dict(saved)
    assert list(resumed.events) == list(straight.events)
    assert _drive(resumed, range(61, 121)) == _drive(straight, range(61, 121))
    assert resumed.state_dict() == straight.state_dict()


def test_a_first_spike_is_dropped_before_its_step_and_only_recorded_after_it():
    for applied_before_check, first_kind, first_action in ((False, "drop", "skip_step"), (True, "pass", "spike")):
        engine = _engine(applied_before_check=applied_before_check)
        _drive(engine, range(1, 41))
        verdict = engine.check(41, 50.0)
        assert verdict.kind == first_kind and not verdict.observed
        assert engine.events[-1].action == first_action
        assert engine.rollback.skipped_steps == (0 if applied_before_check else 1)
        second = engine.check(42, 50.0)  # a second spike in a row: damage
        assert second.kind == "roll_back" and second.action.attempt == 1


def test_a_non_finite_step_is_dropped_and_rolled_back_only_if_the_weights_are_damaged():
    engine = _engine()
    _drive(engine, range(1, 41))
    assert engine.check(41, math.nan, weights_finite=lambda: True).kind == "drop"
    assert engine.check(42, 2.5, math.inf).kind == "drop"  # a non-finite gradient norm alone
    assert engine.rollback.skipped_steps == 2 and [event.action for event in engine.events][-2:] == ["skip_step"] * 2
    damaged = engine.check(43, math.nan, weights_finite=lambda: False)
    assert damaged.kind == "roll_back" and "non-finite weights" in damaged.reason
    # A grad scaler's overflow (finite loss, non-finite gradients) is its own to skip: nothing recorded.
    events = len(engine.events)
    assert engine.check(44, 2.5, math.inf, scaler_owns_overflow=True).kind == "pass"
    assert len(engine.events) == events and engine.rollback.skipped_steps == 3  # 43 was dropped too


def test_a_non_finite_step_already_applied_is_the_hosts_skip_damage_or_kept_from_the_controller():
    engine = _engine(applied_before_check=True)
    _drive(engine, range(1, 41))
    assert engine.check(41, math.nan, skipped_by=lambda: "the DeepSpeed engine").kind == "pass"
    assert "the DeepSpeed engine skipped the step" in engine.events[-1].reason
    damaged = engine.check(41, math.nan, weights_finite=lambda: False, skipped_by=lambda: "the DeepSpeed engine")
    assert damaged.kind == "roll_back"  # skipped, but the loss was non-finite because the weights already were
    assert engine.check(42, math.nan, weights_finite=lambda: True).kind == "pass"
    assert engine.events[-1].action == "nonfinite_loss"
    assert engine.check(43, math.nan).kind == "roll_back"  # the weights unknown, rollback on: taken as damaged
    engine.config.rollback.enabled = False
    assert engine.check(44, math.nan).kind == "pass" and "rollback is off" in engine.events[-1].reason
    engine.config.rollback.guard_nonfinite = False
    assert engine.check(45, math.nan).kind == "apply"  # nothing is checked: the controller's brake sees it


def test_a_healthy_step_is_due_for_a_snapshot_every_every_steps():
    engine = _engine()
    every = engine.config.rollback.every_steps
    due = []
    for step in range(1, 4 * every + engine.config.rollback.healthy_steps):
        if engine.check(step, _loss(step)).snapshot:
            due.append(step)
            engine.snapshot_taken(step)
    assert len(due) >= 3 and all(after - before == every for before, after in zip(due, due[1:], strict=False))


def test_a_rollback_restores_the_engine_brakes_the_lr_and_asks_the_plan_for_low_loss_batches():
    plan = RecordingPlan()
    engine = _engine(applied_before_check=True, plan=plan, batches_per_step=4)
    _drive(engine, range(1, 31))
    snapshot = engine.snapshot_taken(30)
    gain_at_snapshot = engine.controller.lr_gain(0)
    _drive(engine, range(31, 41))

    engine.check(41, 50.0)
    action = engine.check(42, 50.0).action
    engine.restore(snapshot)
    reason = engine.roll_back(action, restored_step=30, weights_step=42)

    stabilize = engine.config.rollback.stabilize_steps
    assert plan.requests == [stabilize * 4]
    assert engine.rollback.wasted_steps == 12 and engine.rollback.rollbacks == 1
    assert "restored the snapshot of step 30" in reason and "lowest-loss quartile" in reason
    cuts = [event for event in engine.events if event.action == "cut"]
    assert [event.group for event in cuts] == [0, 1] and cuts[0].old_value == gain_at_snapshot
    # The LR restarts at lr_cut x and climbs back over the stabilization.
    engine.observe(Observation(step=43, loss=_loss(43)))
    lr_factor = engine.recovery.factor(engine.controller.step)
    assert engine.config.rollback.lr_cut <= lr_factor < 1.0


def test_the_range_test_sweeps_then_rebases_the_controller_on_its_choice():
    engine = _engine("default")
    length = engine.range_test_length()
    assert length is not None  # 200 steps leave room for one
    engine.start_range_test(length)
    test = engine.range_test
    assert engine.lr(0, 1e-3, 0) == 1e-3 * test.gain(0) and engine.momentum(0) is None
    # The sweep multiplies the LR the user set, not a schedule's value (a warmup's first one is ~0).
    assert engine.lr(0, 1e-6, 3) == 1e-3 * test.gain(3) and engine.lr(1, 0.0, 3) == 1e-4 * test.gain(3)

    step_index = 0  # the loss falls as the gain grows, then blows up past x100
    while not engine.range_test_loss(step_index, 3.0 - 0.1 * math.log(test.gain(step_index))
                                     if test.gain(step_index) < 100 else 50.0):
        step_index += 1
    gain = engine.finish_range_test(step_index + 1, "weights restored")

    assert engine.range_test is None and engine.controller.warmup_steps >= step_index + 1
    assert [spec.initial_gain for spec in engine.specs] == [gain, gain]
    assert engine.events[-1].rule == "range_test" and engine.events[-1].new_value == gain
    assert engine.lr(0, 1e-3, step_index + 1) == engine.controller.compose_lr(0, 1e-3)


def test_a_state_saved_inside_the_range_test_resumes_at_gain_one_without_it():
    engine = _engine("default")
    engine.start_range_test(engine.range_test_length())
    engine.range_test_loss(0, 3.0)
    saved = json.loads(json.dumps(engine.state_dict()))
    assert saved["range_test_running"] is True

    resumed = _engine("default")
    resumed.start_range_test(5)  # a fresh run would have started its own
    resumed.load_state_dict(saved)
    assert resumed.range_test is None and resumed.controller.lr_gain(0) == 1.0


def test_events_reach_the_listener_once_each():
    heard = []
    engine = _engine(listener=heard.append)
    _drive(engine, range(1, 61))
    engine.check(61, math.nan)
    assert heard == list(engine.events) and heard[-1].rule == "guard"


def test_the_engine_state_carries_its_version_and_an_unversioned_one_loads():
    engine = _engine()
    _drive(engine, range(1, 31))
    saved = engine.state_dict()
    assert saved["version"] == 1
    resumed = _engine()
    resumed.load_state_dict({key: value for key, value in saved.items() if key != "version"})  # hf_r8 <= 0.3
    assert resumed.state_dict() == saved
    with pytest.raises(ValueError, match="engine state is version 2, newer than this hf_r8 reads"):
        _engine().load_state_dict({**saved, "version": 2})


def test_a_recovery_under_way_survives_a_state_round_trip_and_an_older_state_keeps_it_in_the_controller():
    engine = _engine(applied_before_check=True)
    _drive(engine, range(1, 31))
    engine.snapshot_taken(30)
    engine.check(31, 50.0)
    engine.roll_back(engine.check(32, 50.0).action, restored_step=30, weights_step=32)
    engine.observe(Observation(step=33, loss=_loss(33)))
    factor = engine.recovery.factor(engine.controller.step)
    assert factor < 1.0
    saved = json.loads(json.dumps(engine.state_dict()))
    older = {key: value for key, value in saved.items() if key != "recovery"}  # hf_r8 <= 0.3: the controller's
    older["controller"] = {**saved["controller"], "recovery": saved["recovery"]}
    for state in (saved, older):
        resumed = _engine(applied_before_check=True)
        resumed.load_state_dict(state)
        assert resumed.recovery.factor(resumed.controller.step) == factor
        assert resumed.lr(0, 1e-3, 33) == engine.lr(0, 1e-3, 33)
