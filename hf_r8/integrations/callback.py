"""`R8Callback`: the adaptive controller wired into `transformers.Trainer` (wiring only).

Per optimizer step, in the Trainer's own event order:

* `on_step_begin`: start collecting this step's loss and gradient norm (`taps.py`);
* `on_pre_optimizer_step`: feed the controller the previous step's signals (already on the host, so no
  device sync waits on this step, `step_signals.py`); check this step before it is applied, skipping or
  rolling back (`rollback_manager.py`) or sweeping the LR range test (`range_test_runner.py`); write
  `schedule_lr * gain` into every parameter group (`lr_writer.py`);
* `on_optimizer_step` / `on_step_end`: give the scheduler its own value back before it steps; dither
  (`parameter_actions.py`); reduce this step's signals across processes and start their copy to the host.

A Trainer that runs its own loop and fires only `on_step_end` (TRL's PPOTrainer: one event per PPO
update of several optimizer steps) is recognised at its first `on_step_end`: the LR is then set once
per update, at its end, for the next one (see `_enter_update_loop`).

Everything a run needs is built in `on_train_begin` (`_Run`); what the user sees (events, dashboard,
run files, report) is `run_outputs.py`'s, and every transformers internal goes through `compat.py`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from hf_r8.control.config import R8Config
from hf_r8.control.controller import Controller, Event, GroupSpec, Observation
from hf_r8.control.resolve import ConfigLike, resolve_config
from hf_r8.integrations.compat import find_trainer, give_stateful_entry, rebuilt_from_checkpoint
from hf_r8.integrations.lr_writer import LRWriter, steps_on_metrics
from hf_r8.integrations.parameter_actions import ParameterActions
from hf_r8.integrations.range_test_runner import RangeTestRunner
from hf_r8.integrations.rewards import RewardTracker
from hf_r8.integrations.rollback_manager import RollbackManager
from hf_r8.integrations.run_outputs import RunOutputs
from hf_r8.integrations.step_signals import StepSignals
from hf_r8.integrations.taps import TrainerTaps
from hf_r8.runtime.moe import is_router_parameter
from hf_r8.runtime.param_groups import read_momentum

logger = logging.getLogger(__name__)

# The version of the state R8Callback saves in checkpoints; a checkpoint without one is version 1.
STATE_VERSION = 2
# The R8Callback each Trainer was built with (or bound to): the one to keep live when transformers'
# `restore_callback_states_from_checkpoint` swaps in a copy rebuilt from the checkpoint. Weak both ways: the
# callback refers to its Trainer, so a strong value would keep both alive for ever.
_LIVE_CALLBACKS: weakref.WeakKeyDictionary[Any, weakref.ref[R8Callback]] = weakref.WeakKeyDictionary()


@dataclass
class _Run:
    """One `train()`'s parts, built in `on_train_begin` and dropped with it."""

    trainer: Any
    optimizer: torch.optim.Optimizer
    taps: TrainerTaps
    signals: StepSignals
    lr: LRWriter
    rollback: RollbackManager
    actions: ParameterActions | None
    total_steps: int
    warmup_steps: int
    range_test: RangeTestRunner | None = None
    update_loop: bool = False


