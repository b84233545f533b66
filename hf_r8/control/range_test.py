"""LR range test: sweep the gain exponentially for a few steps, keep the one before the loss turns.

Step i (0-based) of the test trains at gain_i = gain_min * (gain_max / gain_min) ** (i / (steps - 2)), so
the sweep reaches gain_max at its next-to-last step; the loss measured at step i+1 is the first to show
the effect of gain_i, so losses are credited to the previous step's gain, and the last step only reads
the loss of gain_max (its update is dropped). While the test runs, a bias-corrected EMA of the losses
watches for the run-away: the test ends after its steps, or once that EMA exceeds `divergence_ratio`
times its minimum.

A fault is not the curve: a non-finite loss, or one above `divergence_ratio` times the EMA's minimum, is
left out of the curve and the EMA, and the host does not apply its update (the guard's skip, as after the
test). Only `divergence_patience` such losses in a row are the blow-up; the first of them marks its gain.
The loss after a skipped update is measured on the weights the skip left, so it is credited to the gain of
the last update applied, not to the skipped one (a host that applies every update, such as a plain loop that
reads the loss after its step, says so with `skips_faults=False`).

The choice is made afterwards, on the whole curve, against its noise: the level and spread of the
sweep's low-gain first third, where the LR is too small to change anything (a median and a scaled
median absolute deviation: one outlying batch among a few points would inflate a standard deviation).
Each loss is averaged with its two neighbours (a centered mean, not shifted toward higher gains the way
a causal EMA is: at ~3x per step, two steps of EMA lag are a decade of LR).

* A curve with a valley, its lowest mean more than `significance` noise deviations (of a mean of three)
  below the level (a model trained from scratch): the gain of the lowest mean / `backoff`, the usual
  "minimum / 10" rule.
* A curve flat within its noise until it blows up (a pre-trained model: the new data's loss barely moves
  before the LR breaks it; its minimum is noise): the gain from which every loss stays more than
  `significance` deviations above the level (or that began the run of faults that ended the test) /
  `backoff`. No blow-up either, or fewer than three losses: the test cannot conclude, the user's LR stays,
  and its summary says so.

A choice within `keep_band` of 1 keeps the user's LR: a sweep this coarse cannot tell LRs that close apart.
A choice below 1 keeps it too unless the curve blew up at or below gain 1 (`keep_unless_too_high`): the
"minimum / backoff" rule is a safety margin for picking an LR off the curve, not evidence against an LR the
curve shows still short of its blow-up, and lowering a good LR costs a run what keeping it cannot.

`range_test_length` sizes the test to the run. Pure Python: the caller restores the model and optimizer
to their state before the test (going on from the sweep's best weights instead was measured: those
weights took their last step near the blow-up LR, and runs from them ended worse; bench/README.md).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from hf_r8.control.config import RangeTestConfig
from hf_r8.control.signals import is_finite_number

_DENOISE_RADIUS = 1  # neighbours on each side in the centered mean of the curve


def range_test_length(config: RangeTestConfig, total_steps: int | None) -> int | None:
    """Optimizer steps the test takes in a run of `total_steps`, or None when the run gets no test.

    A fixed `config.steps` is used as it is (if the run is longer). Otherwise the test takes
    `budget_fraction` of the run within [min_steps, max_steps], and is skipped when that would be more than
    `max_budget_fraction` of the run, or when the run's length is unknown.
    """
    if not config.enabled or not total_steps or total_steps <= 0:
        return None
    if config.steps is not None:
        return config.steps if config.steps < total_steps else None
    length = min(config.max_steps, max(config.min_steps, round(config.budget_fraction * total_steps)))
    return length if length <= config.max_budget_fraction * total_steps else None


def no_range_test_reason(config: RangeTestConfig, total_steps: int | None) -> str | None:
    """Why a run of `total_steps` gets no test, in a few words; None when it gets one."""
    if not config.enabled:
        return "off (range_test.enabled: false): the LR set is used"
    if range_test_length(config, total_steps) is not None:
        return None
    if not total_steps or total_steps <= 0:
        return "skipped: the run's length is unknown, so the LR set is kept"
    if config.steps is not None:
        return f"skipped: range_test.steps={config.steps} leaves no room in a run of {total_steps} steps"
    length = min(config.max_steps, max(config.min_steps, round(config.budget_fraction * total_steps)))
    return (f"skipped: a run of {total_steps} steps is too short ({length} test steps would be over "
            f"{config.max_budget_fraction:.0%} of it), so the LR set is kept (and not annealed at the end)")


class LRRangeTest:
    """One run's range test.

    Args:
        config: the `range_test` section.
        steps: the test's length (`range_test_length`).
        skips_faults: whether the host leaves out the update of a step whose loss `observe` calls a fault.
    """

    def __init__(self, config: RangeTestConfig, steps: int, skips_faults: bool = True) -> None:
        if steps < 3:
            raise ValueError(f"steps={steps!r}: an LR range test needs at least 3 steps")
        self.config = config
        self.steps = steps
        self.skips_faults = skips_faults
        self.average = 0.0
        """EMA started at 0; smoothed = average / (1 - beta ** observed) removes its bias."""
        self.observed = 0
        """Losses on the curve (the EMA's count)."""
        self.measured = 0
        """Losses measured, faults included: the test ends after `steps - 1` of them."""
        self.best_smoothed = math.inf
        self.diverged = False
        self.history: list[tuple[float, float]] = []
        """(gain, loss) pairs, each loss credited to the gain that produced it: the curve of reports."""
        self.faults = 0
        """Losses left out of the curve (non-finite, or far above it) whose updates were not applied."""
        self.faults_in_row = 0
        self.divergence_gain: float | None = None
        """The gain that produced the blow-up (the first fault of the run that ended the test)."""

    def gain(self, step_index: int) -> float:
        """The gain to train with at test step `step_index` (0-based)."""
        config = self.config
        fraction = min(1.0, step_index / max(1, self.steps - 2))
        return config.gain_min * (config.gain_max / config.gain_min) ** fraction

    def observe(self, step_index: int, loss: float | None) -> bool:
        """The loss measured at test step `step_index` (on the weights after `step_index` updates), credited
        to the gain of the last update applied. False when it is a fault (see the module docstring): the host
        must not apply this step's update."""
        if self.finished:
            return True
        skipped = self.faults_in_row if self.skips_faults else 0  # the updates of the faults just before
        credited = self.gain(max(0, step_index - 1 - skipped))
        if step_index >= 1:
            self.measured += 1
        limit = self.config.divergence_ratio * self.best_smoothed
        if not is_finite_number(loss) or loss > limit:
            self.faults += 1
            self.faults_in_row += 1
            if self.faults_in_row == 1:
                self.divergence_gain = credited
            if self.faults_in_row >= self.config.divergence_patience:
                self.diverged = True
            return False
        self.faults_in_row = 0
        if step_index < 1:
            return True
        self.history.append((credited, float(loss)))
        beta = self.config.smoothing
        self.observed += 1
        self.average = beta * self.average + (1 - beta) * loss
        smoothed = self.average / (1 - beta ** self.observed)
        if smoothed < self.best_smoothed:
            self.best_smoothed = smoothed
        elif smoothed > self.config.divergence_ratio * self.best_smoothed:
            self.diverged = True
            self.divergence_gain = credited
        return True

    @property
    def finished(self) -> bool:
        return self.diverged or self.measured >= self.steps - 1

    def denoised(self) -> list[tuple[float, float]]:
        """(gain, centered mean of the loss and its neighbours) along the curve."""
        losses = [loss for _, loss in self.history]
        curve = []
        for index, (gain, _) in enumerate(self.history):
            around = losses[max(0, index - _DENOISE_RADIUS):index + _DENOISE_RADIUS + 1]
            curve.append((gain, math.fsum(around) / len(around)))
        return curve

    def best(self) -> tuple[float, float] | None:
        """(gain, denoised loss) at the lowest point of the denoised curve; None if nothing was measured."""
        curve = self.denoised()
        return min(curve, key=lambda point: point[1]) if curve else None

    def noise(self) -> tuple[float, float] | None:
        """(level, spread) of the losses of the sweep's first third; None before three were measured."""
        losses = [loss for _, loss in self.history]
        head = losses[:max(3, len(losses) // 3)]
        if len(head) < 3:
            return None
        level = statistics.median(head)
        return level, 1.4826 * statistics.median(abs(loss - level) for loss in head)

    def has_valley(self) -> bool:
        """Whether the denoised curve's minimum lies clearly (`significance` deviations of a mean of three)
        below the level of its first third."""
        noise, best = self.noise(), self.best()
        if noise is None or best is None:
            return False
        level, spread = noise
        return level - best[1] > self.config.significance * spread / math.sqrt(2 * _DENOISE_RADIUS + 1)

    def blow_up_gain(self) -> float | None:
        """The gain from which every loss stays clearly (`significance` deviations) above the level (a single
        noisy batch is not a blow-up), or that began the faults that ended the test; None if the curve never
        rose."""
        noise = self.noise()
        if noise is not None:
            level, spread = noise
            limit = level + self.config.significance * spread
            first_above = len(self.history)
            while first_above > 0 and self.history[first_above - 1][1] > limit:
                first_above -= 1
            if first_above < len(self.history):
                return self.history[first_above][0]
        return self.divergence_gain if self.diverged or self.faults_in_row else None

    def suggestion(self) -> tuple[float, str]:
        """The gain the curve points to (see the module docstring), within [gain_min, gain_max], and what it is
        based on; gain 1 when the test cannot conclude."""
        if self.noise() is None:
            return 1.0, f"no conclusion from {len(self.history)} losses (3 are needed): the LR set is kept"
        if self.has_valley():
            gain, basis = self.best()[0], "the valley's"
        else:
            gain, basis = self.blow_up_gain(), "the blow-up's"
            if gain is None:
                return 1.0, "no conclusion (the curve shows neither a valley nor a blow-up): the LR set is kept"
        gain = min(self.config.gain_max, max(self.config.gain_min, gain / self.config.backoff))
        return gain, f"{basis} gain / {self.config.backoff:g}"

    def suggested_gain(self) -> float:
        return self.suggestion()[0]

    def blew_up_by_the_lr_set(self) -> bool:
        """Whether the curve shows the user's LR (gain 1) too high: it blew up at or below it. A valley below gain 1
        is not enough: a few steps at each gain favour small ones, and the user's LR may still be in the
        curve's good region (measured: bench/README.md)."""
        blow_up = self.blow_up_gain()
        return blow_up is not None and blow_up <= 1.0

    def kept_because(self) -> str | None:
        """Why the user's LR is kept over the suggestion (see the module docstring); None when it is not."""
        gain, band = self.suggested_gain(), self.config.keep_band
        if gain != 1.0 and 1.0 / band <= gain <= band:
            return f"within range_test.keep_band={band:g}"
        if gain < 1.0 and self.config.keep_unless_too_high and not self.blew_up_by_the_lr_set():
            return "lower, but the curve does not show the LR set too high (range_test.keep_unless_too_high)"
        return None

    def chosen_gain(self) -> float:
        """The suggestion, or 1 (the user's LR) when `kept_because` says why."""
        return 1.0 if self.kept_because() is not None else self.suggested_gain()

    def summary(self, restored: str) -> str:
        """What the test saw and chose, with `restored` saying what was put back (for events)."""
        best, (suggested, basis), gain = self.best(), self.suggestion(), self.chosen_gain()
        why = self.kept_because()
        kept = "" if why is None else f" (its suggestion x{suggested:.3g} is {why}: kept)"
        faults = f"; {self.faults} faulty losses left out, their updates skipped" if self.faults else ""
        outcome = "diverged" if self.diverged else "completed"
        return (f"LR range test {outcome} after {self.measured + 1} steps{faults}: lowest denoised loss "
                f"{best[1] if best else math.nan:.4g} at gain {best[0] if best else math.nan:.3g}; {basis}; "
                f"{restored}, training continues at gain {gain:.3g}{kept}")

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("steps", "average", "observed", "best_smoothed", "diverged",
                                                    "history", "measured", "faults", "faults_in_row",
                                                    "divergence_gain")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        if "measured" not in state:  # saved before faults were told apart: every loss was on the curve
            self.measured = self.observed
