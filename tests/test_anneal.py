"""The end-of-run anneal: decided once from the schedule's own future values, said once, never on a short run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import Trainer, get_scheduler

from hf_r8 import R8Callback, R8Config
from hf_r8.control.config import AnnealConfig
from hf_r8.control.controller import GroupSpec, Observation
from hf_r8.control.engine import Engine
from hf_r8.integrations.lr_writer import schedule_ahead
from tests.conftest import training_args

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


@pytest.mark.parametrize(("name", "kwargs", "annealed"), [
    ("constant", {}, True),
    ("constant_with_warmup", {"num_warmup_steps": 10}, True),
    ("cosine", {"num_warmup_steps": 10}, False),
    ("warmup_stable_decay", {"num_warmup_steps": 10, "scheduler_specific_kwargs": {"num_decay_steps": 20}}, False),
    ("cosine_with_restarts", {"num_warmup_steps": 10, "scheduler_specific_kwargs": {"num_cycles": 3}}, False),
])
def test_the_trainers_named_schedules_are_read_ahead(name, kwargs, annealed):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = get_scheduler(name, optimizer, num_training_steps=STEPS, **kwargs)
    engine = _engine(ahead=schedule_ahead(scheduler))
    _factors(engine)
    assert engine.anneal.annealing is annealed


def test_a_plateau_schedule_cannot_be_read_ahead():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    assert schedule_ahead(get_scheduler("reduce_lr_on_plateau", optimizer)) is None


@pytest.mark.integration
def test_a_short_run_ends_at_the_lr_it_was_given(model, lm_dataset, tmp_path):
    r8 = R8Callback()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=20), train_dataset=lm_dataset,
                      callbacks=[r8])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert len(logs) == 20
    # the controller's gain, and no end-of-run factor on top of it
    assert [entry["learning_rate"] for entry in logs] == pytest.approx([1e-3 * entry["r8/lr_gain"] for entry in logs])
    assert not [event for event in r8.events if event.rule == "anneal"]


@pytest.mark.integration
def test_a_trainer_run_says_its_anneal_in_a_line_and_an_event(model, lm_dataset, tmp_path, capfd):
    config = R8Config.from_dict({"rules": [], "range_test": {"enabled": False}})
    r8 = R8Callback(config)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=150), train_dataset=lm_dataset,
                      callbacks=[r8])
    trainer.train()
    [event] = [event for event in r8.events if event.rule == "anneal"]
    assert event.step == 120
    lines = [line for line in capfd.readouterr().out.splitlines() if "anneal" in line]
    assert lines == [f"r8: step 120: anneal: {event.reason}"]
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged[:120] == pytest.approx([1e-3] * 120)
    assert logged[120] == pytest.approx(1e-3 * (1 - math.sqrt(1 / 30)))
    assert logged[-1] == pytest.approx(1e-5)
