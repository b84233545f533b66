"""The end-of-run anneal on the Trainer's named schedules and in real runs (the decision itself is in
tests/control/test_anneal_plan.py)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, get_scheduler

from hf_r8 import R8Callback, R8Config
from hf_r8.integrations.lr_writer import schedule_ahead
from tests.control.test_anneal_plan import BASE_LR, STEPS, _engine, _factors
from tests.trainer_setup import training_args


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
