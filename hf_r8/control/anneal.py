"""The end-of-run anneal: a run whose schedule will not decay in time gets R8's own decay at its end.

A constant schedule (a plain loop, `constant_with_warmup`) ends at its peak LR, and a run ended there leaves
loss on the table that a short decay takes back (the cooldown of warmup-stable-decay schedules). So, at
`anneal.start_fraction` of the planned steps, R8 looks at what the schedule will do until the end:

* where the host can evaluate the schedule ahead (a `LambdaLR`, which every named schedule of `transformers`
  is), its lowest value over the remaining steps: a schedule that gets below `flat_threshold` of its peak
  before the end (cosine, linear, warmup-stable-decay, cosine with restarts) decays by itself and is left alone;
* otherwise (a `ReduceLROnPlateau`, DeepSpeed's schedulers, chained torch schedulers) its value at that
  step, the only one known.

A schedule that stays high is annealed: the LR is multiplied by 1 - sqrt(progress) over the rest of the run,
down to the controller's lower bound. The decision is taken once, recorded as one event, and saved.

A run too short to have had the LR range test (see `range_test_length`) is not annealed: R8 did not
choose its LR, so it does not end it either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from hf_r8.control.config import R8Config
from hf_r8.control.events import Event
from hf_r8.control.range_test import range_test_length

ScheduleAhead = Callable[[int], float]
"""The schedule's LR over its peak at a 0-based step index (the LR of optimizer step index + 1)."""


class EndAnneal:
    """One run's end-of-run anneal: when it starts, whether it applies, and its factor at each step.

    Args:
        config: the full `R8Config` (its `anneal` section, and `range_test` for what counts as too short).
        total_steps: the run's planned optimizer steps; None (unknown): no anneal.
        schedule_ahead: the schedule's value at any step, when the host can evaluate it ahead; None: the
            schedule is judged by its value at the anneal's start.
    """

    def __init__(self, config: R8Config, total_steps: int | None, schedule_ahead: ScheduleAhead | None = None) -> None:
        self.config = config.anneal
        self.total_steps = total_steps
        self.schedule_ahead = schedule_ahead
        long_enough = range_test_length(replace(config.range_test, enabled=True), total_steps) is not None
        self.start: int | None = math.floor(self.config.start_fraction * total_steps) \
            if self.config.enabled and total_steps and long_enough else None
        """The last step before the anneal (its first annealed step is start + 1); None: this run has none."""
        self.annealing: bool | None = None
        """Whether this run's end is annealed: decided once, before the first step past `start` (None before)."""

    def decide(self, step_index: int, schedule_fraction: float) -> Event | None:
        """Before optimizer step `step_index + 1`, whose schedule LR is `schedule_fraction` of its peak: at the
        anneal's first step, decide whether it applies. Returns the event recording that it does."""
        if self.start is None or self.annealing is not None or step_index < self.start:
            return None
        remaining = range(step_index, max(step_index + 1, self.total_steps))
        if self.schedule_ahead is not None:
            lowest, source = min(self.schedule_ahead(index) for index in remaining), "its lowest value ahead"
        else:
            lowest, source = schedule_fraction, "its value now (it cannot be evaluated ahead)"
        self.annealing = lowest > self.config.flat_threshold
        if not self.annealing:
            return None
        return Event(step_index, -1, "anneal", "start", 1.0, 0.0,
                     f"the schedule stays above anneal.flat_threshold={self.config.flat_threshold:g} of its peak "
                     f"until the end ({source}: {lowest:.3g}), so R8 decays the LR itself: x(1 - sqrt(progress)) "
                     f"from step {step_index + 1} to {self.total_steps}, down to the lower bound",
                     quantity="lr_factor")

    def factor(self, step_index: int) -> float:
        """The LR multiplier of optimizer step `step_index + 1` (1 before the anneal, or when it does not apply)."""
        if not self.annealing or self.start is None or step_index < self.start:
            return 1.0
        progress = min(1.0, (step_index + 1 - self.start) / max(1, self.total_steps - self.start))
        return 1.0 - math.sqrt(progress)

    def state_dict(self) -> dict[str, Any]:
        return {"annealing": self.annealing}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.annealing = state.get("annealing")
