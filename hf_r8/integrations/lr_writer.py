"""Writes the LR (and momentum) of each optimizer step into the optimizer, and gives the schedule its own back.

Just before `optimizer.step()` every parameter group gets the LR R8 chose for it (the schedule's value
times the gain, or the range test's sweep), and the scheduler reports it as its last LR, so the
`learning_rate` the Trainer logs is the LR used. After the step the schedule's own values are put back
before the scheduler steps from them: its state, and a resumed run, stay exactly the stock Trainer's.
Schedulers stepped on eval metrics (ReduceLROnPlateau, GreedyLR) step after `on_step_end` and read the
LR to chain from: they get their values back there instead.

Under DeepSpeed the engine takes the real step, then steps its scheduler, inside backward: the next step's
LR is written at `on_step_end`, over the value the scheduler has just set, and stays there until that step
(`TrainerRun`); nothing is given back, as the scheduler computes each value from its step count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from transformers.optimization import GreedyLR

from hf_r8.control.anneal import ScheduleAhead
from hf_r8.integrations.compat import set_logged_lr
from hf_r8.runtime.param_groups import write_lr, write_lrs

_METRIC_SCHEDULERS = (ReduceLROnPlateau, GreedyLR)


def steps_on_metrics(lr_scheduler: Any) -> bool:
    """Whether `lr_scheduler` (maybe inside Accelerate's wrapper) steps on eval metrics, after `on_step_end`."""
    return isinstance(getattr(lr_scheduler, "scheduler", lr_scheduler), _METRIC_SCHEDULERS)


def schedule_ahead(lr_scheduler: Any) -> ScheduleAhead | None:
    """The schedule's LR over its peak at any step index, for the end-of-run anneal to look ahead: a `LambdaLR`
    (every named schedule of `get_scheduler` but `reduce_lr_on_plateau`) is its first group's function of the
    step; None for a schedule that cannot be evaluated without stepping it."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    return scheduler.lr_lambdas[0] if isinstance(scheduler, LambdaLR) else None


class LRWriter:
    """The LR of each step, written and undone; `applied` remembers what the last step used."""

    def __init__(self) -> None:
        self.applied: tuple[int, float, float, float | None] | None = None
        """(step, LR used, schedule LR, gain over the schedule) of group 0 at the last written step."""
        self._schedule_lrs: list[float] = []
        self._used: list[float] = []

    @property
    def holds_schedule(self) -> bool:
        """Whether the schedule's own values are still to be put back."""
        return bool(self._schedule_lrs)

    def write(self, optimizer: torch.optim.Optimizer, lr_scheduler: Any, step: int,
              lr_of: Callable[[int, float], float], momentum_of: Callable[[int], float | None]) -> None:
        """Give group i the LR `lr_of(i, schedule_lr)` and, where not None, the momentum `momentum_of(i)`."""
        self._schedule_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        used = write_lrs(optimizer, self._schedule_lrs, lr_of, momentum_of)
        self.applied = (step, used[0], self._schedule_lrs[0],
                        used[0] / self._schedule_lrs[0] if self._schedule_lrs[0] else None)
        self._used = used
        set_logged_lr(lr_scheduler, used)

    def report_used(self, lr_scheduler: Any) -> None:
        """Make the scheduler report the LRs of the last write again (DeepSpeed's scheduler has stepped since)."""
        set_logged_lr(lr_scheduler, list(self._used))

    @property
    def schedule_lrs(self) -> list[float]:
        """The schedule's own values under the last write, while they are still to be put back."""
        return list(self._schedule_lrs)

    def hold_schedule(self, optimizer: torch.optim.Optimizer, schedule_lrs: list[float]) -> None:
        """Put saved schedule values into the groups (a resumed DeepSpeed optimizer holds the LR R8 wrote)."""
        self._schedule_lrs = list(schedule_lrs)
        self.restore_schedule(optimizer)

    def restore_schedule(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the schedule's own values back (once per write)."""
        for group, schedule_lr in zip(optimizer.param_groups, self._schedule_lrs, strict=False):
            write_lr(group, schedule_lr)
        self._schedule_lrs = []

    def used_at(self, step: int) -> tuple[float | None, float | None, float | None]:
        """(LR used, schedule LR, gain) of `step`, if it was the last written step."""
        if self.applied is None or self.applied[0] != step:
            return None, None, None
        return self.applied[1:]
