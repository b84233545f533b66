"""LR range test: sweep the gain exponentially for a few steps, keep the one before the loss turns.

Step i (0-based) of the test trains at gain_i = gain_min * (gain_max / gain_min) ** (i / (steps - 1)).
The loss measured at step i+1 is the first to show the effect of gain_i, so losses are credited to the
previous step's gain. The losses are smoothed (bias-corrected EMA); the test ends after `steps`
steps, or earlier once the smoothed loss exceeds `divergence_ratio` times its minimum. The chosen
gain is the gain of the smoothed minimum divided by `backoff` (the usual "minimum / 10" rule).
Pure Python: the caller restores the model and optimizer afterwards.
"""

from __future__ import annotations

import math
from typing import Any

from hf_r8.config import RangeTestConfig
from hf_r8.signals import is_finite_number


class LRRangeTest:
    def __init__(self, config: RangeTestConfig) -> None:
        self.config = config
        self.average = 0.0
        """EMA started at 0; smoothed = average / (1 - beta ** observed) removes its bias."""
        self.smoothed: float | None = None
        self.observed = 0
        self.best_loss = math.inf
        self.best_gain: float | None = None
        self.diverged = False
        self.history: list[tuple[float, float]] = []
        """(gain, smoothed loss) pairs, for reports."""

    def gain(self, step_index: int) -> float:
        """The gain to train with at test step `step_index` (0-based)."""
        config = self.config
        fraction = min(1.0, step_index / (config.steps - 1))
        return config.gain_min * (config.gain_max / config.gain_min) ** fraction

    def observe(self, step_index: int, loss: float | None) -> None:
        """The loss measured at test step `step_index`, credited to the gain of the step before."""
        if step_index < 1 or self.finished:
            return
        gain = self.gain(step_index - 1)
        if not is_finite_number(loss):
            self.diverged = True
            return
        beta = self.config.smoothing
        self.observed += 1
        self.average = beta * self.average + (1 - beta) * loss
        self.smoothed = self.average / (1 - beta ** self.observed)
        self.history.append((gain, self.smoothed))
        if self.smoothed < self.best_loss:
            self.best_loss, self.best_gain = self.smoothed, gain
        elif self.smoothed > self.config.divergence_ratio * self.best_loss:
            self.diverged = True

    @property
    def finished(self) -> bool:
        return self.diverged or self.observed >= self.config.steps - 1

    def chosen_gain(self) -> float:
        """Gain of the smoothed-loss minimum / backoff, within [gain_min, gain_max]; 1 if nothing was measured."""
        if self.best_gain is None:
            return 1.0
        return min(self.config.gain_max, max(self.config.gain_min, self.best_gain / self.config.backoff))

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("average", "smoothed", "observed", "best_loss", "best_gain",
                                                    "diverged", "history")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
