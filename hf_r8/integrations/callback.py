"""`R8Callback`: the adaptive controller wired into `transformers.Trainer` (wiring only).

`on_train_begin` builds the run and, at a run's start, sweeps the LR range test before the first step the
Trainer counts (`range_test_runner.py`). Then per optimizer step, in the Trainer's own event order (the work
is `TrainerRun`'s, `trainer_run.py`):

* `on_step_begin`: start collecting this step's loss and gradient norm (`taps.py`);
* `on_pre_optimizer_step`: feed the controller the previous step's signals (already on the host, so no
  device sync waits on this step, `step_signals.py`); check this step before it is applied, skipping or
  rolling back (`rollback_manager.py`); write `schedule_lr * gain` into every parameter group (`lr_writer.py`);
* `on_optimizer_step` / `on_step_end`: give the scheduler its own value back before it steps; dither
  (`parameter_actions.py`); reduce this step's signals across processes and start their copy to the host.

A Trainer that runs its own loop and fires only `on_step_end` (TRL's PPOTrainer: one event per PPO
update of several optimizer steps) is recognised at its first `on_step_end`: the LR is then set once
per update, at its end, for the next one (`TrainerRun.enter_update_loop`).

Everything a run needs is built in `on_train_begin`; what the user sees (events, dashboard, run files,
report) is `run_outputs.py`'s, and every transformers internal goes through `compat.py`. A `train()` that
raises anywhere is ended where the exception leaves it (`compat.guard_train`), as `on_train_end` would.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from hf_r8.control import state_versions
from hf_r8.control.config import R8Config
from hf_r8.control.controller import Controller
from hf_r8.control.events import Event, event_log
from hf_r8.control.resolve import ConfigLike, resolve_config, revalidate
from hf_r8.integrations.compat import (
    find_trainer,
    give_stateful_entry,
    guard_train,
    is_reward_trainer,
    rebuilt_from_checkpoint,
)
from hf_r8.integrations.rewards import RewardTracker
from hf_r8.integrations.run_outputs import RunOutputs
from hf_r8.integrations.trainer_run import TrainerRun

logger = logging.getLogger(__name__)

# The version of the state R8Callback saves in checkpoints; a checkpoint without one is version 1.
# The R8Callback each Trainer was built with (or bound to): the one to keep live when transformers'
# `restore_callback_states_from_checkpoint` swaps in a copy rebuilt from the checkpoint. Weak both ways: the
# callback refers to its Trainer, so a strong value would keep both alive for ever.
_LIVE_CALLBACKS: weakref.WeakKeyDictionary[Any, weakref.ref[R8Callback]] = weakref.WeakKeyDictionary()


class R8Callback(TrainerCallback, ExportableState):
    """Adapts the learning rate (and optionally momentum) of a `transformers.Trainer` online.

    The Trainer's schedule (`lr_scheduler_type`, warmup) stays the base: the LR used at each
    optimizer step is the schedule's value times the controller's gain, within safe bounds.
    Adaptation starts after the Trainer's warmup. Decisions, with their reasons, are kept in
    `events` and logged; `r8/*` metrics reach every reporter and `state.log_history`. The
    controller state is saved with every checkpoint and restored by `resume_from_checkpoint`
    (no `restore_callback_states_from_checkpoint` needed).

    Args:
        config: an `R8Config`, its dict form, a preset name, a YAML path, or None for the `default` preset (the
            `reward_rl` preset on TRL's reward-driven trainers, whose loss does not measure the LR).
        name: this instance's name in checkpoints (`state_key`): a checkpoint's R8 state is restored only into
            the callback of the same class and name.

    Example:
        ```python
        from transformers import Trainer
        from hf_r8 import R8Callback

        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[R8Callback()])
        trainer.train()
        ```
    """

    def __init__(self, config: ConfigLike = None, *, name: str = "r8") -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name={name!r}: must be a non-empty string")
        self.config = resolve_config(config)
        self.config_given = config is not None
        """Whether the user chose the config (None picks the preset that fits the trainer, at train start)."""
        self.name = name
        self._outputs = RunOutputs(self.config.run_files, self.config.dashboard, self.config.report)
        self._events = event_log()
        self._rewards = RewardTracker()
        self._trainer: Any = None
        self._run: TrainerRun | None = None

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: its class and `name` (as Lightning's
        `Callback.state_key`)."""
        return f"{type(self).__qualname__}[{self.name}]"

    @property
    def controller(self) -> Controller | None:
        """The controller of the current (or last) run; None before training."""
        return self._run.controller if self._run is not None else None

    @property
    def events(self) -> Any:
        """The decisions, skips and rollbacks of this callback's runs (the last 10,000), with their reasons; after a
        resume, those of the checkpoint's run up to it, then the new ones."""
        return self._events

    @property
    def rollback_counts(self) -> dict[str, int]:
        """Steps skipped by the guard, rollbacks, and steps lost to rollbacks so far (zeros before training)."""
        if self._run is None:
            return {"skipped_steps": 0, "rollbacks": 0, "wasted_steps": 0}
        return self._run.rollback.counts()

    @classmethod
    def from_preset(cls, name: str) -> R8Callback:
        return cls(R8Config.from_preset(name))

    @classmethod
    def from_yaml(cls, path: str | Path) -> R8Callback:
        return cls(R8Config.from_yaml(path))

    def bind(self, trainer: Any) -> R8Callback:
        """Name the Trainer explicitly (subclasses that own the loop); otherwise it is found at train start."""
        self._trainer = trainer
        _LIVE_CALLBACKS[trainer] = weakref.ref(self)
        guard_train(trainer, self._end_by_exception)
        return self

    def track_rewards(self, reward_funcs: Any) -> list[Any]:
        """Wrap TRL reward functions so their rewards reach the controller (see `rewards.py`); pass the result
        as `reward_funcs=` to GRPOTrainer / RLOOTrainer. Reward models and model names cannot be wrapped:
        leave them out and the logged `reward` is used."""
        return self._rewards.track(reward_funcs)

    def record(self, event: Event) -> None:
        """Keep `event`, log it, and write it to the run files and the dashboard (R8Trainer adds its own)."""
        if self._run is not None:
            self._run.engine.record(event)
        else:
            self._events.append(event)
            self._outputs.record(event, {})

    def close(self) -> None:
        """Stop the dashboard and close the run files now (done when training ends, also by an exception)."""
        self._outputs.close()

    def _end_by_exception(self, error: BaseException) -> None:
        """`train()` raised: end the run now, as `on_train_end` would have (see `compat.guard_train`)."""
        if self._run is not None:
            self._run.end_by_exception(error)

    # ------------------------------------------------------------------------------------ events
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        with contextlib.suppress(RuntimeError):  # RuntimeError: an event fired by hand, outside a Trainer
            trainer = find_trainer(self)
            _LIVE_CALLBACKS.setdefault(trainer, weakref.ref(self))
            guard_train(trainer, self._end_by_exception)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        trainer = self._trainer if self._trainer is not None else find_trainer(self)
        live = self._instance_to_run(trainer)
        if live is not self:
            live.on_train_begin(args, state, control, optimizer=optimizer, **kwargs)
            return
        if not self.config_given and is_reward_trainer(trainer) and self.config == R8Config.from_preset("default"):
            logger.warning("R8: %s learns from rewards and its loss does not measure the LR: R8Callback() uses the "
                           "reward_rl preset (the reward drives the LR; no LR range test, no loss-spike brakes). "
                           "Pass a config to choose another.", type(trainer).__name__)
            self.config = R8Config.from_preset("reward_rl")
        revalidate(self.config)  # fields may have been assigned since the callback was built
        _refuse_other_instances(trainer)
        guard_train(trainer, self._end_by_exception)  # added after the Trainer was built: from its next train()
        if optimizer is None or not getattr(optimizer, "param_groups", None):
            raise ValueError(f"optimizer={optimizer!r}: R8Callback needs a torch optimizer with param_groups")
        give_stateful_entry(state, type(self).__name__, self._state_entry(None))  # resuming a stock checkpoint
        if self._run is not None:  # a run that raised never reached on_train_end
            self._run.end(state.global_step)
        saved = self._saved_state(state) if state.global_step > 0 else None
        self._rewards.start_run(trainer)
        # The gains this callback's last train() found, if it trained this same model (a model_init builds a new
        # one per train(), as in a hyperparameter search: that one is tested afresh).
        previous = self._run
        found_gains = previous.found_gains if previous is not None and previous.trainer.model is trainer.model else None
        self._run = TrainerRun(self.config, trainer, optimizer, args, state, self._outputs, self._rewards, self._events)
        self._run.start(args, state, saved, kwargs.get("train_dataloader"), found_gains)

    def _instance_to_run(self, trainer: Any) -> R8Callback:
        """The user's own R8Callback, also when transformers' `restore_callback_states_from_checkpoint` removed it
        from the Trainer and put in its place this copy rebuilt from the checkpoint: the user's object is put back
        and runs, with its own config; the checkpoint's R8 state is restored into it as on any resume."""
        live = _LIVE_CALLBACKS.get(trainer, weakref.ref(self))() or self
        handler = trainer.callback_handler.callbacks
        if live is self or not rebuilt_from_checkpoint(self) or any(callback is live for callback in handler):
            return self
        handler[next(index for index, callback in enumerate(handler) if callback is self)] = live
        if self.config.to_dict() != live.config.to_dict():
            logger.warning("R8: restore_callback_states_from_checkpoint rebuilt R8Callback from the checkpoint; the "
                           "R8Callback you passed stays the live one and its config, which differs from the "
                           "checkpoint's, is used. The checkpoint's controller state is restored into it.")
        return live

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._run.step_begin(state.global_step + 1)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: torch.optim.Optimizer, lr_scheduler: Any = None, **kwargs: Any):
        self._run.before_optimizer_step(state.global_step, args, control, optimizer, lr_scheduler)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          optimizer: torch.optim.Optimizer, lr_scheduler: Any = None, **kwargs: Any):
        self._run.after_optimizer_step(state.global_step + 1, optimizer, lr_scheduler)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    optimizer: torch.optim.Optimizer, lr_scheduler: Any = None, **kwargs: Any):
        self._run.step_end(state.global_step, optimizer, lr_scheduler)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any):
        self._rewards.read_logs(logs)
        if self._run is not None:  # an evaluate() before train() logs too
            self._run.read_logs(state.global_step, logs)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._outputs.flush()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._run.end(state.global_step)
        self._run.record_last_step()
        self._outputs.finish(args.output_dir)

    # ---------------------------------------------------------------------------- checkpointing
    def state(self) -> dict[str, Any]:
        """Saved into trainer_state.json with every checkpoint (the stateful-callback interface)."""
        return self._state_entry(self._run.state_dict() if self._run is not None else None)

    def _state_entry(self, run_state: dict[str, Any] | None) -> dict[str, Any]:
        """The constructor's arguments and, once a run has started, its state, versioned and keyed."""
        r8_state = None if run_state is None else {"version": state_versions.CALLBACK, "state_key": self.state_key,
                                                **run_state}
        return {"args": {"config": self.config.to_dict(), "name": self.name}, "attributes": {"r8_state": r8_state}}

    def _saved_state(self, state: TrainerState) -> dict[str, Any] | None:
        """This callback's state in the checkpoint resumed from: the one saved under its `state_key` (a state
        saved before states had keys counts as this callback's)."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) or []
        r8_states = [entry.get("attributes", {}).get("r8_state") for entry in
                     (saved if isinstance(saved, list) else [saved])]
        r8_states = [r8_state for r8_state in r8_states if r8_state is not None]
        r8_state = next((r8_state for r8_state in r8_states
                         if r8_state.get("state_key", self.state_key) == self.state_key), None)
        if r8_state is None:
            others = sorted({r8_state["state_key"] for r8_state in r8_states})
            held = f" (it holds the state of {', '.join(others)})" if others else ""
            logger.warning("Resuming at step %d without saved state for %s%s: the controller starts fresh.",
                           state.global_step, self.state_key, held)
            return None
        state_versions.saved_version("R8Callback", r8_state, state_versions.CALLBACK)
        return r8_state


def _refuse_other_instances(trainer: Any) -> None:
    """Two R8 callbacks on one Trainer would each scale the LR the other wrote and share one set of run files."""
    count = sum(isinstance(other, R8Callback) for other in trainer.callback_handler.callbacks)
    if count > 1:
        raise ValueError(f"{type(trainer).__name__} has {count} R8 callbacks: one adapts the LR; keep one of them "
                         "(R8Trainer uses an R8Callback passed in callbacks=, or builds one from r8=).")
