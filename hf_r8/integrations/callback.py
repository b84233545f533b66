"""`R8Callback`: the adaptive controller wired into `transformers.Trainer` (wiring only).

Per optimizer step, in the Trainer's own event order:

* `on_step_begin`: start collecting this step's loss and gradient norm (see `taps.py`);
* `on_pre_optimizer_step`: feed the controller the previous step's signals (already on the host,
  so no device sync waits on this step), then write `schedule_lr * gain` into every parameter
  group and into the scheduler's `_last_lr`, so the logged `learning_rate` is the LR used;
* `on_optimizer_step` / `on_step_end`: give the scheduler its own value back before it steps;
  reduce this step's signals across processes and start their copy to the host.

A Trainer that runs its own loop and fires only `on_step_end` (TRL's PPOTrainer: one event per PPO
update of several optimizer steps) is recognised at its first `on_step_end`: the LR is then set
once per update, at its end, for the next one (see `_enter_update_loop`).

Rollback (`rollback.py`, `snapshot.py`), on by default: in `on_pre_optimizer_step` this step's loss
and gradient norm are read on the host (one sync; the stock Trainer's NaN filter already syncs on
the loss). A non-finite value skips the step (gradients dropped); a spike, or non-finite weights,
restore the last healthy snapshot (weights, optimizer state, controller, RNG, grad scaler), cut the
LR gain, drop the step in flight and ask R8Trainer's sampler for low-loss batches. Snapshots are
taken every `rollback.every_steps` healthy steps into reused CPU buffers, in `on_pre_optimizer_step`
once the step's loss, computed on the weights about to be saved, has passed the check.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import logging
import math
import os
import random
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.optimization import GreedyLR
from transformers.trainer_callback import ExportableState

from hf_r8.control.config import R8Config
from hf_r8.control.controller import Controller, Event, GroupSpec, Observation
from hf_r8.control.decision import Decision
from hf_r8.control.range_test import LRRangeTest, range_test_length
from hf_r8.control.rollback import RollbackAction, RollbackPolicy
from hf_r8.integrations.compat import (
    find_trainer,
    give_stateful_entry,
    grad_scaler,
    mute_training_bar,
    rebuilt_from_checkpoint,
    set_logged_lr,
    uses_deepspeed,
    uses_fsdp,
)
from hf_r8.integrations.taps import TrainerTaps
from hf_r8.runtime.distributed import sum_across_processes
from hf_r8.runtime.dither import Dither
from hf_r8.runtime.freezing import ParameterFreezer, trainable_parameters
from hf_r8.runtime.host_copy import HostCopy
from hf_r8.runtime.moe import is_router_parameter
from hf_r8.runtime.param_groups import read_momentum, write_lr, write_momentum
from hf_r8.runtime.snapshot import StateSnapshot, local_part, snapshot_bytes, trainable_parameter_names
from hf_r8.ui.dashboard import Dashboard, DashboardView, sparkline
from hf_r8.ui.run_log import RUN_DIR, RunLog

logger = logging.getLogger(__name__)

# Schedulers stepped on eval metrics read `param_groups[0]["lr"]` for logging and chain from it.
_METRIC_SCHEDULERS = (ReduceLROnPlateau, GreedyLR)
_MAX_EVENTS_KEPT = 10_000
# The mean reward and the KL to the reference model in training logs: TRL's GRPO/RLOO, then PPO.
_LOGGED_REWARD_KEYS = ("reward", "objective/scores")
_LOGGED_KL_KEYS = ("kl", "objective/kl")
_SIGNAL_COUNT = 8  # (sum, count) of loss, gradient norm, reward, router aux loss: see `_reduced_signals`
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
        config: an `R8Config`, its dict form, or None for the `default` preset.

    Example:
        ```python
        from transformers import Trainer
        from hf_r8 import R8Callback

        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[R8Callback()])
        trainer.train()
        ```
    """

    def __init__(self, config: R8Config | dict[str, Any] | None = None) -> None:
        if config is None:
            config = R8Config.from_preset("default")
        elif isinstance(config, dict):
            config = R8Config.from_dict(config)
        elif not isinstance(config, R8Config):
            raise ValueError(f"config={config!r}: must be an R8Config, a dict or None")
        self.config = config
        self.controller: Controller | None = None
        self.events: deque[Event] = deque(maxlen=_MAX_EVENTS_KEPT)
        self._trainer: Any = None
        self._model: torch.nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._total_steps = 0
        self._warmup_steps = 0
        self._range_test: LRRangeTest | None = None
        self._snapshot: StateSnapshot | None = None
        self._active_trainer: Any = None
        self._rollback: RollbackPolicy | None = None
        self._healthy_snapshots: list[StateSnapshot] = []
        self._snapshot_parameters: frozenset[str] | None = None  # None: every parameter
        self._snapshots_allowed = True
        self._checks_steps = True
        self._checked_signals: list[float] | None = None
        self._drop_step_signals = False
        self._view: DashboardView | None = None
        self._dashboard: Dashboard | None = None
        self._run_log: RunLog | None = None
        self._unmute_progress: Callable[[], None] | None = None
        self._elapsed_before = 0.0
        self._applied: tuple[int, float, float, float | None] | None = None
        self._reward_sums: list[float] = []
        self._reward_counts: list[int] = []
        self._logged_reward: float | None = None
        self._logged_kl: float | None = None
        self._update_loop = False
        self._taps: TrainerTaps | None = None
        self._dither: Dither | None = None
        self._freezer: ParameterFreezer | None = None
        self._trainable: list[torch.Tensor] = []
        self._pending: HostCopy | None = None
        self._pending_step = 0
        self._schedule_lrs: list[float] = []
        self._events_since_log = 0
        self._decision_since_log = 0

    @property
    def rollback_counts(self) -> dict[str, int]:
        """Steps skipped by the guard, rollbacks, and steps lost to rollbacks so far (zeros before training)."""
        policy = self._rollback
        if policy is None:
            return {"skipped_steps": 0, "rollbacks": 0, "wasted_steps": 0}
        return {"skipped_steps": policy.skipped_steps, "rollbacks": policy.rollbacks,
                "wasted_steps": policy.wasted_steps}

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
        return self

    # ------------------------------------------------------------------------------------ events
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        with contextlib.suppress(RuntimeError):  # RuntimeError: an event fired by hand, outside a Trainer
            _LIVE_CALLBACKS.setdefault(find_trainer(self), weakref.ref(self))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        trainer = self._trainer if self._trainer is not None else find_trainer(self)
        live = self._instance_to_run(trainer)
        if live is not self:
            live.on_train_begin(args, state, control, optimizer=optimizer, **kwargs)
            return
        _refuse_other_instances(trainer)
        if optimizer is None or not getattr(optimizer, "param_groups", None):
            raise ValueError(f"optimizer={optimizer!r}: R8Callback needs a torch optimizer with param_groups")
        give_stateful_entry(state, type(self).__name__, self.state())  # resuming a stock checkpoint
        if self._freezer is not None:  # a run that raised never reached on_train_end: its frozen tensors train again
            self._freezer.release()
        self._model, self._optimizer, self._active_trainer = trainer.model, optimizer, trainer
        self._total_steps, self._warmup_steps = state.max_steps, args.get_warmup_steps(state.max_steps)
        saved = self._saved_state(state) if state.global_step > 0 else None
        self._build_controller(initial_gains=(saved or {}).get("initial_gains"))
        self._pending, self._range_test, self._snapshot = None, None, None
        self._rollback = RollbackPolicy(self.config.rollback)
        self._healthy_snapshots = []
        self._checks_steps, self._snapshots_allowed = self._supported_scope(trainer)
        # Fixed before the freezer (or a resumed freezer state) turns any requires_grad off.
        self._snapshot_parameters = trainable_parameter_names(self._model) \
            if self.config.rollback.scope == "trainable" else None
        self._checked_signals, self._drop_step_signals = None, False
        self._reward_sums, self._reward_counts = [0.0] * len(self._reward_sums), [0] * len(self._reward_counts)
        self._logged_reward = self._logged_kl = None
        self._update_loop = False
        self._dither, self._freezer = self._parameter_actions(trainer, optimizer)
        if saved is not None:
            self._restore(saved)
        elif state.global_step == 0:
            self._start_range_test(state.max_steps, args.device)
        if self._taps is not None:  # a run that raised never reached on_train_end
            self._taps.remove()
        self._taps = TrainerTaps(trainer, self._add_log_metrics, on_error=self._end_by_exception)
        self._taps.install()
        self._applied = tuple(saved["applied"]) if (saved or {}).get("applied") else None
        self._open_outputs(args, state, trainer, kept_rows=(saved or {}).get("run_files_rows"))

    def _instance_to_run(self, trainer: Any) -> R8Callback:
        """The user's own R8Callback, also when transformers' `restore_callback_states_from_checkpoint` removed it
        from the Trainer and put in its place this copy rebuilt from the checkpoint (recognised by the `r8_state`
        attribute transformers sets on it): the user's object is put back and runs, with its own config; the
        checkpoint's R8 state is restored into it as on any resume."""
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
        self._taps.start_step()
        if self._freezer is not None and self._range_test is None:
            self._freezer.before_step(state.global_step + 1)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: torch.optim.Optimizer, lr_scheduler: Any = None, **kwargs: Any):
        self._consume_pending()
        if self._range_test is not None:
            self._range_test_step(state.global_step, args.device, optimizer)
        elif self._checks_steps:
            step = state.global_step + 1
            action = self._check_step(step, args.device, optimizer)
            if action is not None:
                self._roll_back(action, step, args, control, optimizer)
            # Otherwise the weights are still those after step - 1, and this step's loss, computed on them,
            # has just passed the check: a snapshot taken now is never of a damaged model.
            elif (self._snapshots_allowed and self._rollback.should_snapshot(step)
                  and self._take_snapshot(state.global_step, args.device)):
                self._rollback.snapshot_taken(step)
        if self._freezer is not None and self._range_test is None:  # also on a skipped step: ends its probe
            for event in self._freezer.after_backward(state.global_step + 1):
                self.record(event)
        self._apply(optimizer, lr_scheduler, step_index=state.global_step)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          optimizer: torch.optim.Optimizer, lr_scheduler: Any = None, **kwargs: Any):
        if not isinstance(_unwrap(lr_scheduler), _METRIC_SCHEDULERS):
            self._restore_schedule(optimizer)
        step = state.global_step + 1
        if (self._dither is not None and self._range_test is None and not self._drop_step_signals
                and step > self.controller.warmup_steps):
            parameters = self._freezer.active_parameters() if self._freezer is not None else self._trainable
            self._dither.apply(parameters, self.controller.sigma, step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    optimizer: torch.optim.Optimizer, lr_scheduler: Any = None, **kwargs: Any):
        if not self._update_loop and (self._applied is None or self._applied[0] != state.global_step):
            self._enter_update_loop(state.global_step)
        if isinstance(_unwrap(lr_scheduler), _METRIC_SCHEDULERS):
            self._restore_schedule(optimizer)
        if self._drop_step_signals:  # a skipped or rolled-back step: the controller never sees its loss
            self._record_step(_observation(state.global_step, self._checked_signals))
            self._drop_step_signals, self._checked_signals = False, None
        else:
            self._stage_signals(state.global_step, args.device)
        if self._update_loop:  # the next update's LR, from this update's signals (one small host read per update)
            self._consume_pending()
            self._apply(optimizer, lr_scheduler, step_index=state.global_step)
        if self._view is not None:
            self._view.step = state.global_step
            if self._rollback is not None:
                self._view.rollbacks, self._view.skipped_steps = self._rollback.rollbacks, self._rollback.skipped_steps
            if self._dashboard is not None:
                self._dashboard.update(self._view)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any):
        if self._update_loop and self._schedule_lrs:  # an update loop logs, then steps its scheduler
            self._restore_schedule(self._optimizer)
        reward = next((logs[key] for key in _LOGGED_REWARD_KEYS if key in (logs or {})), None)
        if not self._reward_counts and isinstance(reward, (int, float)) and math.isfinite(reward):
            # No tracked reward function: TRL's logged mean (identical on every process), for the next step.
            self._logged_reward = float(reward)
        kl = next((logs[key] for key in _LOGGED_KL_KEYS if key in (logs or {})), None)
        if isinstance(kl, (int, float)) and math.isfinite(kl):
            self._logged_kl = float(kl)  # TRL's KL to the reference model, identical on every process
        quartiles = [logs[f"r8/q{q}_loss"] for q in range(1, 5) if f"r8/q{q}_loss" in (logs or {})]
        if self._view is not None and quartiles:
            self._view.quartile_losses = quartiles
            sampler = getattr(self._active_trainer, "r8_sampler", None)
            if sampler is not None:
                self._view.batch_mix = [1.0, 0.0, 0.0, 0.0] if sampler.stabilize_batches else \
                    (sampler.counts / sampler.batch_size).tolist()
        if self._run_log is not None:
            if len(quartiles) == 4:
                self._run_log.metrics({"step": state.global_step, **dict(zip(("q1_loss", "q2_loss", "q3_loss",
                                                                               "q4_loss"), quartiles, strict=True))})
            self._run_log.flush()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._run_log is not None:
            self._run_log.flush()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._end_run(state.global_step)
        self._close_outputs(args, state)

    def _end_run(self, step: int) -> None:
        """Leave the model and the Trainer as they would be without R8: the range test's weights undone,
        frozen tensors trainable again, the taps removed."""
        if self._range_test is not None:
            self._abandon_range_test(step)
        if self._freezer is not None:
            self._freezer.release()
        if self._taps is not None:
            self._taps.remove()
            self._taps = None

    def _end_by_exception(self, error: BaseException) -> None:
        """Training raised (a notebook may catch it and go on): end the run as `on_train_end` would, and stop
        the dashboard and close the run files with what they hold (no report: the run did not finish)."""
        try:
            self._end_run(self._active_trainer.state.global_step)
            self._record_last_step()
            self.close()
        except Exception as cleanup_error:  # the user must see the error training raised, not this one
            logger.warning("R8: cleaning up after %r failed: %r", error, cleanup_error)
            return
        logger.warning("R8: training raised %s; the dashboard is stopped, the run files are closed and the "
                       "Trainer's methods are unwrapped.", type(error).__name__)

    # -------------------------------------------------------------------------------- the wiring
    def _build_controller(self, initial_gains: list[float] | None = None, warmup_steps: int | None = None) -> None:
        names = {id(param): name for name, param in self._model.named_parameters()} if self._model else {}
        patterns = self.config.moe.router_patterns
        specs = []
        for index, group in enumerate(self._optimizer.param_groups):
            base_lr = float(group.get("initial_lr", group["lr"]))
            param_names = [names.get(id(param), "") for param in group["params"]]
            is_router = bool(param_names) and all(is_router_parameter(name, patterns) for name in param_names)
            initial_gain = initial_gains[index] if initial_gains else 1.0
            specs.append(GroupSpec(base_lr, read_momentum(group), is_router, initial_gain))
        self.controller = Controller(self.config, specs, self._total_steps,
                                     self._warmup_steps if warmup_steps is None else warmup_steps)

    def _enter_update_loop(self, step: int) -> None:
        """The Trainer runs its own loop (TRL's PPOTrainer: several optimizer steps per PPO update) and fires
        only `on_step_end` per update, not `on_pre_optimizer_step`: from now on the LR and momentum are set
        once per update, at its end, for the next one. Nothing can be checked before an optimizer step there,
        so the non-finite guard, rollback and the LR range test are off."""
        self._update_loop = True
        if self._checks_steps or self._range_test is not None:
            logger.warning("R8: %s runs its own loop (no on_pre_optimizer_step): the LR is set once per update "
                           "(from step %d); the non-finite guard, rollback and the LR range test are off.",
                           type(self._active_trainer).__name__, step)
        self._checks_steps = self._snapshots_allowed = False
        self._range_test = self._snapshot = None

    def _start_range_test(self, total_steps: int, device: torch.device) -> None:
        """Start the LR range test if this run has room for one, from a snapshot of the weights before it:
        rollback's first snapshot where rollback keeps snapshots (no second copy in RAM), else one of its own."""
        length = range_test_length(self.config.range_test, total_steps)
        if length is None:
            return
        if uses_deepspeed(self._active_trainer):
            logger.warning("R8: no LR range test under DeepSpeed (the LR R8 writes does not reach its engine's step).")
            return
        if self._snapshots_allowed:
            if not self._take_snapshot(0, device):
                logger.warning("R8: no LR range test: a snapshot of the weights to return to does not fit in RAM.")
                return
            self._snapshot = self._healthy_snapshots[-1]
        else:
            self._snapshot = StateSnapshot(self._snapshot_parameters)
            self._snapshot.capture(self._model, self._optimizer, step=0)
        self._range_test = LRRangeTest(self.config.range_test, length)

    def _range_test_step(self, step_index: int, device: torch.device, optimizer: torch.optim.Optimizer) -> None:
        """A step of the range test, before its update: read its loss (one host read per test step, so the test
        ends the step it has seen enough), and end the test then (the step in flight is dropped)."""
        self._checked_signals = self._reduced_signals(device).tolist()
        self._range_test.observe(step_index, _observation(step_index + 1, self._checked_signals).loss)
        if self._range_test.finished:
            optimizer.zero_grad(set_to_none=True)
            self._drop_step_signals = True
            self._finish_range_test(step_index + 1)

    def _finish_range_test(self, step: int) -> None:
        """Restore the weights from before the test and rebase the controller on the chosen gain."""
        test, snapshot = self._range_test, self._snapshot
        snapshot.restore(self._model, self._optimizer)
        gain = test.chosen_gain()
        self._range_test, self._snapshot, self._pending = None, None, None
        self._build_controller(initial_gains=[gain] * len(self._optimizer.param_groups),
                               warmup_steps=max(self._warmup_steps, step))
        if self._healthy_snapshots and snapshot is self._healthy_snapshots[-1]:
            # Rollback's snapshot holds the weights training goes on from, now at this step, with this controller.
            snapshot.step = step
            snapshot.extras["controller"] = self.controller.state_dict()
            self._rollback.snapshot_taken(step)
        self.record(Event(step, -1, "range_test", "rebase", 1.0, gain, test.summary(step, "weights restored")))
        if self._run_log is not None:
            self._run_log.range_test({"step": step, "curve": test.history, "denoised": test.denoised(),
                                      "suggested_gain": test.suggested_gain(), "chosen_gain": gain,
                                      "base_lrs": [spec.base_lr for spec in self.controller.specs]})
        if self._view is not None:
            self._view.range_test = (f"chose LR {self.controller.specs[0].base_lr * gain:.3g} (gain x{gain:.3g}) "
                                     f"after {step} steps; {sparkline(loss for _, loss in test.denoised())}")

    def _abandon_range_test(self, step: int) -> None:
        """Training ended inside the LR range test: the sweep's weights are not the user's training, restore the
        weights from before it."""
        self._snapshot.restore(self._model, self._optimizer)
        length = self._range_test.steps
        self._range_test, self._snapshot, self._pending = None, None, None
        reason = (f"training ended after {step} steps, inside the LR range test of {length} steps: the weights "
                  "from before the test are restored")
        self.record(Event(step, -1, "range_test", "abandon", 1.0, 1.0, reason))
        logger.warning("R8: %s.", reason)

    def _consume_pending(self) -> None:
        if self._pending is None:
            return
        observation = _observation(self._pending_step, self._pending.result().tolist())
        observation.kl, self._logged_kl = self._logged_kl, None
        self._pending = None
        self._record_step(observation)
        if self._range_test is not None:  # the test reads each step's loss itself (`_range_test_step`)
            return
        for event in self.controller.observe(observation):
            self.record(event)

    def _record_step(self, observation: Observation) -> None:
        """One step's series for r8_metrics.jsonl and the dashboard: the LR that step used and its gain over
        the schedule (kept by `_apply`), its loss and gradient norm."""
        lr, base_lr, gain = self._applied[1:] if self._applied and \
            self._applied[0] == observation.step else (None, None, None)
        controller = self.controller
        row = {"step": observation.step, "loss": observation.loss, "grad_norm": observation.grad_norm, "lr": lr,
               "base_lr": base_lr, "gain": gain, "momentum": controller.momentum(0),
               "loss_ema": controller.loss.ema.value}
        if observation.reward is not None:
            row["reward"] = observation.reward
        if self.config.exploration.enabled:
            row["sigma"] = controller.sigma
        if self._view is not None:
            view = self._view
            row["elapsed_s"] = self._elapsed_before + time.monotonic() - view.started
            view.loss, view.loss_ema, view.grad_norm = observation.loss, row["loss_ema"], observation.grad_norm
            view.lr, view.base_lr, view.gain, view.momentum = lr, base_lr, row["gain"], row["momentum"]
            if observation.reward is not None:
                view.reward = observation.reward
            if observation.loss is not None:
                view.losses.append(observation.loss)
        if self._run_log is not None:
            self._run_log.metrics(row)

    def _open_outputs(self, args: TrainingArguments, state: TrainerState, trainer: Any,
                      kept_rows: list[int] | None) -> None:
        """Dashboard and run files, on the main process only (`kept_rows`: the run files' rows the checkpoint
        resumed from had written)."""
        self.close()  # a previous run that raised never reached on_train_end
        self._elapsed_before = 0.0
        self._view = DashboardView(step=state.global_step, max_steps=state.max_steps, first_step=state.global_step)
        if self._range_test is not None:
            config = self.config.range_test
            self._view.range_test = (f"sweeping gain x{config.gain_min:g}..x{config.gain_max:g} over the first "
                                     f"{self._range_test.steps} steps (weights restored after it)")
        if not state.is_world_process_zero:
            return
        if self.config.run_files and args.output_dir:
            self._run_log = RunLog(Path(args.output_dir) / RUN_DIR, resume_step=state.global_step,
                                   kept_rows=tuple(kept_rows) if kept_rows else None)
            self._elapsed_before = self._run_log.elapsed_before
        if self.config.dashboard:
            self._dashboard = Dashboard()
            if not self._dashboard.notebook:  # a notebook without ipywidgets keeps its live bar (see dashboard.py)
                self._unmute_progress = mute_training_bar(trainer.callback_handler.callbacks)
            self._dashboard.start(self._view)
            # The dashboard's own stop, not this callback's: atexit must not keep the callback and its model alive.
            atexit.register(self._dashboard.stop, self._view)

    def close(self) -> None:
        """Stop the dashboard and close the run files now (done when training ends, also by an exception)."""
        if self._dashboard is not None:
            atexit.unregister(self._dashboard.stop)
            self._dashboard.stop(self._view)
            self._dashboard = None
        if self._unmute_progress is not None:
            self._unmute_progress()
            self._unmute_progress = None
        if self._run_log is not None:
            self._run_log.close()
            self._run_log = None

    def _record_last_step(self) -> None:
        """The last step's row, for the record only (no decision follows it)."""
        if self._pending is not None and self._range_test is None:
            self._record_step(_observation(self._pending_step, self._pending.result().tolist()))
            self._pending = None

    def _close_outputs(self, args: TrainingArguments, state: TrainerState) -> None:
        self._record_last_step()
        wrote_files = self._run_log is not None and not self._run_log.failed
        self._unmute_progress = None  # the progress bar's own on_train_end, next, unmutes it
        self.close()
        if wrote_files and self.config.report:
            from hf_r8.ui.report import write_report

            try:
                written = write_report(args.output_dir)
                logger.info("R8 report: %s", written[-1])
            except Exception as error:  # the run is done and saved; a failed plot must not lose it
                logger.warning("R8 report could not be written: %s", error)

    def record(self, event: Event) -> None:
        """Keep `event`, log it, and write it to r8_events.jsonl and the dashboard (R8Trainer adds its own)."""
        self.events.append(event)
        if self._run_log is not None:
            self._run_log.event({"step": event.step, "kind": f"{event.rule}/{event.action}", "group": event.group,
                                 "old": event.old_value, "new": event.new_value, "reason": event.reason,
                                 "signals": self.controller.metrics() if self.controller is not None else {}})
        if self._view is not None and event.group <= 0:
            self._view.decisions.append(f"step {event.step} {event.rule}/{event.action}: {event.reason}")
        self._events_since_log += 1
        if event.rule == "decision" and event.group == 0:
            self._decision_since_log = Decision(event.action).code
        logger.info("r8 step %d group %d %s: %s -> %s (%s)", event.step, event.group, event.action,
                    f"{event.old_value:.4g}", f"{event.new_value:.4g}", event.reason)

    def _apply(self, optimizer: torch.optim.Optimizer, lr_scheduler: Any, step_index: int) -> None:
        """Write the LR (and momentum) of this optimizer step; during a range test, base_lr x its gain."""
        self._schedule_lrs = []
        used = []
        for index, group in enumerate(optimizer.param_groups):
            schedule_lr = float(group["lr"])
            self._schedule_lrs.append(schedule_lr)
            if self._range_test is not None:
                lr = self.controller.specs[index].base_lr * self._range_test.gain(step_index)
            else:
                lr = self.controller.compose_lr(index, schedule_lr)
                momentum = self.controller.momentum(index)
                if momentum is not None:
                    write_momentum(group, momentum)
            write_lr(group, lr)
            used.append(lr)
        self._applied = (step_index + 1, used[0], self._schedule_lrs[0],
                         used[0] / self._schedule_lrs[0] if self._schedule_lrs[0] else None)
        set_logged_lr(lr_scheduler, used)

    def _restore_schedule(self, optimizer: torch.optim.Optimizer) -> None:
        for group, schedule_lr in zip(optimizer.param_groups, self._schedule_lrs, strict=False):
            write_lr(group, schedule_lr)
        self._schedule_lrs = []

    def _stage_signals(self, step: int, device: torch.device) -> None:
        """The step's signals for the controller at the next step: read on the host already by the
        rollback check, or reduced on device now and copied to the host without waiting."""
        self._pending_step = step
        if self._checked_signals is not None:
            self._pending = HostCopy(torch.tensor(self._checked_signals, dtype=torch.float32))
            self._checked_signals = None
            return
        self._pending = HostCopy(self._reduced_signals(device))

    def _reduced_signals(self, device: torch.device) -> torch.Tensor:
        """[loss, has_loss, grad_norm, has_grad_norm, reward sum, reward count, router aux loss, has_aux_loss]
        summed over processes, on device (a NaN anywhere is NaN). The rewards recorded since the previous
        step are used up here."""
        taps = self._taps
        zero, one = torch.zeros((), device=device), torch.ones((), device=device)
        loss = taps.step_loss.to(device) if taps.step_loss is not None else None
        grad_norm, aux_loss = None, taps.step_aux_loss()
        if taps.grad_norm is not None:
            grad_norm = torch.as_tensor(taps.grad_norm).to(device=device, dtype=torch.float32).reshape(())
        reward, reward_count = self._step_reward()
        # Only a run with rewards copies them to the device (a small host-to-device copy per step).
        rewards = torch.tensor([reward, reward_count], device=device) if reward_count else torch.zeros(2, device=device)
        packed = torch.cat([torch.stack([
            zero if loss is None else loss, zero if loss is None else one,
            zero if grad_norm is None else grad_norm, zero if grad_norm is None else one,
        ]).float(), rewards.float(), torch.stack([
            zero if aux_loss is None else aux_loss.to(device), zero if aux_loss is None else one]).float()])
        return sum_across_processes(packed)

    # ------------------------------------------------------------------------------- rewards
    def track_rewards(self, reward_funcs: Callable[..., Any] | list[Callable[..., Any]]) -> list[Callable[..., Any]]:
        """Wrap TRL reward functions so their rewards reach the controller (names kept for TRL's metrics).

        A generation batch is scored once and may feed several optimizer steps. A step's reward is what
        TRL logs as `reward`: the `reward_weights`-weighted sum of each function's mean over the
        completions scored (in training) since the previous optimizer step, averaged over processes;
        steps without new rewards carry none. Pass the result as `reward_funcs=` to GRPOTrainer /
        RLOOTrainer. Reward models (and model names) are not wrapped: leave them out and the logged
        `reward` is used.
        """
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        if any(isinstance(func, (str, torch.nn.Module)) or not callable(func) for func in funcs):
            raise ValueError("track_rewards: reward_funcs must be functions (reward models and model names cannot "
                             "be wrapped; without tracked functions the logged `reward` is used)")
        self._reward_sums, self._reward_counts = [0.0] * len(funcs), [0] * len(funcs)
        return [self._tracked(func, index) for index, func in enumerate(funcs)]

    def _tracked(self, func: Callable[..., Any], index: int) -> Callable[..., Any]:
        def record(rewards: Any) -> None:
            trainer = self._active_trainer
            if trainer is not None and not trainer.model.training:
                return  # evaluation rewards are not a training step's
            values = rewards.tolist() if hasattr(rewards, "tolist") else rewards
            finite = [float(value) for value in values if value is not None and math.isfinite(float(value))]
            self._reward_sums[index] += math.fsum(finite)
            self._reward_counts[index] += len(finite)

        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def tracked_async(*args: Any, **kwargs: Any) -> Any:
                rewards = await func(*args, **kwargs)
                record(rewards)
                return rewards

            return tracked_async

        @functools.wraps(func)
        def tracked(*args: Any, **kwargs: Any) -> Any:
            rewards = func(*args, **kwargs)
            record(rewards)
            return rewards

        return tracked

    def _step_reward(self) -> tuple[float, float]:
        """(reward, 1) from the tracked functions (or the logged reward) since the last step, else (0, 0)."""
        if self._logged_reward is not None:
            reward, self._logged_reward = self._logged_reward, None
            return reward, 1.0
        scored = [index for index, count in enumerate(self._reward_counts) if count > 0]
        if not scored:
            return 0.0, 0.0
        weights = getattr(getattr(self._active_trainer, "args", None), "reward_weights", None) or \
            [1.0] * len(self._reward_counts)
        reward = math.fsum(weights[i] * self._reward_sums[i] / self._reward_counts[i] for i in scored)
        self._reward_sums, self._reward_counts = [0.0] * len(self._reward_sums), [0] * len(self._reward_counts)
        return reward, 1.0

    # ------------------------------------------------------------------------------ rollback
    def _check_step(self, step: int, device: torch.device, optimizer: torch.optim.Optimizer) -> RollbackAction | None:
        """Read this step's loss and gradient norm (all processes) before it is applied; skip or ask for a rollback."""
        self._checked_signals = self._reduced_signals(device).tolist()
        signals = _observation(step, self._checked_signals)
        loss, grad_norm = signals.loss, signals.grad_norm
        policy = self._rollback
        reason = policy.guard(loss, grad_norm)
        if reason is None:
            return policy.observe(step, loss)
        scaler = grad_scaler(self._active_trainer)
        if scaler is not None and loss is not None and math.isfinite(loss):
            # An fp16 overflow in the gradients: the grad scaler skips the step and lowers its scale. Not applied,
            # so, as for a step the guard skips, the controller never sees it and no dither follows it.
            self._drop_step_signals = True
            return None
        optimizer.zero_grad(set_to_none=True)
        self._drop_step_signals = True  # a skipped step is not evidence about the LR: the controller never sees it
        policy.record_skip(step)
        self.record(Event(step, -1, "guard", "skip_step", 1.0, 0.0, reason, quantity="step_applied"))
        if loss is not None and not math.isfinite(loss) and not self._weights_finite(device):
            return policy.damage(step, "non-finite weights")
        return None

    def _weights_finite(self, device: torch.device) -> bool:
        """Whether every trainable parameter is finite on every process (read only after a non-finite loss)."""
        params = [local_part(param) for param in self._model.parameters() if param.requires_grad]  # own shards
        bad = torch.stack([~torch.isfinite(param).all() for param in params]).sum().float().to(device)
        return sum_across_processes(bad).item() == 0

    def _parameter_actions(self, trainer: Any, optimizer: torch.optim.Optimizer,
                           ) -> tuple[Dither | None, ParameterFreezer | None]:
        """The dither and the freezer this run asked for and its parallelism allows."""
        wanted = self.config.exploration.enabled or self.config.freezing.enabled
        if not wanted:
            return None, None
        if uses_deepspeed(trainer) or any(
                isinstance(param, DTensor) for param in trainer.model.parameters()):
            logger.warning("R8: dither and freezing are off with DeepSpeed and FSDP (sharded parameters).")
            return None, None
        named = trainable_parameters(trainer.model, optimizer)
        self._trainable = [parameter for _, parameter in named]
        dither = Dither(self.config.exploration) if self.config.exploration.enabled else None
        freezer = None
        if self.config.freezing.enabled:
            freezer = ParameterFreezer(self.config.freezing, named, several_processes=trainer.args.world_size > 1)
        return dither, freezer

    def _supported_scope(self, trainer: Any) -> tuple[bool, bool]:
        """(check steps, take snapshots) for this run: what the parallelism in use allows."""
        config = self.config.rollback
        checks = config.enabled or config.guard_nonfinite
        if checks and uses_deepspeed(trainer):
            # DeepSpeed steps inside backward (zero_grad cannot skip) and keeps fp32 masters a snapshot misses.
            logger.warning("R8: the non-finite guard and rollback are off under DeepSpeed (its engine steps inside "
                           "backward and keeps its own fp32 master weights); for the same reason the LR R8 writes "
                           "before the optimizer step does not reach DeepSpeed's step (not supported yet).")
            return False, False
        sharded = any(isinstance(param, DTensor) for param in trainer.model.parameters())
        if config.enabled and uses_fsdp(trainer) and not sharded:
            # FSDP1 flattens parameters into its own FlatParameters; FSDP2 keeps each as a DTensor whose
            # local shard a snapshot can hold (each process its own, see snapshot.py).
            logger.warning("R8: rollback snapshots are off under FSDP1 (flattened parameters); use FSDP2 "
                           "(fsdp_version: 2) for sharded snapshots. The non-finite guard stays on.")
            return checks, False
        return checks, config.enabled

    def _roll_back(self, action: RollbackAction, step: int, args: TrainingArguments, control: TrainerControl,
                   optimizer: torch.optim.Optimizer) -> None:
        """Skip this step; for damage, also restore a snapshot, restart the LR lower and stabilize the data."""
        optimizer.zero_grad(set_to_none=True)  # the step in flight: a spike's batch, or damaged weights
        self._drop_step_signals = True
        if action.kind == "skip":
            self.record(Event(step, -1, "rollback", "skip_step", 1.0, 0.0, action.reason, quantity="step_applied"))
            return
        # The n-th rollback in a row goes n snapshots back, as far as `rollback.keep` allows.
        kept = self._healthy_snapshots
        snapshot = kept[-min(max(action.attempt, 1), len(kept))] if kept else None
        if snapshot is not None:
            self._restore_snapshot(snapshot)
            self._rollback.wasted_steps += step - 1 - snapshot.step
        if action.kind == "stop":
            control.should_training_stop = True
            self._rollback.attempt = 0  # a run resumed from the checkpoint below starts a fresh series
            if snapshot is not None or self._weights_finite(args.device):
                control.should_save = True
                where = f"the snapshot of step {snapshot.step}" if snapshot is not None else "the current weights"
                reason = f"{action.reason}; {where} is saved as the step-{step} checkpoint"
            else:
                reason = f"{action.reason}; no healthy state to save (no snapshot, non-finite weights)"
            logger.error("R8 rollback: %s", reason)
            self.record(Event(step, -1, "rollback", "stop", 1.0, 0.0, reason, quantity="training"))
            return
        origin = f"restored the snapshot of step {snapshot.step}" if snapshot is not None else \
            "no healthy snapshot yet, weights kept"
        reason = (f"{action.reason}: {origin} (rollback {action.attempt} in a row), "
                  f"LR x{action.recovery_lr_factor:.3g} "
                  f"back to x1 over {action.stabilize_steps} steps")
        if action.lasting_lr_factor < 1.0:
            reason += f", gain x{action.lasting_lr_factor:.3g} for good"
        sampler = getattr(self._active_trainer, "r8_sampler", None)
        if sampler is not None and action.stabilize_steps:
            # The sampler counts per-process batches of the global order; a step takes this many of them.
            sampler.stabilize(action.stabilize_steps * args.world_size * args.gradient_accumulation_steps)
            reason += f", the next {action.stabilize_steps} steps' batches from the lowest-loss quartile"
        for event in self.controller.rollback_brake(action.lasting_lr_factor, action.recovery_lr_factor,
                                                    action.stabilize_steps, step, reason):
            self.record(event)
        logger.warning("R8 rollback at step %d: %s", step, reason)

    def _restore_snapshot(self, snapshot: StateSnapshot) -> None:
        snapshot.restore(self._model, self._optimizer)
        extras = snapshot.extras
        self.controller.load_state_dict(extras["controller"])
        # The restored weights' loss is judged against the loss level they had, not the level reached since.
        self._rollback.detector.load_state_dict(extras["spike_detector"])
        random.setstate(extras["python_rng"])
        np.random.set_state(extras["numpy_rng"])
        torch.set_rng_state(extras["torch_rng"])
        if extras.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(extras["cuda_rng"])
        scaler = grad_scaler(self._active_trainer)
        if scaler is not None and extras.get("scaler") is not None:
            scaler.load_state_dict(extras["scaler"])
        if self._freezer is not None and extras.get("freezing") is not None:
            # Tensors frozen since were frozen on the discarded trajectory: back to the snapshot's frozen set.
            self._freezer.load_state_dict(extras["freezing"])

    def _take_snapshot(self, step: int, device: torch.device) -> bool:
        """Capture the weights after `step` updates; False when snapshots turned out not to fit in RAM."""
        config = self.config.rollback
        if not self._healthy_snapshots and not self._snapshots_fit(device):
            self._snapshots_allowed = False
            return False
        reused = self._healthy_snapshots.pop(0) if len(self._healthy_snapshots) >= config.keep else None
        snapshot = reused if reused is not None else StateSnapshot(self._snapshot_parameters)
        scaler = grad_scaler(self._active_trainer)
        extras = {
            "controller": self.controller.state_dict(),
            "spike_detector": self._rollback.detector.state_dict(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "freezing": self._freezer.policy.state_dict() if self._freezer is not None else None,
        }
        snapshot.capture(self._model, self._optimizer, step, extras)
        self._healthy_snapshots.append(snapshot)
        return True

    def _snapshots_fit(self, device: torch.device) -> bool:
        """Whether `keep` snapshots of every process on this machine fit in its free RAM, agreed by all processes."""
        config = self.config.rollback
        on_accelerator = device.type != "cpu"
        # Pinned host blocks are rounded up to a power of two: count the worst case, twice the bytes.
        per_process = config.keep * snapshot_bytes(self._model, self._optimizer, self._snapshot_parameters) * \
            (2 if on_accelerator else 1)
        processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        available = psutil.virtual_memory().available
        fits = per_process * processes_here <= config.max_ram_fraction * available
        refusals = sum_across_processes(torch.tensor([0.0 if fits else 1.0], device=device)).item()
        if refusals:
            logger.warning("R8 rollback is off: %d process(es) x %d snapshot(s) need %.2f GiB, more than "
                           "rollback.max_ram_fraction=%s of the %.2f GiB of host RAM available on some machine "
                           "(set rollback.scope='trainable' or keep=1).", processes_here, config.keep,
                           per_process * processes_here / 2**30, config.max_ram_fraction, available / 2**30)
        return refusals == 0

    def _add_log_metrics(self, logs: dict[str, float]) -> None:
        if self.controller is None:
            return
        metrics = self.controller.metrics()
        gains = [group.lr_gain for group in self.controller.groups]
        if len(set(gains)) > 1:
            metrics.update({f"lr_gain/group_{i}": gain for i, gain in enumerate(gains)})
        # The most recent non-HOLD decision since the previous log, so a log every N steps misses none.
        metrics.update(self._rollback.metrics() if self._rollback is not None else {})
        if self._freezer is not None:
            metrics["frozen_fraction"] = self._freezer.frozen_fraction
        metrics["decision"] = float(self._decision_since_log)
        metrics["events"] = float(self._events_since_log)
        self._events_since_log = self._decision_since_log = 0
        logs.update({f"r8/{key}": value for key, value in metrics.items() if math.isfinite(value)})

    # ---------------------------------------------------------------------------- checkpointing
    def state(self) -> dict[str, Any]:
        """Saved into trainer_state.json with every checkpoint (the stateful-callback interface)."""
        if self.controller is None:
            return {"args": {"config": self.config.to_dict()}, "attributes": {"r8_state": None}}
        pending = None
        if self._pending is not None:
            pending = {"step": self._pending_step, "values": self._pending.result().tolist()}
        r8_state = {
            "controller": self.controller.state_dict(),
            "pending": pending,
            "initial_gains": [spec.initial_gain for spec in self.controller.specs],
            "range_test_running": self._range_test is not None,
            "rollback": self._rollback.state_dict() if self._rollback is not None else None,
            "freezing": self._freezer.policy.state_dict() if self._freezer is not None else None,
            "applied": list(self._applied) if self._applied is not None else None,
            "run_files_rows": list(self._run_log.rows_written) if self._run_log is not None else None,
        }
        return {"args": {"config": self.config.to_dict()}, "attributes": {"r8_state": r8_state}}

    def _saved_state(self, state: TrainerState) -> dict[str, Any] | None:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        r8_state = (saved or {}).get("attributes", {}).get("r8_state")
        if r8_state is None:
            logger.warning("Resuming at step %d without saved R8Callback state: the controller starts fresh.",
                           state.global_step)
        return r8_state

    def _restore(self, r8_state: dict[str, Any]) -> None:
        if r8_state.get("range_test_running"):
            # The pre-test weights were only in RAM: the test is abandoned and training goes on at gain 1.
            logger.warning("The checkpoint was taken during the LR range test; resuming without it.")
            return
        self.controller.load_state_dict(r8_state["controller"])
        if r8_state.get("rollback") is not None:
            self._rollback.load_state_dict(r8_state["rollback"])
        if r8_state.get("freezing") is not None and self._freezer is not None:
            self._freezer.load_state_dict(r8_state["freezing"])
        pending = r8_state.get("pending")
        if pending is not None:
            self._pending_step = pending["step"]
            # Checkpoints saved before rewards (4 values) or router aux losses (6) were signals.
            values = pending["values"] + [0.0] * (_SIGNAL_COUNT - len(pending["values"]))
            self._pending = HostCopy(torch.tensor(values, dtype=torch.float32))


def _observation(step: int, reduced: list[float]) -> Observation:
    """The step's mean loss, gradient norm, reward and router aux loss from the (sum, count) pairs reduced
    across processes."""
    loss_sum, loss_count, grad_sum, grad_count, reward_sum, reward_count, aux_sum, aux_count = reduced
    return Observation(step=step, loss=loss_sum / loss_count if loss_count > 0 else None,
                       grad_norm=grad_sum / grad_count if grad_count > 0 else None,
                       reward=reward_sum / reward_count if reward_count > 0 else None,
                       router_aux_loss=aux_sum / aux_count if aux_count > 0 else None)


def _refuse_other_instances(trainer: Any) -> None:
    """Two R8 callbacks on one Trainer would each scale the LR the other wrote and share one set of run files."""
    count = sum(isinstance(other, R8Callback) for other in trainer.callback_handler.callbacks)
    if count > 1:
        raise ValueError(f"{type(trainer).__name__} has {count} R8 callbacks: one adapts the LR; keep one of them "
                         "(R8Trainer uses an R8Callback passed in callbacks=, or builds one from r8=).")


def _unwrap(scheduler: Any) -> Any:
    """The torch scheduler inside Accelerate's `AcceleratedScheduler`, if wrapped."""
    return getattr(scheduler, "scheduler", scheduler)
