"""The end-of-run anneal: decided once from the schedule's own future values, said once, never on a short run
(the Trainer's named schedules and real runs are in tests/test_anneal.py)."""

from __future__ import annotations

import json
import math

import pytest

from hf_r8.control.config import AnnealConfig, R8Config
from hf_r8.control.controller import GroupSpec, Observation
from hf_r8.control.engine import Engine

BASE_LR = 1e-3
STEPS = 200


def _engine(total_steps: int = STEPS, ahead=lambda step_index: 1.0, anneal: AnnealConfig | None = None) -> Engine:
    config = R8Config(rules=[], anneal=anneal or AnnealConfig())
    config.range_test.enabled = False
    return Engine(config, [GroupSpec(BASE_LR)], total_steps, schedule_ahead=ahead)


def _factors(engine: Engine, schedule=lambda step_index: 1.0) -> list[float]:
    """The engine's LR over the schedule's at every step of its run (the controller's rules are off)."""
    factors = []
    for step_index in range(engine.total_steps):
        schedule_lr = BASE_LR * schedule(step_index)
        factors.append(engine.lr(0, schedule_lr, step_index) / schedule_lr)
        engine.observe(Observation(step_index + 1, loss=1.0))
    return factors


def _wsd(step_index: int) -> float:
    """Warmup-stable-decay: flat at its peak until 90% of the run, then linearly to 0."""
    return min(1.0, (STEPS - step_index) / (0.1 * STEPS))


def test_a_flat_schedule_is_annealed_over_the_last_fifth_and_said_once():
    engine = _engine()
    flat = _factors(engine)
    assert flat[:160] == [1.0] * 160
    assert flat[160] == pytest.approx(1.0 - math.sqrt(1 / 40))
    assert all(later < earlier for earlier, later in zip(flat[160:198], flat[161:199], strict=True))
    assert flat[-1] == pytest.approx(0.01)  # 1 - sqrt(1) = 0, held at the lower bound (base / 100)
    [event] = [event for event in engine.events if event.rule == "anneal"]
    assert (event.step, event.action) == (160, "start")
    assert "from step 161 to 200" in event.reason and "its lowest value ahead: 1" in event.reason


def test_a_schedule_that_decays_later_is_left_alone_because_it_is_read_ahead():
    assert _factors(_engine(ahead=_wsd), _wsd) == [1.0] * STEPS
    # judged only by its value at the anneal's start (still its peak), it would have been annealed twice over
    blind = _engine(ahead=None)
    assert _factors(blind, _wsd)[170] < 0.5
    assert "its value now (it cannot be evaluated ahead): 1" in blind.events[-1].reason


def test_no_anneal_on_a_run_too_short_for_the_range_test_or_with_it_off():
    assert _factors(_engine(total_steps=100)) == [1.0] * 100  # 15 test steps would be over 10% of it
    assert _factors(_engine(anneal=AnnealConfig(enabled=False))) == [1.0] * STEPS
    assert _engine(total_steps=None).anneal.start is None  # a run of unknown length: nothing to plan from


def test_the_decision_survives_a_state_round_trip_and_an_older_state_loads():
    engine = _engine()
    for step_index in range(170):
        engine.lr(0, BASE_LR, step_index)
        engine.observe(Observation(step_index + 1, loss=1.0))
    saved = json.loads(json.dumps(engine.state_dict()))
    restored = _engine(ahead=_wsd)  # decided once: a resumed run does not decide again
    restored.load_state_dict(saved)
    assert restored.anneal.annealing is True
    assert restored.lr(0, BASE_LR, 170) == pytest.approx(engine.lr(0, BASE_LR, 170))

    older = {**saved, "controller": {**saved["controller"], "annealing": True}}  # 0.2.0 kept it in the controller
    del older["anneal"]
    from_older = _engine(ahead=_wsd)
    from_older.load_state_dict(older)
    assert from_older.anneal.annealing is True
