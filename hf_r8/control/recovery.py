"""The LR's recovery after a rollback: it restarts lower and climbs back to the gain, over the stabilization.

A rollback (`Engine.roll_back`) starts it at `rollback.lr_cut` x; the factor then grows log-linearly in the
steps the controller has seen, and is 1 once `steps` have passed. It multiplies the LR on top of the gain, as
the end-of-run anneal does (`anneal.py`). Pure Python.
"""

from __future__ import annotations

from typing import Any


class RollbackRecovery:
    """The recovery under way, if any: started at `start` from `factor` x, back to 1x over `steps` steps."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.steps = 1
        self.initial_factor = 1.0

    def begin(self, step: int, steps: int, factor: float) -> None:
        self.start, self.steps, self.initial_factor = step, max(1, steps), factor

    def factor(self, step: int) -> float:
        """The LR multiplier at the controller's step `step` (1 when no recovery is under way). A read."""
        if self.start is None:
            return 1.0
        progress = (step - self.start) / self.steps
        if progress >= 1.0:
            return 1.0
        return self.initial_factor ** (1.0 - max(0.0, progress))

    def end_if_done(self, step: int) -> None:
        if self.start is not None and self.factor(step) == 1.0:
            self.start = None

    def state_dict(self) -> dict[str, Any] | None:
        """None, or the recovery under way, in the shape the controller saved it in before it was a part."""
        if self.start is None:
            return None
        return {"start": self.start, "steps": self.steps, "factor": self.initial_factor}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self.start = None
            return
        self.begin(state["start"], state["steps"], state["factor"])