class R8Callback(TrainerCallback, ExportableState):
    """Adapts the learning rate (and optionally momentum) of a `transformers.Trainer` online.

    The Trainer's schedule (`lr_scheduler_type`, warmup) stays the base: the LR used at each
    optimizer step is the schedule's value times the controller's gain, within safe bounds.
    Adaptation starts after the Trainer's warmup. Decisions, with their reasons, are kept in
    `events` and logged; `r8/*` metrics reach every reporter and `state.log_history`. The
    controller state is saved with every checkpoint and restored by `resume_from_checkpoint`
    (no `restore_callback_states_from_checkpoint` needed).

    Args:
        config: an `R8Config`, its dict form, a preset name, a YAML path, or None for the `default` preset.

    Example:
        ```python
        from transformers import Trainer
        from hf_r8 import R8Callback

        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[R8Callback()])
        trainer.train()
        ```
    """

    def __init__(self, config: ConfigLike = None) -> None:
        self.config = resolve_config(config)
        self.controller: Controller | None = None
        self._outputs = RunOutputs(self.config.run_files, self.config.dashboard, self.config.report)
        self._rewards = RewardTracker()
        self._trainer: Any = None
        self._run: _Run | None = None

    @property
    def events(self) -> Any:
        """The decisions, skips and rollbacks of every run so far (the last 10,000), with their reasons."""
        return self._outputs.events

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
        return self

    def track_rewards(self, reward_funcs: Any) -> list[Any]:
        """Wrap TRL reward functions so their rewards reach the controller (see `rewards.py`); pass the result
        as `reward_funcs=` to GRPOTrainer / RLOOTrainer. Reward models and model names cannot be wrapped:
        leave them out and the logged `reward` is used."""
        return self._rewards.track(reward_funcs)

    def record(self, event: Event) -> None:
        """Keep `event`, log it, and write it to the run files and the dashboard (R8Trainer adds its own)."""
        self._outputs.record(event, self.controller.metrics() if self.controller is not None else {})

    def close(self) -> None:
        """Stop the dashboard and close the run files now (done when training ends, also by an exception)."""
        self._outputs.close()

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
        self.config.validate()  # fields may have been assigned since the callback was built
        _refuse_other_instances(trainer)
        if optimizer is None or not getattr(optimizer, "param_groups", None):
            raise ValueError(f"optimizer={optimizer!r}: R8Callback needs a torch optimizer with param_groups")
        give_stateful_entry(state, type(self).__name__, self.state())  # resuming a stock checkpoint
        self._end_run(state.global_step)  # a run that raised never reached on_train_end
        saved = self._saved_state(state) if state.global_step > 0 else None
        self._run = run = self._new_run(trainer, optimizer, args, state)
        self._rewards.start_run(trainer)
        self._build_controller(initial_gains=(saved or {}).get("initial_gains"))
        if saved is not None:
            self._restore(saved)
        elif state.global_step == 0:
            run.range_test = RangeTestRunner.start(
                self.config.range_test, state.max_steps, run.rollback, args.device,
                take_snapshot=lambda: run.rollback.take_snapshot(0, args.device, self.controller))
        run.taps.install()
        self._outputs.open(args, state, trainer.callback_handler.callbacks, (saved or {}).get("run_files_rows"),
                           run.range_test.sweep_line() if run.range_test is not None else None)

    def _new_run(self, trainer: Any, optimizer: torch.optim.Optimizer, args: TrainingArguments,
                 state: TrainerState) -> _Run:
        taps = TrainerTaps(trainer, self._add_log_metrics, on_error=self._end_by_exception)
        rollback = RollbackManager(self.config.rollback, trainer, optimizer, self.record)
        actions = ParameterActions.for_run(self.config, trainer, optimizer)
        rollback.freezer = actions.freezer if actions is not None else None
        signals = StepSignals(taps, self._rewards, args.device)
        return _Run(trainer=trainer, optimizer=optimizer, taps=taps, signals=signals, lr=LRWriter(), rollback=rollback,
                    actions=actions, total_steps=state.max_steps, warmup_steps=args.get_warmup_steps(state.max_steps))

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
        run = self._run
        run.signals.taps.start_step()
        if run.actions is not None and run.range_test is None:
            run.actions.before_step(state.global_step + 1)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: torch.optim.Optimizer, lr_scheduler: Any = None, **kwargs: Any):
        run = self._run
        self._observe_pending()
        if run.range_test is not None:
            if run.range_test.step(state.global_step, run.signals, optimizer):
                self._finish_range_test(state.global_step + 1)
        elif run.rollback.checks_steps:
            run.rollback.before_step(state.global_step + 1, run.signals, self.controller, args, control)
        if run.actions is not None and run.range_test is None:  # also on a skipped step: ends its probe
            for event in run.actions.after_backward(state.global_step + 1):
                self.record(event)
        self._write_lr(optimizer, lr_scheduler, state.global_step)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          optimizer: torch.optim.Optimizer, lr_scheduler: Any = None, **kwargs: Any):
        run = self._run
        if not steps_on_metrics(lr_scheduler):
            run.lr.restore_schedule(optimizer)
        step = state.global_step + 1
        if (run.actions is not None and run.range_test is None and not run.signals.dropped
                and step > self.controller.warmup_steps):
            run.actions.after_optimizer_step(step, self.controller.sigma)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    optimizer: torch.optim.Optimizer, lr_scheduler: Any = None, **kwargs: Any):
        run = self._run
        if not run.update_loop and (run.lr.applied is None or run.lr.applied[0] != state.global_step):
            self._enter_update_loop(state.global_step)
        if steps_on_metrics(lr_scheduler):
            run.lr.restore_schedule(optimizer)
        dropped = run.signals.end_step(state.global_step)
        if dropped is not None:  # a skipped or rolled-back step: the controller never sees its loss
            self._record_step(dropped)
        if run.update_loop:  # the next update's LR, from this update's signals (one small host read per update)
            self._observe_pending()
            self._write_lr(optimizer, lr_scheduler, state.global_step)
        counts = run.rollback.counts()
        self._outputs.step_end(state.global_step, counts["rollbacks"], counts["skipped_steps"])

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any):
        run = self._run
        if run is not None and run.update_loop and run.lr.holds_schedule:  # an update loop logs, then steps
            run.lr.restore_schedule(run.optimizer)
        self._rewards.read_logs(logs)
        sampler = getattr(run.trainer, "r8_sampler", None) if run is not None else None
        batch_mix = None
        if sampler is not None:
            batch_mix = [1.0, 0.0, 0.0, 0.0] if sampler.stabilize_batches else \
                (sampler.counts / sampler.batch_size).tolist()
        self._outputs.read_logs(state.global_step, logs, batch_mix)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._outputs.flush()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._end_run(state.global_step)
        self._record_last_step()
        self._outputs.finish(args.output_dir)

    # -------------------------------------------------------------------------------- the wiring
    def _end_run(self, step: int) -> None:
        """Leave the model and the Trainer as they would be without R8: the range test's weights undone,
        frozen tensors trainable again, the taps removed."""
        run = self._run
        if run is None:
            return
        if run.range_test is not None:
            run.range_test.restore(run.rollback)
            run.signals.discard_pending()
            self.record(run.range_test.abandon_event(step))
            run.range_test = None
        if run.actions is not None:
            run.actions.release()
        run.taps.remove()

    def _end_by_exception(self, error: BaseException) -> None:
        """Training raised (a notebook may catch it and go on): end the run as `on_train_end` would, and stop
        the dashboard and close the run files with what they hold (no report: the run did not finish)."""
        try:
            self._end_run(self._run.trainer.state.global_step)
            self._record_last_step()
            self._outputs.close()
        except Exception as cleanup_error:  # the user must see the error training raised, not this one
            logger.warning("R8: cleaning up after %r failed: %r", error, cleanup_error)
            return
        logger.warning("R8: training raised %s; the dashboard is stopped, the run files are closed and the "
                       "Trainer's methods are unwrapped.", type(error).__name__)

    def _build_controller(self, initial_gains: list[float] | None = None, warmup_steps: int | None = None) -> None:
        run = self._run
        model = run.trainer.model
        names = {id(param): name for name, param in model.named_parameters()} if model is not None else {}
        patterns = self.config.moe.router_patterns
        specs = []
        for index, group in enumerate(run.optimizer.param_groups):
            base_lr = float(group.get("initial_lr", group["lr"]))
            param_names = [names.get(id(param), "") for param in group["params"]]
            is_router = bool(param_names) and all(is_router_parameter(name, patterns) for name in param_names)
            initial_gain = initial_gains[index] if initial_gains else 1.0
            specs.append(GroupSpec(base_lr, read_momentum(group), is_router, initial_gain))
        self.controller = Controller(self.config, specs, run.total_steps,
                                     run.warmup_steps if warmup_steps is None else warmup_steps)

    def _enter_update_loop(self, step: int) -> None:
        """The Trainer runs its own loop (TRL's PPOTrainer: several optimizer steps per PPO update) and fires
        only `on_step_end` per update, not `on_pre_optimizer_step`: from now on the LR and momentum are set
        once per update, at its end, for the next one. Nothing can be checked before an optimizer step there,
        so the non-finite guard, rollback and the LR range test are off."""
        run = self._run
        run.update_loop = True
        if run.rollback.checks_steps or run.range_test is not None:
            logger.warning("R8: %s runs its own loop (no on_pre_optimizer_step): the LR is set once per update "
                           "(from step %d); the non-finite guard, rollback and the LR range test are off.",
                           type(run.trainer).__name__, step)
        run.rollback.turn_off()
        run.range_test = None

    def _finish_range_test(self, step: int) -> None:
        """Restore the weights from before the test and rebase the controller on the chosen gain."""
        run = self._run
        test = run.range_test
        test.restore(run.rollback)
        gain = test.chosen_gain()
        run.range_test = None
        run.signals.discard_pending()
        self._build_controller(initial_gains=[gain] * len(run.optimizer.param_groups),
                               warmup_steps=max(run.warmup_steps, step))
        if test.shares_snapshot and run.rollback.snapshots and test.snapshot is run.rollback.snapshots[-1]:
            # Rollback's snapshot holds the weights training goes on from, now at this step, with this controller.
            test.snapshot.step = step
            test.snapshot.extras["controller"] = self.controller.state_dict()
            run.rollback.policy.snapshot_taken(step)
        self.record(test.finished_event(step, gain))
        base_lrs = [spec.base_lr for spec in self.controller.specs]
        self._outputs.range_test_done(test.record(step, gain, base_lrs), test.chosen_line(step, gain, base_lrs[0]))

    def _observe_pending(self) -> None:
        """The last finished step's signals: recorded, and, outside the range test, given to the controller."""
        observation = self._run.signals.take_pending()
        if observation is None:
            return
        self._record_step(observation)
        if self._run.range_test is not None:  # the test reads each step's loss itself
            return
        for event in self.controller.observe(observation):
            self.record(event)

    def _record_step(self, observation: Observation) -> None:
        controller = self.controller
        extras = {"momentum": controller.momentum(0), "loss_ema": controller.loss.ema.value}
        if self.config.exploration.enabled:
            extras["sigma"] = controller.sigma
        self._outputs.record_step(observation, self._run.lr.used_at(observation.step), extras)

    def _record_last_step(self) -> None:
        """The last step's row, for the record only (no decision follows it)."""
        run = self._run
        if run is not None and run.range_test is None:
            observation = run.signals.take_pending()
            if observation is not None:
                self._record_step(observation)

    def _write_lr(self, optimizer: torch.optim.Optimizer, lr_scheduler: Any, step_index: int) -> None:
        """The LR (and momentum) of this optimizer step; during a range test, base_lr x its gain."""
        run, controller = self._run, self.controller
        if run.range_test is not None:
            gain = run.range_test.gain(step_index)
            run.lr.write(optimizer, lr_scheduler, step_index + 1,
                         lambda index, _: controller.specs[index].base_lr * gain, lambda index: None)
        else:
            run.lr.write(optimizer, lr_scheduler, step_index + 1, controller.compose_lr, controller.momentum)

    def _add_log_metrics(self, logs: dict[str, float]) -> None:
        if self.controller is None:
            return
        metrics = self.controller.metrics()
        gains = [group.lr_gain for group in self.controller.groups]
        if len(set(gains)) > 1:
            metrics.update({f"lr_gain/group_{i}": gain for i, gain in enumerate(gains)})
        run = self._run
        metrics.update(run.rollback.policy.metrics())
        if run.actions is not None:
            metrics.update(run.actions.metrics())
        metrics.update(self._outputs.log_counts())
        logs.update({f"r8/{key}": value for key, value in metrics.items() if math.isfinite(value)})

    # ---------------------------------------------------------------------------- checkpointing
    def state(self) -> dict[str, Any]:
        """Saved into trainer_state.json with every checkpoint (the stateful-callback interface)."""
        run = self._run
        if self.controller is None or run is None:
            return {"args": {"config": self.config.to_dict()}, "attributes": {"r8_state": None}}
        freezer = run.actions.freezer if run.actions is not None else None
        r8_state = {
            "version": STATE_VERSION,
            "controller": self.controller.state_dict(),
            "pending": run.signals.state_dict(),
            "initial_gains": [spec.initial_gain for spec in self.controller.specs],
            "range_test_running": run.range_test is not None,
            "rollback": run.rollback.policy.state_dict(),
            "freezing": freezer.policy.state_dict() if freezer is not None else None,
            "applied": list(run.lr.applied) if run.lr.applied is not None else None,
            "run_files_rows": self._outputs.rows_written,
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
            return None
        version = r8_state.get("version", 1)
        if version > STATE_VERSION:
            raise ValueError(f"the checkpoint's R8Callback state is version {version}, newer than this hf_r8 reads "
                             f"({STATE_VERSION}): upgrade hf_r8 to resume it")
        return r8_state

    def _restore(self, r8_state: dict[str, Any]) -> None:
        run = self._run
        if r8_state.get("range_test_running"):
            # The pre-test weights were only in RAM: the test is abandoned and training goes on at gain 1.
            logger.warning("The checkpoint was taken during the LR range test; resuming without it.")
            return
        self.controller.load_state_dict(r8_state["controller"])
        if r8_state.get("rollback") is not None:
            run.rollback.policy.load_state_dict(r8_state["rollback"])
        if r8_state.get("freezing") is not None and run.rollback.freezer is not None:
            run.rollback.freezer.load_state_dict(r8_state["freezing"])
        run.signals.load_state_dict(r8_state.get("pending"))
        if r8_state.get("applied"):
            run.lr.applied = tuple(r8_state["applied"])


def _refuse_other_instances(trainer: Any) -> None:
    """Two R8 callbacks on one Trainer would each scale the LR the other wrote and share one set of run files."""
    count = sum(isinstance(other, R8Callback) for other in trainer.callback_handler.callbacks)
    if count > 1:
        raise ValueError(f"{type(trainer).__name__} has {count} R8 callbacks: one adapts the LR; keep one of them "
                         "(R8Trainer uses an R8Callback passed in callbacks=, or builds one from r8=).")
