"""The LR range test in a Trainer run: its sweep runs before the first step the Trainer counts.

The engine runs the test (`control/range_test.py` decides the sweep and the choice from numbers, the engine
rebases the controller on it); this module does it on the Trainer's model, in `on_train_begin`, so the
Trainer never sees it: the sweep's steps are not `global_step`s, its losses and LRs reach neither the
Trainer's logs nor its training loss, no evaluation, checkpoint, early stopping or plateau scheduler runs on
its weights, and the schedule's warmup starts after it, untouched. It costs the sweep's steps in time, not in
the run's step budget.

Each sweep step takes the batches the first training steps will take (a fresh pass over the Trainer's own
train dataloader), runs the Trainer's `training_step` on them (gradient accumulation as the Trainer counts it),
reads the step's loss on the host across processes (one read per sweep step, as every process must decide
the same), and applies the update at the sweep's LR unless the loss is a fault (the test's guard). Afterwards
the weights, the optimizer state, the LRs, the random number generators and R8Trainer's sampler come back as
they were, so the run trains on the same batches, with the same dropout masks, as one without the test; only
the LR differs. The weights to come back to are rollback's first snapshot where rollback keeps snapshots (no
second copy in RAM), else a snapshot of the test's own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from transformers import TrainingArguments

from hf_r8.control.engine import Engine
from hf_r8.integrations.compat import end_dataloader_pass, is_reward_trainer, set_accumulated_batches
from hf_r8.integrations.compat_deepspeed import uses_deepspeed
from hf_r8.integrations.rollback_manager import RollbackManager
from hf_r8.integrations.step_signals import StepSignals
from hf_r8.runtime.rng import restore_rng_states, rng_states
from hf_r8.runtime.snapshot import StateSnapshot
from hf_r8.ui.dashboard import sparkline

logger = logging.getLogger(__name__)


class RangeTestRunner:
    """One run's LR range test: `start` decides whether there is one, `run` sweeps and puts everything back."""

    def __init__(self, engine: Engine, rollback: RollbackManager, snapshot: StateSnapshot) -> None:
        self.engine, self.rollback = engine, rollback
        self.test = engine.range_test
        self.snapshot = snapshot

    @classmethod
    def start(cls, engine: Engine, rollback: RollbackManager, device: torch.device,
              dataloader: Any) -> tuple[RangeTestRunner | None, str]:
        """The test this run has room for, from a snapshot of the weights before it (None when there is none), and
        the line that says so. A test that is on but cannot run here is recorded as skipped, with the reason."""
        trainer = rollback.trainer
        reason = engine.no_range_test_reason()
        if reason is None and dataloader is None:
            reason = f"skipped: {type(trainer).__name__} hands its callbacks no train dataloader to sweep on"
        if reason is None and is_reward_trainer(trainer):
            reason = (f"skipped: {type(trainer).__name__} learns from rewards, and its loss does not measure the LR "
                      "(the reward_rl preset drives the LR from the reward)")
        if reason is None and uses_deepspeed(trainer):
            reason = ("skipped under DeepSpeed (its engine takes each step inside backward, before R8 can judge the "
                      "step's loss)")
        snapshot = None
        if reason is None and rollback.snapshots_allowed:
            if rollback.take_snapshot(0, device):
                snapshot = rollback.snapshots[-1]
            else:
                reason = "skipped: a snapshot of the weights to return to does not fit in RAM"
        elif reason is None:
            snapshot = StateSnapshot(rollback.snapshot_parameters)
            snapshot.capture(rollback.model, rollback.optimizer, step=0)
        if reason is not None:
            if engine.config.range_test.enabled:
                # A run too short for a test is the design working; a test the setup prevents is worth a warning.
                log = logger.info if reason == engine.no_range_test_reason() else logger.warning
                log("R8: LR range test %s.", reason)
                engine.skip_range_test(reason)
            return None, reason
        engine.start_range_test(engine.range_test_length())
        runner = cls(engine, rollback, snapshot)
        return runner, runner.sweep_line()

    def sweep_line(self) -> str:
        config = self.test.config
        return (f"sweeping gain x{config.gain_min:g}..x{config.gain_max:g} over {self.test.steps} steps before "
                "training (weights restored after it)")

    def run(self, dataloader: Any, signals: StepSignals, args: TrainingArguments) -> tuple[dict[str, Any], str]:
        """Sweep, put back what the sweep changed, rebase the engine on the chosen gain; returns what
        `r8_range_test.json` holds and the dashboard's line."""
        trainer, optimizer = self.rollback.trainer, self.rollback.optimizer
        model = trainer.model_wrapped
        lrs = [group["lr"] for group in optimizer.param_groups]
        random_states = rng_states()
        pause_catalog = getattr(trainer, "r8_catalog_paused", contextlib.nullcontext)
        measured = 0
        try:
            with pause_catalog():
                for step_index, batches, items in self._batches(trainer, dataloader, args):
                    measured = step_index + 1
                    signals.taps.start_step()
                    set_accumulated_batches(trainer, len(batches))
                    for inputs in batches:
                        trainer.training_step(model, inputs, items)
                    applies = self.engine.range_test_loss(step_index, signals.loss_now())
                    if self.test.finished:
                        break
                    if applies:
                        self._update(model, optimizer, step_index, args)
                    model.zero_grad(set_to_none=True)
        finally:
            model.zero_grad(set_to_none=True)
            self.snapshot.restore(self.rollback.model, optimizer)
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            restore_rng_states(random_states)
        return self._finish(measured)

    @staticmethod
    def _batches(trainer: Any, dataloader: Any, args: TrainingArguments) -> Iterator[tuple[int, list[Any], Any]]:
        """(sweep step index, its micro-batches, `num_items_in_batch`) from a fresh pass over `dataloader`, until
        the caller stops or the data runs out."""
        iterator = iter(dataloader)
        try:
            step_index = 0
            while True:
                batches, items = trainer.get_batch_samples(iterator, args.gradient_accumulation_steps, args.device)
                if not batches:
                    return
                yield step_index, batches, items
                step_index += 1
        finally:
            end_dataloader_pass(dataloader)

    def _update(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step_index: int,
                args: TrainingArguments) -> None:
        """The sweep's update of step `step_index`: clipped as the Trainer clips, at the sweep's LR times each
        group's peak LR (the schedule may still be warming up)."""
        if args.max_grad_norm and args.max_grad_norm > 0:
            self.rollback.trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = self.engine.lr(index, self.engine.specs[index].base_lr, step_index)
        optimizer.step()

    def _finish(self, measured: int) -> tuple[dict[str, Any], str]:
        gain = self.engine.finish_range_test(0, f"{measured} sweep steps before training; weights, optimizer state, "
                                                "random generators and data order restored")
        snapshots = self.rollback.snapshots
        if snapshots and self.snapshot is snapshots[-1]:
            # Rollback's snapshot holds the weights training starts from: a rollback to it keeps the chosen gain.
            self.snapshot.extras["engine"] = self.engine.snapshot_taken(0)
        test, base_lrs = self.test, [spec.base_lr for spec in self.engine.specs]
        suggested, basis = test.suggestion()
        record = {"step": 0, "sweep_steps": measured, "curve": test.history, "denoised": test.denoised(),
                  "suggested_gain": suggested, "basis": basis, "faults": test.faults, "chosen_gain": gain,
                  "base_lrs": base_lrs}
        line = (f"chose LR {base_lrs[0] * gain:.3g} (gain x{gain:.3g}) after {measured} sweep steps; "
                f"{sparkline(loss for _, loss in test.denoised())}")
        return record, line
