"""Rollback: the policy's decisions, exact snapshots, and fault injection in real Trainer runs."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from hf_r8 import R8Callback, R8Config
from hf_r8.control.config import RollbackConfig
from hf_r8.control.rollback import RollbackPolicy
from hf_r8.data.catalog import LossCatalog
from hf_r8.demo.offline import tiny_gpt2
from hf_r8.runtime.snapshot import StateSnapshot, model_tensors, trainable_parameter_names
from tests.faults import FAULT_STEP, FaultClock, FaultyModel, LearningRateBlast
from tests.trainer_setup import ScriptedLossModel, training_args

QUICK = dict(every_steps=10, healthy_steps=5, window=20, min_history=10)


# ------------------------------------------------------------------------------------- policy
def test_spikes_are_called_against_the_healthy_window_and_back_off_until_stop():
    policy = RollbackPolicy(RollbackConfig(**QUICK, lr_cut=0.5, stabilize_steps=4, max_consecutive=2))
    for step in range(1, 31):
        assert policy.observe(step, 2.0 + 0.01 * (step % 3)) is None
    assert policy.should_snapshot(30)
    policy.snapshot_taken(30)
    assert policy.observe(31, 2.05) is None  # within the window's noise
    skip = policy.observe(32, 9.0)  # one bad batch, most likely: its step is skipped
    assert skip.kind == "skip" and "standard deviations" in skip.reason
    first = policy.observe(33, 9.0)  # again on the untouched weights: they are damaged
    assert first.kind == "rollback" and "second spike in a row" in first.reason
    # a single rollback: the LR restarts at x0.5 and comes back; nothing lasting
    assert (first.recovery_lr_factor, first.lasting_lr_factor, first.stabilize_steps, first.attempt) == \
        (0.5, 1.0, 4, 1)
    assert policy.observe(34, 9.0).kind == "skip"
    second = policy.observe(35, 9.0)
    assert (second.kind, second.lasting_lr_factor, second.stabilize_steps, second.attempt) == ("rollback", 0.5, 8, 2)
    assert policy.observe(36, 9.0).kind == "skip"
    stop = policy.observe(37, 9.0)
    assert stop.kind == "stop" and "2 rollbacks in a row did not help" in stop.reason
    assert policy.metrics() == {"rollbacks": 2.0, "skipped_steps": 3.0, "wasted_steps": 0.0}


def test_a_snapshot_long_after_the_damage_ends_the_series():
    policy = RollbackPolicy(RollbackConfig(**QUICK))
    for step in range(1, 21):
        policy.observe(step, 2.0 + 0.01 * (step % 3))
    policy.observe(21, 9.0)
    assert policy.observe(22, 9.0).attempt == 1
    policy.snapshot_taken(35)  # too soon after the damage: the next rollback is still "in a row"
    policy.observe(36, 9.0)
    assert policy.observe(37, 9.0).attempt == 2
    assert not policy.should_snapshot(40)  # stabilizing
    policy.snapshot_taken(58)  # 2 x every_steps after the last damage
    policy.observe(59, 9.0)
    assert policy.observe(60, 9.0).attempt == 1


def test_the_stabilization_losses_do_not_set_the_level_the_next_batches_are_judged_against():
    policy = RollbackPolicy(RollbackConfig(**QUICK, stabilize_steps=5))
    for step in range(1, 21):
        policy.observe(step, 2.0 + 0.01 * (step % 3))
    policy.observe(21, 9.0)
    assert policy.observe(22, 9.0).kind == "rollback"  # the caller restores the detector of the snapshot
    level = policy.detector.state_dict()
    for step in range(23, 28):  # the lowest-loss quartile's batches: far below the level, not spikes
        assert policy.observe(step, 0.5) is None
    assert policy.detector.state_dict() == level
    assert policy.observe(28, 2.02) is None  # ordinary batches again: no spike against a false low level
    assert policy.detector.recent[-1] == 2.02


def test_guard_names_the_non_finite_value_and_snapshots_wait_for_health():
    policy = RollbackPolicy(RollbackConfig(**QUICK))
    assert policy.guard(1.0, 2.0) is None
    assert "non-finite loss nan" in policy.guard(math.nan, 2.0)
    assert "gradient norm inf" in policy.guard(1.0, math.inf)
    assert RollbackPolicy(RollbackConfig(guard_nonfinite=False)).guard(math.nan, None) is None
    policy.record_skip(12)
    assert not policy.should_snapshot(15) and policy.should_snapshot(17)


def test_a_snapshot_of_the_weights_before_the_first_step_does_not_start_the_cadence():
    policy = RollbackPolicy(RollbackConfig(every_steps=50, healthy_steps=10))
    policy.snapshot_taken(0)  # the LR range test's return point
    assert not policy.should_snapshot(9) and policy.should_snapshot(10)
    policy.snapshot_taken(10)
    assert not policy.should_snapshot(59) and policy.should_snapshot(60)


def test_a_ratio_to_the_ema_is_a_spike_even_in_a_wide_window():
    policy = RollbackPolicy(RollbackConfig(**QUICK, spike_z=100.0, spike_ratio=3.0))
    for step in range(1, 21):
        policy.observe(step, 1.0 if step % 2 else 3.0)
    action = policy.observe(21, 7.0)
    assert action.kind == "skip" and "x its EMA" in action.reason


def test_near_zero_losses_late_in_a_classification_run_are_noise_not_spikes():
    policy = RollbackPolicy(RollbackConfig(**QUICK))
    losses = [2.3, 1.5, 0.9, 0.5, 0.3, 0.15, 0.08] + [0.03, 0.025, 0.035, 0.028, 0.032] * 12
    for step, loss in enumerate(losses, start=1):
        assert policy.observe(step, loss) is None
    # one hard example in a batch of 32: 0.1 after a level of 0.03 is > 3x the EMA and far above its noise
    assert policy.detector.ema < 0.035
    assert policy.observe(len(losses) + 1, 0.1) is None
    assert policy.observe(len(losses) + 2, 0.12) is None
    assert policy.skipped_steps == 0 and policy.rollbacks == 0
    # a loss that gives back a real share of the progress is still a spike
    assert policy.observe(len(losses) + 3, 1.5).kind == "skip"
    without = RollbackPolicy(RollbackConfig(**QUICK, spike_min_setback=0.0))
    for step, loss in enumerate(losses, start=1):
        without.observe(step, loss)
    assert without.observe(len(losses) + 1, 0.1).kind == "skip", "this test would prove nothing otherwise"


def test_policy_state_survives_a_round_trip():
    policy = RollbackPolicy(RollbackConfig(**QUICK))
    for step in range(1, 25):
        policy.observe(step, 1.0 + 0.01 * step)
    policy.record_skip(25)
    clone = RollbackPolicy(RollbackConfig(**QUICK))
    clone.load_state_dict(policy.state_dict())
    assert clone.state_dict() == policy.state_dict()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("every_steps", 0, "rollback.every_steps=0: must be an integer >= 1"),
    ("lr_cut", 1.5, r"rollback.lr_cut=1.5: must be in \(0.0, 1.0\]"),
    ("scope", "some", "rollback.scope='some': must be one of"),
    ("spike_ratio", 1.0, "rollback.spike_ratio=1.0: must be > 1.0"),
])
def test_bad_rollback_config_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        RollbackConfig(**{field: value})


# ----------------------------------------------------------------------------------- snapshot
def _adam_steps(model, optimizer, steps):
    for _ in range(steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_restore_is_bit_exact_and_buffers_are_reused():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _adam_steps(model, optimizer, 3)
    snapshot = StateSnapshot()
    snapshot.capture(model, optimizer, step=3, extras={"note": [1]})
    expected_model = {name: t.clone() for name, t in model_tensors(model).items()}
    expected_state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    pointers = [buffer.data_ptr() for buffer in snapshot._model.values()]
    _adam_steps(model, optimizer, 5)
    snapshot.restore(model, optimizer)
    for name, tensor in model_tensors(model).items():
        assert torch.equal(tensor, expected_model[name]), name
    for param in model.parameters():
        assert set(optimizer.state[param]) == set(expected_state[id(param)])
        for key, value in optimizer.state[param].items():
            assert torch.equal(value, expected_state[id(param)][key]), key
    snapshot.capture(model, optimizer, step=8)
    assert [buffer.data_ptr() for buffer in snapshot._model.values()] == pointers  # no re-allocation


def test_a_snapshot_before_the_first_step_restores_an_empty_state_and_group_settings():
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.param_groups[0]["d"] = 1.0  # a setting kept in the group (Prodigy keeps its estimate there)
    snapshot = StateSnapshot()
    snapshot.capture(model, optimizer, step=0)
    _adam_steps(model, optimizer, 2)
    optimizer.param_groups[0].update(d=50.0, lr=3e-3)
    snapshot.restore(model, optimizer)
    assert all(param not in optimizer.state for param in model.parameters())  # Adam starts afresh
    assert optimizer.param_groups[0]["d"] == 1.0 and optimizer.param_groups[0]["lr"] == 3e-3  # the LR is the schedule's


def test_trainable_scope_skips_frozen_parameters_and_keeps_its_set_when_requires_grad_changes():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    snapshot = StateSnapshot(trainable_parameter_names(model))
    snapshot.capture(model, optimizer, step=0)
    assert set(snapshot._model) == {"0.bias", "1.weight", "1.bias"}
    saved = model[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    model[1].weight.requires_grad_(False)  # as R8's freezer does between a capture and a rollback
    model[0].weight.requires_grad_(True)
    snapshot.restore(model, optimizer)
    assert torch.equal(model[1].weight, saved)
    snapshot.capture(model, optimizer, step=1)
    assert set(snapshot._model) == {"0.bias", "1.weight", "1.bias"}


# ---------------------------------------------------------------------------- fault injection
def _rollback_config(**overrides) -> R8Config:
    config = R8Config.from_preset("default")
    config.rollback = RollbackConfig(**{**QUICK, **overrides})
    return config


def _tiny_gpt2(tokenizer, untied: bool = False) -> torch.nn.Module:
    model = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    if untied:  # the Trainer saves a plain (non-PreTrainedModel) module only without shared tensors
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def _run(tokenizer, lm_dataset, tmp_path, fault, callbacks=(), save_strategy="no", save_steps=500,
         **config_overrides):
    torch.manual_seed(0)
    model = FaultyModel(_tiny_gpt2(tokenizer, untied=save_strategy != "no"), fault)
    r8 = R8Callback(_rollback_config(**config_overrides))
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=70, per_device_train_batch_size=8,
                                                      learning_rate=3e-3, logging_steps=10,
                                                      save_strategy=save_strategy, save_steps=save_steps),
                      train_dataset=lm_dataset.select(range(64, 512)), eval_dataset=lm_dataset.select(range(64)),
                      callbacks=[r8, FaultClock(model), *callbacks])
    trainer.train()
    return trainer, r8


@pytest.fixture(scope="module")
def clean_eval_loss(tokenizer, lm_dataset, tmp_path_factory):
    trainer, r8 = _run(tokenizer, lm_dataset, tmp_path_factory.mktemp("clean"), None)
    assert r8.rollback_counts == {"skipped_steps": 0, "rollbacks": 0, "wasted_steps": 0}  # no false alarm
    return trainer.evaluate()["eval_loss"]


@pytest.mark.integration
@pytest.mark.parametrize(("fault", "callbacks", "skipped", "rolled_back"), [
    ("nan_loss", (), 1, 0),
    ("inf_gradient", (), 1, 0),
    ("garbage_batch", (), 1, 0),  # a spike on one batch: its step is skipped, nothing to roll back
    (None, (LearningRateBlast(),), 1, 1),  # a spike, and again on the same (damaged) weights: rollback
])
def test_the_run_survives_the_fault(tokenizer, lm_dataset, tmp_path, clean_eval_loss, fault, callbacks, skipped,
                                    rolled_back):
    trainer, r8 = _run(tokenizer, lm_dataset, tmp_path, fault, callbacks)
    assert r8._run.engine.rollback.skipped_steps == skipped and r8._run.engine.rollback.rollbacks == rolled_back
    assert all(torch.isfinite(param).all() for param in trainer.model.parameters())
    assert trainer.state.global_step == 70
    eval_loss = trainer.evaluate()["eval_loss"]
    assert eval_loss == pytest.approx(clean_eval_loss, rel=0.02)
    logged = [entry for entry in trainer.state.log_history if "r8/rollbacks" in entry][-1]
    assert (logged["r8/skipped_steps"], logged["r8/rollbacks"] >= rolled_back) == (skipped, True)


@pytest.mark.integration
def test_damage_early_in_a_run_with_a_range_test_rolls_back_to_the_first_snapshot_of_training(tokenizer, lm_dataset,
                                                                                           tmp_path):
    """The range test snapshots the weights before the first step to return to after its sweep; rollback keeps that
    snapshot, and the first one of training still comes after `healthy_steps` (step 9), not `every_steps` after step
    0: the LR blast at step 35 loses the steps since step 9, not every step since the start (bench/rollback.py)."""
    torch.manual_seed(0)
    model = FaultyModel(_tiny_gpt2(tokenizer), None)
    r8 = R8Callback()  # the default: a 150-step run has its range test; snapshots every 50 steps, after 10 healthy
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=150, per_device_train_batch_size=8,
                                                      learning_rate=3e-3, logging_steps=50),
                      train_dataset=lm_dataset.select(range(64, 512)), callbacks=[r8, LearningRateBlast()])
    trainer.train()
    assert any(event.action == "rebase" for event in r8.events)  # the range test ran
    cuts = [event for event in r8.events if event.action == "cut" and event.group == 0]
    assert len(cuts) == 1 and "restored the snapshot of step 9 " in cuts[0].reason
    assert r8.rollback_counts["wasted_steps"] < FAULT_STEP  # back to step 0 it would be every step before the fault


class RestoreProbe(TrainerCallback):
    """After R8's rollback in on_pre_optimizer_step, compares the live weights with the snapshot's buffers."""

    def __init__(self, r8: R8Callback) -> None:
        self.r8, self.compared = r8, 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        last = self.r8.events[-1] if self.r8.events else None
        if last is not None and last.step == state.global_step + 1 and last.action in ("cut", "stop"):
            snapshot = self.r8._run.rollback.snapshots[-1]
            live = model_tensors(self.r8._run.trainer.model, snapshot.parameter_names)
            assert all(torch.equal(live[name], buffer) for name, buffer in snapshot._model.items())
            self.compared += 1


@pytest.mark.integration
def test_rollback_restores_the_snapshot_bit_for_bit_and_stops_after_the_limit(model, lm_dataset, tmp_path):
    def explodes(step):
        return 2.0 - 0.01 * step + 0.02 * (step % 2) if step <= 30 else 2.0 * 1.5 ** (step - 30)

    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # see _tiny_gpt2
    r8 = R8Callback(_rollback_config(max_consecutive=2))
    probe = RestoreProbe(r8)
    trainer = Trainer(model=ScriptedLossModel(model, explodes), args=training_args(tmp_path, max_steps=60),
                      train_dataset=lm_dataset, callbacks=[r8, probe])
    trainer.train()
    stops = [event for event in r8.events if event.action == "stop"]
    assert len(stops) == 1 and "in a row did not help: training stops" in stops[0].reason
    assert trainer.state.global_step == stops[0].step < 60 and probe.compared == 3  # 2 rollbacks + the stop
    checkpoint = tmp_path / f"checkpoint-{stops[0].step}"
    assert (checkpoint / "model.safetensors").is_file()  # the healthy state, written although save_strategy="no"
    saved = load_file(checkpoint / "model.safetensors")
    snapshot = r8._run.rollback.snapshots[-1]
    shared = set(saved) & set(snapshot._model)
    assert shared == set(saved)  # every tensor in the checkpoint is compared
    assert all(torch.equal(saved[name], snapshot._model[name]) for name in shared)


@pytest.mark.integration
def test_rollback_turns_itself_off_when_snapshots_do_not_fit_and_the_guard_still_works(tokenizer, lm_dataset,
                                                                                     tmp_path, caplog):
    trainer, r8 = _run(tokenizer, lm_dataset, tmp_path, "nan_loss", max_ram_fraction=1e-12)
    assert "R8 rollback is off" in caplog.text and "GiB" in caplog.text
    assert r8._run.rollback.snapshots == [] and r8._run.engine.rollback.skipped_steps == 1
    assert all(torch.isfinite(param).all() for param in trainer.model.parameters())


@pytest.mark.integration
def test_counters_survive_a_checkpoint(tokenizer, lm_dataset, tmp_path):
    _run(tokenizer, lm_dataset, tmp_path, "nan_loss", save_strategy="steps", save_steps=40)
    r8 = R8Callback(_rollback_config())
    args = training_args(tmp_path, max_steps=45, per_device_train_batch_size=8, learning_rate=3e-3)
    trainer = Trainer(model=FaultyModel(_tiny_gpt2(tokenizer, untied=True), None), args=args,
                      train_dataset=lm_dataset, callbacks=[r8])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-40"))
    assert r8._run.engine.rollback.skipped_steps == 1 and r8._run.engine.rollback.last_anomaly_step == FAULT_STEP


@pytest.mark.integration
def test_peft_lora_snapshots_hold_the_adapters_only(tokenizer, lm_dataset, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    r8 = R8Callback(_rollback_config())
    def spikes_twice(step):
        return 20.0 if step in (FAULT_STEP, FAULT_STEP + 1) else 6.0 - 0.01 * step + 0.05 * (step % 3)

    trainer = Trainer(model=ScriptedLossModel(model, spikes_twice), args=training_args(tmp_path, max_steps=50,
                      per_device_train_batch_size=8, learning_rate=3e-3), train_dataset=lm_dataset, callbacks=[r8])
    trainer.train()
    assert r8._run.engine.rollback.rollbacks == 1
    parameters = [name for name in r8._run.rollback.snapshots[-1]._model if not name.startswith("buffer:")]
    assert len(parameters) == 2  # lora_A and lora_B of the one c_attn
    assert parameters and all("lora_" in name for name in parameters)
    assert all(torch.isfinite(param).all() for param in model.parameters())


@pytest.mark.integration
def test_a_run_killed_at_a_random_step_resumes_exactly(tmp_path):
    script = Path(__file__).parent / "scripts" / "crash_and_resume.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(run_dir, *flags):
        return subprocess.run([sys.executable, str(script), str(run_dir), *flags], env=env, capture_output=True,
                              text=True, timeout=240)

    assert run(tmp_path / "whole").returncode == 0
    kill_at = random.Random().randint(11, 24)  # after at least two checkpoints, before the end
    killed = run(tmp_path / "crashed", "--kill-at", str(kill_at))
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: nothing ran after it
    assert run(tmp_path / "crashed", "--resume").returncode == 0

    def lrs(run_dir):
        return [json.loads(line) for line in (run_dir / "lrs.jsonl").read_text().splitlines()]

    whole, crashed = lrs(tmp_path / "whole"), lrs(tmp_path / "crashed")
    checkpoint = (kill_at - 1) // 5 * 5  # the kill comes before that step's own checkpoint is written
    resumed = crashed[kill_at:]  # the steps before the crash, then the steps after the checkpoint again
    assert [step for step, _ in resumed] == list(range(checkpoint + 1, 31)), f"killed at {kill_at}"
    assert resumed == whole[checkpoint:], f"killed at {kill_at}"
    runs = ("whole", "crashed")
    controllers = [json.loads((tmp_path / run / "final" / "controller.json").read_text()) for run in runs]
    assert controllers[0] == controllers[1], f"killed at {kill_at}"
    catalogs = [LossCatalog.load(tmp_path / run / "final") for run in runs]
    assert catalogs[0].equals(catalogs[1]), f"killed at {kill_at}"
