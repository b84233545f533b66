"""One `Trainer.train()` with R8: its parts, built together when training begins, and what each step does.

`R8Callback` builds a `TrainerRun` in `on_train_begin` and hands every later event to it; the run owns the
engine (`control/engine.py`: the controller, rollback policy, range test, sampler's part in a rollback, events)
and the parts that translate the Trainer's events into its calls, each doing one job: the step's signals
(`step_signals.py`), the LR written into the optimizer (`lr_writer.py`), the guard and rollback on the model
(`rollback_manager.py`), the LR range test on the model (`range_test_runner.py`), dither and freezing
(`parameter_actions.py`) and, shared with the callback across runs, the outputs (`run_outputs.py`) and the
rewards (`rewards.py`). Nothing of a run outlives the next `train()`, so no state is ever reset by hand.

Under DeepSpeed, DeepSpeed's engine takes the real optimizer step, and steps its scheduler, inside backward,
before `on_pre_optimizer_step`: the LR of each step is written at the previous step's `on_step_end` (the first
one's when training begins), over the value the scheduler has just set. The controller has then seen the signals
of every step before it, as it has just before `optimizer.step()` without DeepSpeed, so the LRs are the same,
with no delay. The step is checked after the engine took it (`rollback_manager.py`), and the scheduler is made
to report the LR used before the Trainer logs it.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_r8.control.config import R8Config
from hf_r8.control.controller import Controller, Observation
from hf_r8.control.engine import Engine
from hf_r8.control.events import Event
from hf_r8.control.hypergradient import measures_update_alignment
from hf_r8.integrations.compat_deepspeed import deepspeed_peak_lrs, deepspeed_step_skipped, uses_deepspeed
from hf_r8.integrations.lr_writer import LRWriter, schedule_ahead, steps_on_metrics
from hf_r8.integrations.parameter_actions import ParameterActions
from hf_r8.integrations.range_test_runner import RangeTestRunner
from hf_r8.integrations.rewards import RewardTracker
from hf_r8.integrations.rollback_manager import RollbackManager
from hf_r8.integrations.run_outputs import RunOutputs
from hf_r8.integrations.step_signals import StepSignals
from hf_r8.integrations.taps import TrainerTaps
from hf_r8.runtime.param_groups import group_specs
from hf_r8.runtime.update_alignment import AlignmentProbe

logger = logging.getLogger(__name__)


class TrainerRun:
    """The engine and the parts of one `train()` (see the module docstring).

    Args:
        events: the callback's event log, kept across its runs.
    """

    def __init__(self, config: R8Config, trainer: Any, optimizer: torch.optim.Optimizer, args: TrainingArguments,
                 state: TrainerState, outputs: RunOutputs, rewards: RewardTracker, events: deque[Event]) -> None:
        self.config, self.trainer, self.optimizer, self.outputs = config, trainer, optimizer, outputs
        self.deepspeed_steps_in_backward = uses_deepspeed(trainer)
        """DeepSpeed: each step's LR is written at the previous `on_step_end` (see the module docstring)."""
        if self.deepspeed_steps_in_backward:
            self.record_engine_base_lrs()
        self.engine = Engine(
            config, group_specs(optimizer, None, trainer.model, config.moe.router_patterns), state.max_steps,
            args.get_warmup_steps(state.max_steps), applied_before_check=self.deepspeed_steps_in_backward,
            plan=getattr(trainer, "r8_sampler", None),
            batches_per_step=args.world_size * args.gradient_accumulation_steps,
            events=events, listener=self.show, schedule_ahead=schedule_ahead(trainer.lr_scheduler))
        self.taps = TrainerTaps(trainer, self.add_log_metrics, on_error=self.end_by_exception)
        self.rollback = RollbackManager(config.rollback, trainer, optimizer, self.engine)
        self.actions = ParameterActions.for_run(config, trainer, optimizer)
        self.rollback.freezer = self.actions.freezer if self.actions is not None else None
        self.signals = StepSignals(self.taps, rewards, args.device)
        self.alignment = AlignmentProbe() if measures_update_alignment(config) else None
        if self.alignment is not None and self.deepspeed_steps_in_backward:
            logger.warning("hf_r8: the hypergradient rule holds the gain under DeepSpeed: its engine steps inside "
                           "backward, before the update alignment could be measured")
        self.lr = LRWriter()
        self.found_gains: list[float] | None = None
        """The gains this run's LR range test chose (or reused): the next `train()` of the callback starts there."""
        self.first_log_metrics: dict[str, float] = {}
        """What the first training log carries besides the step's metrics (the LR range test's outcome)."""
        self.update_loop = False
        self.ended = False
        """Whether `end` ran: the Trainer's model and methods are as they would be without R8."""

    @property
    def controller(self) -> Controller:
        return self.engine.controller

    def record_engine_base_lrs(self) -> None:
        """The controller's base LR of each group is the schedule's `initial_lr`: DeepSpeed's own schedulers
        record none and start at their minimum (0), so their peak stands in for it."""
        peaks = deepspeed_peak_lrs(self.trainer)
        for group, peak in zip(self.optimizer.param_groups, peaks or [], strict=False):
            group.setdefault("initial_lr", peak)

    def start(self, args: TrainingArguments, state: TrainerState, saved: dict[str, Any] | None,
              train_dataloader: Any, found_gains: list[float] | None = None) -> None:
        """Restore a checkpoint's state, tap the Trainer, open the outputs and, at a run's start, run the LR range
        test on `train_dataloader` (before the first step: `range_test_runner.py`), or reuse `found_gains`, the
        gains the same callback's previous `train()` found (continuing is not restarting: a sweep on a trained
        model would read its flat, low loss as a reason to cut the LR)."""
        if saved is not None:
            self.load_state_dict(saved)
        if self.deepspeed_steps_in_backward:
            self.write_first_engine_lr(state.global_step, (saved or {}).get("schedule_lrs"))
        self.taps.install()
        self.outputs.open(args, state, self.trainer.callback_handler.callbacks, (saved or {}).get("run_files_rows"))
        if saved is None and state.global_step == 0:
            if found_gains is not None and self.config.range_test.enabled:
                self.found_gains = found_gains
                self.outputs.range_test_status(self.engine.reuse_range_test(found_gains))
            else:
                self.run_range_test(args, train_dataloader)

    def run_range_test(self, args: TrainingArguments, train_dataloader: Any) -> None:
        """The LR range test's sweep, before the first step, or why there is none; either is said at once."""
        runner, line = RangeTestRunner.start(self.engine, self.rollback, args.device, train_dataloader)
        self.outputs.range_test_status(line)
        if runner is not None:
            record, line = runner.run(train_dataloader, self.signals, args)
            self.found_gains = [spec.initial_gain for spec in self.engine.specs]
            self.outputs.range_test_done(record, line)
            self.first_log_metrics = {"range_test/chosen_gain": record["chosen_gain"],
                                      "range_test/sweep_steps": float(record["sweep_steps"])}

    def write_first_engine_lr(self, step: int, saved_schedule_lrs: list[float] | None) -> None:
        """Under DeepSpeed: the LR of this run's first step. A resumed optimizer holds the LR R8 wrote when the
        checkpoint was saved: the schedule's values saved with it go back first."""
        if saved_schedule_lrs:
            self.lr.hold_schedule(self.optimizer, saved_schedule_lrs)
        self.write_lr(self.optimizer, self.trainer.lr_scheduler, step)

    def show(self, event: Event) -> None:
        """An event the engine recorded, to the log, the run files and the dashboard."""
        self.outputs.record(event, self.controller.metrics())

    # ------------------------------------------------------------------------------- each step
    def step_begin(self, step: int) -> None:
        self.taps.start_step()
        if self.actions is not None:
            self.actions.before_step(step)

    def before_optimizer_step(self, step_index: int, args: TrainingArguments, control: TrainerControl,
                              optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> None:
        """Observe the last step, check or sweep this one, and write its LR (under DeepSpeed: check the step the
        engine has just taken; its LR was written at the last `on_step_end`)."""
        if self.deepspeed_steps_in_backward:
            if self.rollback.checks_steps:
                self.rollback.before_step(step_index + 1, self.signals, args, control)
            return
        self.observe_pending()
        if self.alignment is not None:  # the gradient against the last update, before the optimizer moves it
            self.signals.alignment = self.alignment.measure(optimizer)
        if self.rollback.checks_steps:
            self.rollback.before_step(step_index + 1, self.signals, args, control)
        if self.actions is not None:  # also on a skipped step: ends its probe
            for event in self.actions.after_backward(step_index + 1):
                self.engine.record(event)
        self.write_lr(optimizer, lr_scheduler, step_index)

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> None:
        if self.deepspeed_steps_in_backward:  # the Trainer logs the LR now: DeepSpeed's scheduler stepped
            self.lr.report_used(lr_scheduler)
            return
        if not steps_on_metrics(lr_scheduler):
            self.lr.restore_schedule(optimizer)
        if self.actions is not None and not self.signals.dropped and step > self.controller.warmup_steps:
            self.actions.after_optimizer_step(step, self.controller.sigma)

    def step_end(self, step: int, optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> None:
        if self.deepspeed_steps_in_backward:
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
        if self.update_loop or self.deepspeed_steps_in_backward:
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
        """The last finished step's signals: recorded, and given to the controller."""
        observation = self.signals.take_pending()
        if observation is None:
            return
        self.record_step(observation)
        self.engine.observe(observation)

    def record_step(self, observation: Observation) -> None:
        controller = self.controller
        extras = {"momentum": controller.momentum(0), "loss_ema": controller.loss.ema.value}
        if self.config.exploration.enabled:
            extras["sigma"] = controller.sigma
        self.outputs.record_step(observation, self.lr.used_at(observation.step), extras)

    def write_lr(self, optimizer: torch.optim.Optimizer, lr_scheduler: Any, step_index: int) -> None:
        """The LR (and momentum) of this optimizer step: the schedule's times the controller's gain."""
        engine = self.engine
        self.lr.write(optimizer, lr_scheduler, step_index + 1,
                      lambda index, schedule_lr: engine.lr(index, schedule_lr, step_index), engine.momentum)

    def add_log_metrics(self, logs: dict[str, float]) -> None:
        """The controller's, rollback's, the freezer's and the events' `r8/*` metrics, into a training log."""
        metrics = self.engine.metrics()
        gains = [group.lr_gain for group in self.controller.groups]
        if len(set(gains)) > 1:
            metrics.update({f"lr_gain/group_{i}": gain for i, gain in enumerate(gains)})
        if self.actions is not None:
            metrics.update(self.actions.metrics())
        metrics.update(self.outputs.log_counts())
        metrics.update(self.first_log_metrics)
        self.first_log_metrics = {}
        logs.update({f"r8/{key}": value for key, value in metrics.items() if math.isfinite(value)})

    # ------------------------------------------------------------------------ the run's phases
    def enter_update_loop(self, step: int) -> None:
        """The Trainer runs its own loop (TRL's PPOTrainer: several optimizer steps per PPO update) and fires
        only `on_step_end` per update, not `on_pre_optimizer_step`: from now on the LR and momentum are set
        once per update, at its end, for the next one. Nothing can be checked before an optimizer step there,
        so the non-finite guard and rollback are off."""
        self.update_loop = True
        if self.rollback.checks_steps:
            logger.warning("R8: %s runs its own loop (no on_pre_optimizer_step): the LR is set once per update "
                           "(from step %d); the non-finite guard and rollback are off.",
                           type(self.trainer).__name__, step)
        self.rollback.turn_off()

    def end(self, step: int) -> None:
        """Leave the model and the Trainer as they would be without R8: frozen tensors trainable again, the taps
        removed."""
        if self.actions is not None:
            self.actions.release()
        self.taps.remove()
        self.ended = True

    def record_last_step(self) -> None:
        """The last step's row, for the record only (no decision follows it)."""
        observation = self.signals.take_pending()
        if observation is not None:
            self.record_step(observation)

    def end_by_exception(self, error: BaseException) -> None:
        """Training raised (a notebook may catch it and go on): end the run as `on_train_end` would, and stop
        the dashboard and close the run files with what they hold (no report: the run did not finish). Called
        where the exception was raised and again where it leaves `train()`: the first call ends the run."""
        if self.ended:
            return
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
    def refuse_sweep_checkpoint(self) -> None:
        """A checkpoint an older hf_r8 saved inside its LR range test, which then ran on counted steps: its weights
        are the sweep's, trained at up to `gain_max` times the LR set, not training's."""
        why = ("this checkpoint was saved by an older hf_r8 inside its LR range test: its weights are the sweep's "
               "(trained at up to range_test.gain_max times your LR), not training's")
        if self.config.range_test.enabled:
            raise ValueError(f"R8: {why}. Restart the run from step 0 (the test now runs before the first step and "
                             "no checkpoint holds sweep weights), or resume with range_test.enabled: false knowing "
                             "the weights are the sweep's.")
        logger.warning("R8: %s; resuming from them at gain 1, as range_test.enabled: false asks.", why)

    def state_dict(self) -> dict[str, Any]:
        """The engine's state and what the run's parts need to go on exactly (see `load_state_dict`)."""
        freezer = self.actions.freezer if self.actions is not None else None
        return {
            "engine": self.engine.state_dict(),
            "pending": self.signals.stage.state_dict(),
            "freezing": freezer.policy.state_dict() if freezer is not None else None,
            "applied": list(self.lr.applied) if self.lr.applied is not None else None,
            "schedule_lrs": self.lr.schedule_lrs,
            "run_files_rows": self.outputs.rows_written,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Go on from `state_dict()`'s output (in `R8Callback`'s entry, whose version 2 and older hold the
        engine's state flattened into it)."""
        engine_state = saved.get("engine") or {key: value for key, value in saved.items() if key != "version"}
        if engine_state.get("range_test_running"):
            self.refuse_sweep_checkpoint()
        self.engine.load_state_dict(engine_state)
        if engine_state.get("range_test_running"):
            return
        if saved.get("freezing") is not None and self.rollback.freezer is not None:
            self.rollback.freezer.load_state_dict(saved["freezing"])
        self.signals.stage.load_state_dict(saved.get("pending"))
        if saved.get("applied"):
            self.lr.applied = tuple(saved["applied"])
