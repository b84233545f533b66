"""The signal stage every adapter uses: staged once, taken once, saved in one versioned shape, older shapes loaded."""

from __future__ import annotations

import pytest
import torch

from hf_r8.control import state_versions
from hf_r8.runtime.signal_packing import pack_signals
from hf_r8.runtime.signal_stage import SignalStage


def _staged(**signals) -> SignalStage:
    stage = SignalStage()
    stage.stage(7, pack_signals(None, **signals))
    return stage


def test_a_staged_step_is_taken_once():
    stage = _staged(loss=torch.tensor(2.5), grad_norm=1.25)
    observation = stage.take()
    assert (observation.step, observation.loss, observation.grad_norm, observation.reward) == (7, 2.5, 1.25, None)
    assert stage.take() is None and stage.state_dict() is None


def test_a_saved_stage_comes_back_as_it_was():
    saved = _staged(loss=2.5, reward=0.75, router_aux_loss=0.01, update_alignment=-0.25).state_dict()
    assert saved["version"] == state_versions.SIGNAL_STAGE and len(saved["values"]) == 10
    resumed = SignalStage()
    resumed.load_state_dict(saved)
    observation = resumed.take()
    assert (observation.loss, observation.reward, observation.router_aux_loss, observation.update_alignment) == \
        pytest.approx((2.5, 0.75, 0.01, -0.25))
    assert SignalStage().state_dict() is None


def test_a_version_1_stage_loads_without_an_alignment():
    version_1 = {"version": 1, "step": 4, "values": [2.5, 1.0, 1.25, 1.0, 0.0, 0.0, 0.01, 1.0]}
    stage = SignalStage()
    stage.load_state_dict(version_1)
    observation = stage.take()
    assert (observation.step, observation.loss, observation.grad_norm, observation.reward) == (4, 2.5, 1.25, None)
    assert observation.router_aux_loss == pytest.approx(0.01) and observation.update_alignment is None


def test_packing_refuses_a_signal_it_does_not_hold():
    with pytest.raises(TypeError, match="unknown signals \\['gradnorm'\\]"):
        pack_signals(None, gradnorm=1.0)


def test_unversioned_states_load_in_the_layout_their_adapter_wrote():
    trainer_0_1 = {"step": 3, "values": [2.5, 1.0, 1.25, 1.0]}  # R8Callback before rewards: loss, gradient norm
    stage = SignalStage()
    stage.load_state_dict(trainer_0_1)
    observation = stage.take()
    assert (observation.step, observation.loss, observation.grad_norm, observation.reward) == (3, 2.5, 1.25, None)
    scheduler_0_1 = {"step": 3, "values": [2.5, 1.0, 0.75, 1.0, 1.25, 1.0]}  # loss, reward, gradient norm
    stage.load_state_dict(scheduler_0_1, unversioned_layout=("loss", "reward", "grad_norm"))
    observation = stage.take()
    assert (observation.loss, observation.reward, observation.grad_norm) == (2.5, 0.75, 1.25)


def test_a_newer_stage_is_refused_by_name():
    with pytest.raises(ValueError, match="staged signals state is version 99"):
        SignalStage().load_state_dict({"version": 99, "step": 1, "values": [0.0] * 10})
