"""The LR range test in a Trainer run: its sweep over the first steps, then the weights put back.

The engine runs the test (`control/range_test.py` decides the sweep and the choice from numbers, the engine
rebases the controller on it); this module does it on the Trainer's model. The weights to come back to are
rollback's first snapshot where rollback keeps snapshots (no second copy in RAM), else a snapshot of its own.
Each test step's loss is read on the host before its update (one read per test step), so the test ends at the
step it has seen enough, dropping that step's update; the weights and optimizer state from before the test
come back, and the controller starts over from the chosen gain.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from hf_r8.control.engine import Engine
from hf_r8.integrations.compat import uses_deepspeed
from hf_r8.integrations.rollback_manager import RollbackManager
from hf_r8.integrations.step_signals import StepSignals
from hf_r8.runtime.snapshot import StateSnapshot
from hf_r8.ui.dashboard import sparkline

logger = logging.getLogger(__name__)


class RangeTestRunner:
    """One run's LR range test, from `start` to `finish` (or `abandon` when training ends inside it)."""

    def __init__(self, engine: Engine, rollback: RollbackManager, snapshot: StateSnapshot,
                 shares_snapshot: bool) -> None:
        self.engine, self.rollback = engine, rollback
        self.test = engine.range_test
        self.snapshot = snapshot
        self.shares_snapshot = shares_snapshot
        """Whether `snapshot` is rollback's: after the test it holds the weights training goes on from."""

    @classmethod
    def start(cls, engine: Engine, rollback: RollbackManager,
              device: torch.device) -> tuple[RangeTestRunner | None, str]:
        """The test this run has room for, from a snapshot of the weights before it (None when there is none), and
        the line that says so. A test that is on but cannot run here is recorded as skipped, with the reason."""
        reason = engine.no_range_test_reason()
        if reason is None and uses_deepspeed(rollback.trainer):
            reason = ("skipped under DeepSpeed (its engine takes each step before R8 sees the step's loss, so the "
                      "sweep cannot end on the step it has seen enough)")
        snapshot = None
        if reason is None and rollback.snapshots_allowed:
            if rollback.take_snapshot(0, device):
                snapshot, shared = rollback.snapshots[-1], True
            else:
                reason = "skipped: a snapshot of the weights to return to does not fit in RAM"
        elif reason is None:
            snapshot, shared = StateSnapshot(rollback.snapshot_parameters), False
            snapshot.capture(rollback.model, rollback.optimizer, step=0)
        if reason is not None:
            if engine.config.range_test.enabled:
                # A run too short for a test is the design working; a test the setup prevents is worth a warning.
                log = logger.info if reason == engine.no_range_test_reason() else logger.warning
                log("R8: LR range test %s.", reason)
                engine.skip_range_test(reason)
            return None, reason
        engine.start_range_test(engine.range_test_length())
        runner = cls(engine, rollback, snapshot, shared)
        return runner, runner.sweep_line()

    def sweep_line(self) -> str:
        config = self.test.config
        return (f"sweeping gain x{config.gain_min:g}..x{config.gain_max:g} over the first "
                f"{self.test.steps} steps (weights restored after it)")

    def step(self, step_index: int, signals: StepSignals, optimizer: torch.optim.Optimizer) -> bool:
        """Observe test step `step_index + 1` before its update; True when the test has ended (its update is
        dropped)."""
        if not self.engine.range_test_loss(step_index, signals.read_now(step_index + 1).loss):
            return False
        optimizer.zero_grad(set_to_none=True)
        signals.dropped = True
        return True

    def finish(self, step: int) -> tuple[dict[str, Any], str]:
        """Put back the weights and optimizer state from before the test and rebase the engine on the chosen gain;
        returns what `r8_range_test.json` holds and the dashboard's line."""
        self.snapshot.restore(self.rollback.model, self.rollback.optimizer)
        gain = self.engine.finish_range_test(step, "weights restored")
        snapshots = self.rollback.snapshots
        if self.shares_snapshot and snapshots and self.snapshot is snapshots[-1]:
            # Rollback's snapshot holds the weights training goes on from, now at this step, with this controller.
            self.snapshot.step = step
            self.snapshot.extras["engine"] = self.engine.snapshot_taken(step)
        test, base_lrs = self.test, [spec.base_lr for spec in self.engine.specs]
        record = {"step": step, "curve": test.history, "denoised": test.denoised(),
                  "suggested_gain": test.suggested_gain(), "chosen_gain": gain, "base_lrs": base_lrs}
        line = (f"chose LR {base_lrs[0] * gain:.3g} (gain x{gain:.3g}) after {step} steps; "
                f"{sparkline(loss for _, loss in test.denoised())}")
        return record, line

    def abandon(self, step: int) -> None:
        """Training ended inside the test: the weights from before it come back."""
        self.snapshot.restore(self.rollback.model, self.rollback.optimizer)
        reason = (f"training ended after {step} steps, inside the LR range test of {self.test.steps} steps: the "
                  "weights from before the test are restored")
        logger.warning("R8: %s.", reason)
        self.engine.abandon_range_test(step, reason)
