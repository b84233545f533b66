"""One `Trainer.train()` with R8: its parts, built together when training begins, and what each step does.

`R8Callback` builds a `TrainerRun` in `on_train_begin` and hands every later event to it; the run owns the
controller and the parts that each do one job: the step's signals (`step_signals.py`), the LR written into
the optimizer (`lr_writer.py`), the guard and rollback (`rollback_manager.py`), the LR range test
(`range_test_runner.py`), dither and freezing (`parameter_actions.py`) and, shared with the callback across
runs, the outputs (`run_outputs.py`) and the rewards (`rewards.py`). Nothing of a run outlives the next
`train()`, so no state is ever reset by hand.

Under DeepSpeed the engine takes the real optimizer step, and steps its scheduler, inside backward, before
`on_pre_optimizer_step`: the LR of each step is written at the previous step's `on_step_end` (the first one's
when training begins), over the value the scheduler has just set. The controller has then seen the signals of
every step before it, as it has just before `optimizer.step()` without DeepSpeed, so the LRs are the same, with
no delay. The step is checked after the engine took it (`rollback_manager.py`), and the scheduler is made to
report the LR used before the Trainer logs it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_r8.control.config import R8Config
from hf_r8.control.controller import Controller, Observation
from hf_r8.control.events import Event
from hf_r8.integrations.compat import deepspeed_peak_lrs, deepspeed_step_skipped, uses_deepspeed
from hf_r8.integrations.lr_writer import LRWriter, steps_on_metrics
from hf_r8.integrations.parameter_actions import ParameterActions
from hf_r8.integrations.range_test_runner import RangeTestRunner
from hf_r8.integrations.rewards import RewardTracker
from hf_r8.integrations.rollback_manager import RollbackManager
from hf_r8.integrations.run_outputs import RunOutputs
from hf_r8.integrations.step_signals import StepSignals
from hf_r8.integrations.taps import TrainerTaps
from hf_r8.runtime.param_groups import group_specs

logger = logging.getLogger(__name__)


class TrainerRun:
    """The parts and the controller of one `train()` (see the module docstring)."""

    def __init__(self, config: R8Config, trainer: Any, optimizer: torch.optim.Optimizer, args: TrainingArguments,
                 state: TrainerState, outputs: RunOutputs, rewards: RewardTracker) -> None:
        self.config, self.trainer, self.optimizer, self.outputs = config, trainer, optimizer, outputs
        self.total_steps, self.warmup_steps = state.max_steps, args.get_warmup_steps(state.max_steps)
        self.taps = TrainerTaps(trainer, self.add_log_metrics, on_error=self.end_by_exception)
        self.rollback = RollbackManager(config.rollback, trainer, optimizer, self.record)
        self.actions = ParameterActions.for_run(config, trainer, optimizer)
        self.rollback.freezer = self.actions.freezer if self.actions is not None else None
        self.signals = StepSignals(self.taps, rewards, args.device)
        self.lr = LRWriter()
        self.controller: Controller | None = None
        self.range_test: RangeTestRunner | None = None
        self.update_loop = False
        self.engine_steps_in_backward = uses_deepspeed(trainer)
        """DeepSpeed: each step's LR is written at the previous `on_step_end` (see the module docstring)."""
        if self.engine_steps_in_backward:
            self.record_engine_base_lrs()

    def record_engine_base_lrs(self) -> None:
        """The controller's base LR of each group is the schedule's `initial_lr`: DeepSpeed's own schedulers
        record none and start at their minimum (0), so their peak stands in for it."""
        peaks = deepspeed_peak_lrs(self.trainer)
        for group, peak in zip(self.optimizer.param_groups, peaks or [], strict=False):
            group.setdefault("initial_lr", peak)

    def start(self, args: TrainingArguments, state: TrainerState, saved: dict[str, Any] | None) -> None:
        """Build the controller, restore a checkpoint's state or start the range test, tap the Trainer, open the
        outputs."""
        self.build_controller(initial_gains=(saved or {}).get("initial_gains"))
        if saved is not None:
            self.load_state_dict(saved)
        elif state.global_step == 0:
            self.range_test = RangeTestRunner.start(
                self.config.range_test, state.max_steps, self.rollback, args.device,
                take_snapshot=lambda: self.rollback.take_snapshot(0, args.device, self.controller))
        if self.engine_steps_in_backward:
            self.write_first_engine_lr(state.global_step, (saved or {}).get("schedule_lrs"))
        self.taps.install()
        self.outputs.open(args, state, self.trainer.callback_handler.callbacks, (saved or {}).get("run_files_rows"),
                          self.range_test.sweep_line() if self.range_test is not None else None)

    def write_first_engine_lr(self, step: int, saved_schedule_lrs: list[float] | None) -> None:
        """Under DeepSpeed: the LR of this run's first step. A resumed optimizer holds the LR R8 wrote when the
        checkpoint was saved: the schedule's values saved with it go back first."""
        if saved_schedule_lrs:
            self.lr.hold_schedule(self.optimizer, saved_schedule_lrs)
        self.write_lr(self.optimizer, self.trainer.lr_scheduler, step)

    def build_controller(self, initial_gains: list[float] | None = None, warmup_steps: int | None = None) -> None:
        specs = group_specs(self.optimizer, initial_gains, self.trainer.model, self.config.moe.router_patterns)
        self.controller = Controller(self.config, specs, self.total_steps,
                                     self.warmup_steps if warmup_steps is None else warmup_steps)

    def record(self, event: Event) -> None:
        self.outputs.record(event, self.controller.metrics() if self.controller is not None else {})

    # ------------------------------------------------------------------------------- each step
    def step_begin(self, step: int) -> None:
        self.taps.start_step()
        if self.actions is not None and self.range_test is None:
            self.actions.before_step(step)

    def before_optimizer_step(self, step_index: int, args: TrainingArguments, control: TrainerControl,
                              optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> None:
        """Observe the last step, check or sweep this one, and write its LR (under DeepSpeed: check the step the
        engine has just taken; its LR was written at the last `on_step_end`)."""
        if self.engine_steps_in_backward:
            if self.rollback.checks_steps:
                self.rollback.before_step(step_index + 1, self.signals, self.controller, args, control)
            return
        self.observe_pending()
        if self.range_test is not None:
            if self.range_test.step(step_index, self.signals, optimizer):
                self.finish_range_test(step_index + 1)
        elif self.rollback.checks_steps:
            self.rollback.before_step(step_index + 1, self.signals, self.controller, args, control)
        if self.actions is not None and self.range_test is None:  # also on a skipped step: ends its probe
            for event in self.actions.after_backward(step_index + 1):
                self.record(event)
        self.write_lr(optimizer, lr_scheduler, step_index)

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> None:
        if self.engine_steps_in_backward:  # the Trainer reads the LR to log now, after the engine's scheduler stepped
            self.lr.report_used(lr_scheduler)
            return
        if not steps_on_metrics(lr_scheduler):
            self.lr.restore_schedule(optimizer)
        if (self.actions is not None and self.range_test is None and not self.signals.dropped
                and step > self.controller.warmup_steps):
            self.actions.after_optimizer_step(step, self.controller.sigma)

    def step_end(self, step: int, optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> None:
        if self.engine_steps_in_backward:
            if deepspeed_step_skipped(self.trainer):  # its scheduler did not step: the group holds R8's LR
                self.lr.restore_schedule(optimizer)
        elif not self.update_loop and (self.lr.applied is None or self.lr.applied[0] != step):
            self.enter_update_loop(step)
        if steps_on_metrics(lr_scheduler):
            self.lr.restore_schedule(optimizer)
        dropped = self.signals.end_step(step)
        if dropped is not None:  # a skipped or rolled-back step: the controller never sees its loss
            self.record_step(dropped)
        # The next update's (or DeepSpeed step's) LR, from this one's signals (one small host read per step).
        if self.update_loop or self.engine_steps_in_backward:
            self.observe_pending()
            self.write_lr(optimizer, lr_scheduler, step)
        counts = self.rollback.counts()
        self.outputs.step_end(step, counts["rollbacks"], counts["skipped_steps"])

    def read_logs(self, step: int, logs: dict[str, float] | None) -> None:
        if self.update_loop and self.lr.holds_schedule:  # an update loop logs, then steps its scheduler
            self.lr.restore_schedule(self.optimizer)
        sampler = getattr(self.trainer, "r8_sampler", None)
        batch_mix = None
        if sampler is not None:
            batch_mix = [1.0, 0.0, 0.0, 0.0] if sampler.stabilize_batches else \
                (sampler.counts / sampler.batch_size).tolist()
        self.outputs.read_logs(step, logs, batch_mix)

    def observe_pending(self) -> None:
        """The last finished step's signals: recorded, and, outside the range test, given to the controller."""
        observation = self.signals.take_pending()
        if observation is None:
            return
        self.record_step(observation)
        if self.range_test is not None:  # the test reads each step's loss itself
            return
        for event in self.controller.observe(observation):
            self.record(event)

    def record_step(self, observation: Observation) -> None:
        controller = self.controller
        extras = {"momentum": controller.momentum(0), "loss_ema": controller.loss.ema.value}
        if self.config.exploration.enabled:
            extras["sigma"] = controller.sigma
        self.outputs.record_step(observation, self.lr.used_at(observation.step), extras)

    def write_lr(self, optimizer: torch.optim.Optimizer, lr_scheduler: Any, step_index: int) -> None:
        """The LR (and momentum) of this optimizer step; during a range test, base_lr x its gain."""
        controller = self.controller
        if self.range_test is not None:
            gain = self.range_test.gain(step_index)
            self.lr.write(optimizer, lr_scheduler, step_index + 1,
                          lambda index, _: controller.specs[index].base_lr * gain, lambda index: None)
        else:
            self.lr.write(optimizer, lr_scheduler, step_index + 1, controller.compose_lr, controller.momentum)

    def add_log_metrics(self, logs: dict[str, float]) -> None:
        """The controller's, rollback's, the freezer's and the events' `r8/*` metrics, into a training log."""
        metrics = self.controller.metrics()
        gains = [group.lr_gain for group in self.controller.groups]
        if len(set(gains)) > 1:
            metrics.update({f"lr_gain/group_{i}": gain for i, gain in enumerate(gains)})
        metrics.update(self.rollback.policy.metrics())
        if self.actions is not None:
            metrics.update(self.actions.metrics())
        metrics.update(self.outputs.log_counts())
        logs.update({f"r8/{key}": value for key, value in metrics.items() if math.isfinite(value)})

    # ------------------------------------------------------------------------ the run's phases
    def enter_update_loop(self, step: int) -> None:
        """The Trainer runs its own loop (TRL's PPOTrainer: several optimizer steps per PPO update) and fires
        only `on_step_end` per update, not `on_pre_optimizer_step`: from now on the LR and momentum are set
        once per update, at its end, for the next one. Nothing can be checked before an optimizer step there,
        so the non-finite guard, rollback and the LR range test are off."""
        self.update_loop = True
        if self.rollback.checks_steps or self.range_test is not None:
            logger.warning("R8: %s runs its own loop (no on_pre_optimizer_step): the LR is set once per update "
                           "(from step %d); the non-finite guard, rollback and the LR range test are off.",
                           type(self.trainer).__name__, step)
        self.rollback.turn_off()
        self.range_test = None

    def finish_range_test(self, step: int) -> None:
        """Restore the weights from before the test and rebase the controller on the chosen gain."""
        test = self.range_test
        test.restore(self.rollback)
        gain = test.chosen_gain()
        self.range_test = None
        self.signals.discard_pending()
        self.build_controller(initial_gains=[gain] * len(self.optimizer.param_groups),
                              warmup_steps=max(self.warmup_steps, step))
        snapshots = self.rollback.snapshots
        if test.shares_snapshot and snapshots and test.snapshot is snapshots[-1]:
            # Rollback's snapshot holds the weights training goes on from, now at this step, with this controller.
            test.snapshot.step = step
            test.snapshot.extras["controller"] = self.controller.state_dict()
            self.rollback.policy.snapshot_taken(step)
        self.record(test.finished_event(step, gain))
        base_lrs = [spec.base_lr for spec in self.controller.specs]
        self.outputs.range_test_done(test.record(step, gain, base_lrs), test.chosen_line(step, gain, base_lrs[0]))

    def end(self, step: int) -> None:
        """Leave the model and the Trainer as they would be without R8: the range test's weights undone,
        frozen tensors trainable again, the taps removed."""
        if self.range_test is not None:
            self.range_test.restore(self.rollback)
            self.signals.discard_pending()
            self.record(self.range_test.abandon_event(step))
            self.range_test = None
        if self.actions is not None:
            self.actions.release()
        self.taps.remove()

    def record_last_step(self) -> None:
        """The last step's row, for the record only (no decision follows it)."""
        if self.range_test is None:
            observation = self.signals.take_pending()
            if observation is not None:
                self.record_step(observation)

    def end_by_exception(self, error: BaseException) -> None:
        """Training raised (a notebook may catch it and go on): end the run as `on_train_end` would, and stop
        the dashboard and close the run files with what they hold (no report: the run did not finish)."""
        try:
            self.end(self.trainer.state.global_step)
            self.record_last_step()
            self.outputs.close()
        except Exception as cleanup_error:  # the user must see the error training raised, not this one
            logger.warning("R8: cleaning up after %r failed: %r", error, cleanup_error)
            return
        logger.warning("R8: training raised %s; the dashboard is stopped, the run files are closed and the "
                       "Trainer's methods are unwrapped.", type(error).__name__)

    # ---------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        freezer = self.actions.freezer if self.actions is not None else None
        return {
            "controller": self.controller.state_dict(),
            "pending": self.signals.state_dict(),
            "initial_gains": [spec.initial_gain for spec in self.controller.specs],
            "range_test_running": self.range_test is not None,
            "rollback": self.rollback.policy.state_dict(),
            "freezing": freezer.policy.state_dict() if freezer is not None else None,
            "applied": list(self.lr.applied) if self.lr.applied is not None else None,
            "schedule_lrs": self.lr.schedule_lrs,
            "run_files_rows": self.outputs.rows_written,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved.get("range_test_running"):
            # The pre-test weights were only in RAM: the test is abandoned and training goes on at gain 1.
            logger.warning("The checkpoint was taken during the LR range test; resuming without it.")
            return
        self.controller.load_state_dict(saved["controller"])
        if saved.get("rollback") is not None:
            self.rollback.policy.load_state_dict(saved["rollback"])
        if saved.get("freezing") is not None and self.rollback.freezer is not None:
            self.rollback.freezer.load_state_dict(saved["freezing"])
        self.signals.load_state_dict(saved.get("pending"))
        if saved.get("applied"):
            self.lr.applied = tuple(saved["applied"])
