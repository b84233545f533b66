"""The LR range test in a Trainer run: its sweep over the first steps, then the weights put back.

`control/range_test.py` decides the sweep and the choice from numbers; this module runs it on the
Trainer's model. The weights to come back to are rollback's first snapshot where rollback keeps
snapshots (no second copy in RAM), else a snapshot of its own. Each test step's loss is read on the host
before its update (one read per test step), so the test ends at the step it has seen enough, dropping
that step's update; the weights and optimizer state from before the test come back, and the controller
starts over from the chosen gain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from hf_r8.control.config import RangeTestConfig
from hf_r8.control.events import Event
from hf_r8.control.range_test import LRRangeTest, range_test_length
from hf_r8.integrations.compat import uses_deepspeed
from hf_r8.integrations.rollback_manager import RollbackManager
from hf_r8.integrations.step_signals import StepSignals
from hf_r8.runtime.snapshot import StateSnapshot
from hf_r8.ui.dashboard import sparkline

logger = logging.getLogger(__name__)


class RangeTestRunner:
    """One run's LR range test, from `start` to `finish` (or `abandon` when training ends inside it)."""

    def __init__(self, config: RangeTestConfig, length: int, snapshot: StateSnapshot, shares_snapshot: bool) -> None:
        self.config = config
        self.test = LRRangeTest(config, length)
        self.snapshot = snapshot
        self.shares_snapshot = shares_snapshot
        """Whether `snapshot` is rollback's: after the test it holds the weights training goes on from."""

    @classmethod
    def start(cls, config: RangeTestConfig, total_steps: int, rollback: RollbackManager, device: torch.device,
              take_snapshot: Callable[[], bool]) -> RangeTestRunner | None:
        """The test this run has room for, from a snapshot of the weights before it; None when there is none."""
        length = range_test_length(config, total_steps)
        if length is None:
            return None
        if uses_deepspeed(rollback.trainer):
            logger.warning("R8: no LR range test under DeepSpeed (its engine takes each step before R8 sees the "
                           "step's loss, so the sweep cannot end on the step it has seen enough).")
            return None
        if rollback.snapshots_allowed:
            if not take_snapshot():
                logger.warning("R8: no LR range test: a snapshot of the weights to return to does not fit in RAM.")
                return None
            return cls(config, length, rollback.snapshots[-1], shares_snapshot=True)
        snapshot = StateSnapshot(rollback.snapshot_parameters)
        snapshot.capture(rollback.model, rollback.optimizer, step=0)
        return cls(config, length, snapshot, shares_snapshot=False)

    @property
    def steps(self) -> int:
        return self.test.steps

    def sweep_line(self) -> str:
        return (f"sweeping gain x{self.config.gain_min:g}..x{self.config.gain_max:g} over the first "
                f"{self.test.steps} steps (weights restored after it)")

    def gain(self, step_index: int) -> float:
        return self.test.gain(step_index)

    def chosen_gain(self) -> float:
        return self.test.chosen_gain()

    def step(self, step_index: int, signals: StepSignals, optimizer: torch.optim.Optimizer) -> bool:
        """Observe test step `step_index + 1` before its update; True when the test has ended (its update is
        dropped)."""
        self.test.observe(step_index, signals.read_now(step_index + 1).loss)
        if not self.test.finished:
            return False
        optimizer.zero_grad(set_to_none=True)
        signals.dropped = True
        return True

    def restore(self, rollback: RollbackManager) -> None:
        """Put back the weights and optimizer state from before the test."""
        self.snapshot.restore(rollback.model, rollback.optimizer)

    def finished_event(self, step: int, gain: float) -> Event:
        return Event(step, -1, "range_test", "rebase", 1.0, gain, self.test.summary(step, "weights restored"))

    def record(self, step: int, gain: float, base_lrs: list[float]) -> dict[str, object]:
        """What `r8_range_test.json` holds."""
        test = self.test
        return {"step": step, "curve": test.history, "denoised": test.denoised(),
                "suggested_gain": test.suggested_gain(), "chosen_gain": gain, "base_lrs": base_lrs}

    def chosen_line(self, step: int, gain: float, base_lr: float) -> str:
        return (f"chose LR {base_lr * gain:.3g} (gain x{gain:.3g}) after {step} steps; "
                f"{sparkline(loss for _, loss in self.test.denoised())}")

    def abandon_event(self, step: int) -> Event:
        reason = (f"training ended after {step} steps, inside the LR range test of {self.test.steps} steps: the "
                  "weights from before the test are restored")
        logger.warning("R8: %s.", reason)
        return Event(step, -1, "range_test", "abandon", 1.0, 1.0, reason)
