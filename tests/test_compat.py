"""The transformers and torch internals hf_r8 relies on (`hf_r8/integrations/compat.py`, `compat_deepspeed.py`),
pinned against the installed versions: an upgrade that renames one fails here first, and at run time a missing one
is a warning, never a silent loss."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from transformers import Trainer, TrainerState
from transformers.trainer_callback import ProgressCallback

from hf_r8.integrations import compat
from tests.trainer_setup import training_args


@pytest.mark.parametrize("name", sorted(compat.WRAPPED_METHODS))
def test_every_wrapped_trainer_method_exists(name):
    assert callable(getattr(Trainer, name))


def test_the_wrapped_methods_take_what_the_taps_pass_through():
    # training_step(model, inputs, num_items_in_batch): its tensor return is the micro-batch loss;
    # log(logs, start_time): the taps add r8/* keys to `logs` before calling it.
    assert list(inspect.signature(Trainer.training_step).parameters)[1:3] == ["model", "inputs"]
    assert list(inspect.signature(Trainer.log).parameters)[1] == "logs"


@pytest.mark.parametrize("name", sorted(compat.TRAINER_INTERNALS))
def test_every_trainer_internal_r8trainer_uses_exists(name):
    assert hasattr(Trainer, name)


def test_the_progress_bar_and_the_stateful_callbacks_look_as_compat_expects():
    assert "training_bar" in vars(ProgressCallback())  # what mute_training_bar closes
    assert isinstance(TrainerState().stateful_callbacks, dict)  # what give_stateful_entry fills


def test_what_the_range_test_sweep_uses_is_there():
    """The sweep takes the Trainer's batches as its loop does: `get_batch_samples(iterator, count, device)`, the
    micro-batch count `training_step` scales by, and the end of a prepared dataloader's pass."""
    from accelerate.data_loader import DataLoaderShard

    assert list(inspect.signature(Trainer.get_batch_samples).parameters)[1:4] == [
        "epoch_iterator", "num_batches", "device"]
    assert "current_gradient_accumulation_steps" in inspect.getsource(Trainer.training_step)
    assert callable(DataLoaderShard.end)


def test_the_reward_trainers_are_named_as_trl_names_them():
    trl = pytest.importorskip("trl")
    assert compat.is_reward_trainer(trl.GRPOTrainer.__new__(trl.GRPOTrainer))
    assert compat.is_reward_trainer(trl.RLOOTrainer.__new__(trl.RLOOTrainer))
    assert not compat.is_reward_trainer(trl.SFTTrainer.__new__(trl.SFTTrainer))


def test_a_missing_method_is_a_warning_naming_it_and_the_version(caplog):
    class NotQuiteATrainer:
        def training_step(self, model, inputs):
            return 0.0

        def log(self, logs):
            pass

    with caplog.at_level(logging.WARNING):
        missing = compat.check_trainer(NotQuiteATrainer())
    assert missing == {"_get_grad_norm"}
    assert "NotQuiteATrainer._get_grad_norm does not exist: no the gradient norm" in caplog.text
    assert "transformers" in caplog.text and "5." in caplog.text


def test_a_trainer_class_missing_an_internal_is_warned_about(caplog):
    class Stripped:
        pass

    with caplog.at_level(logging.WARNING):
        compat.check_trainer_internals(Stripped)
    assert all(f"Trainer.{name} does not exist" in caplog.text for name in compat.TRAINER_INTERNALS)


def test_every_trainer_attribute_r8trainer_reads_is_there(model, lm_dataset, tmp_path):
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=lm_dataset)
    trainer._set_signature_columns_if_needed()
    for name in compat.TRAINER_ATTRIBUTES:
        assert hasattr(trainer, name), name
    assert compat.train_batch_size(trainer) == 4
    compat.keep_signature_column(trainer, "r8_index")
    assert "r8_index" in trainer._signature_columns and "input_ids" in trainer._signature_columns
    assert compat.is_causal_lm_loss(model)


def test_a_missing_attribute_or_last_lr_is_a_warning_naming_it(caplog):
    class Bare:
        class args:  # noqa: N801 (what TrainingArguments would be)
            per_device_train_batch_size = 7
            average_tokens_across_devices = True

    compat._warned.clear()
    with caplog.at_level(logging.WARNING):
        assert compat.train_batch_size(Bare()) == 7
        compat.keep_signature_column(Bare(), "r8_index")
        assert compat.loss_scaled_across_processes(Bare(), 10) is False
        compat.set_logged_lr(Bare(), [1e-3])
    for name in compat.TRAINER_ATTRIBUTES:
        assert f"Trainer.{name}" in caplog.text
    assert "Bare has no _last_lr list" in caplog.text


def test_the_torch_scheduler_fields_adaptive_scheduler_saves_are_torchs_own():
    """AdaptiveScheduler saves torch's LRScheduler counters as torch's own `state_dict()` names them, reads
    `_step_count` to tell a step of its own, and overrides `_get_closed_form_lr`, which `step(epoch)` calls."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    assert set(compat.TORCH_SCHEDULER_FIELDS) <= set(scheduler.state_dict())
    steps = compat.scheduler_steps(scheduler)
    optimizer.step()
    scheduler.step()
    assert compat.scheduler_steps(scheduler) == steps + 1
    assert "_get_closed_form_lr" in inspect.getsource(torch.optim.lr_scheduler.LRScheduler.step)
    restored = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    compat.load_scheduler_fields(restored, compat.scheduler_fields(scheduler))
    assert restored.state_dict() == scheduler.state_dict()
