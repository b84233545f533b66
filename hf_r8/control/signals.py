"""Plain-number statistics of the training signals: EMAs, windows, slope, z-score.

Numbers in, numbers out: no torch, no transformers. Non-finite values never enter any statistic;
callers are told they were non-finite and decide what that means.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

# A coefficient of variation is capped here so that a loss hovering at 0 (e.g. GRPO) stays finite.
MAX_CV = 1e6
_TINY = 1e-12


def is_finite_number(value: float | None) -> bool:
    """True for a real, finite number (not None, NaN or +-inf)."""
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation, computed on rescaled values so huge inputs cannot overflow."""
    count = len(values)
    if count == 0:
        return 0.0, 0.0
    scale = max(abs(v) for v in values) or 1.0
    scaled = [v / scale for v in values]
    mean = math.fsum(scaled) / count
    variance = math.fsum((v - mean) ** 2 for v in scaled) / count
    return mean * scale, math.sqrt(variance) * scale


def coefficient_of_variation(mean: float, std: float) -> float:
    """std / |mean|, capped at MAX_CV (a mean near 0 would otherwise explode it)."""
    if std == 0.0:
        return 0.0
    return min(MAX_CV, std / max(abs(mean), _TINY))


def least_squares_slope(values: list[float]) -> float:
    """Slope of the least-squares line through (i, values[i]): negative while the loss falls."""
    count = len(values)
    if count < 2:
        return 0.0
    scale = max(abs(v) for v in values) or 1.0
    x_mean = (count - 1) / 2
    y_mean = math.fsum(v / scale for v in values) / count
    numerator = math.fsum((i - x_mean) * (v / scale - y_mean) for i, v in enumerate(values))
    denominator = math.fsum((i - x_mean) ** 2 for i in range(count))
    return numerator / denominator * scale


def slope_t_statistic(values: list[float]) -> float:
    """Least-squares slope over its standard error: how many standard errors the trend is away from flat.

    Clipped to +-MAX_CV; a noiseless trend gives the clip value with the slope's sign, a flat one 0.
    The statistic does not depend on the values' scale, so it is computed on values divided by the
    largest magnitude (huge inputs cannot overflow).
    """
    count = len(values)
    if count < 3:
        return 0.0
    scale = max(abs(v) for v in values) or 1.0
    scaled = [v / scale for v in values]
    slope = least_squares_slope(scaled)
    mean = math.fsum(scaled) / count
    x_mean = (count - 1) / 2
    residuals = [v - (mean + slope * (i - x_mean)) for i, v in enumerate(scaled)]
    residual_variance = math.fsum(r * r for r in residuals) / (count - 2)
    spread = math.fsum((i - x_mean) ** 2 for i in range(count))
    standard_error = math.sqrt(residual_variance / spread)
    if standard_error <= _TINY * max(abs(slope), 1e-300):
        return math.copysign(MAX_CV, slope) if slope != 0 else 0.0
    return max(-MAX_CV, min(MAX_CV, slope / standard_error))


def relative_improvement(previous: float, current: float) -> float:
    """(previous - current) / |previous|: positive when the value fell; 0 when previous is ~0."""
    if abs(previous) < _TINY:
        return 0.0
    return (previous - current) / abs(previous)


def ema_step(previous: float | None, x: float, beta: float) -> float:
    """One step of an exponential moving average: x the first time, then beta * previous + (1 - beta) * x.
    The one EMA formula of hf_r8 (losses, gradient norms, rewards, the rollback level, the report's curve)."""
    return x if previous is None else beta * previous + (1.0 - beta) * x


class Ema:
    """Exponential moving average (`ema_step`) with the count of values it has seen."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.value: float | None = None
        self.count = 0

    def update(self, x: float) -> float:
        self.value = ema_step(self.value, x, self.beta)
        self.count += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]
        self.count = state["count"]


@dataclass
class WindowSummary:
    """Statistics of one closed, non-overlapping window of losses."""

    mean: float
    std: float
    cv: float
    slope: float
    slope_t: float
    """slope / its standard error (negative: a significant fall)."""
    previous_mean: float | None
    improvement_rate: float
    """(previous_mean - mean) / |previous_mean|; 0 for the first window."""
    setback: float = math.inf
    """(mean - previous_mean) / (first loss - previous_mean): the share of the progress since the first loss
    the window gives back (inf for the first window or before any progress)."""
    spread: float | None = None
    """std / max(|mean|, first loss - mean): the coefficient of variation, except that near zero the scale is the
    progress made rather than the level (a loss of 0.03 that varies by 0.02 is not unstable after a fall
    from 2.3). None: not computed (the cv stands in)."""


@dataclass
class LossStep:
    """What one new loss did to the statistics."""

    finite: bool
    ema_before: float | None
    ema: float | None
    z_score: float
    """(loss - rolling mean) / rolling std, measured before the loss entered the window."""
    spike_ratio: float
    """loss / EMA before the loss entered it (1 when undefined)."""
    closed_window: WindowSummary | None
    setback: float = math.inf
    """(loss - EMA before it) / (first loss - EMA before it): the share of the progress since the first loss
    this loss gives back (inf when there was no progress yet)."""


def setback(value: float, level: float, first: float | None) -> float:
    """(value - level) / (first - level): the share of the progress since the first loss that `value` gives back
    against `level` (inf while there has been no progress). A spike must give back a real share: near zero, a
    loss several times its level can still be one hard example in a batch."""
    progress = (first if first is not None else level) - level
    return (value - level) / progress if progress > _TINY else math.inf


class LossStatistics:
    """Loss EMA, a rolling window (CV, z-score) and non-overlapping windows for the decision engine."""

    def __init__(self, window: int, ema_beta: float) -> None:
        self.window = window
        self.ema = Ema(ema_beta)
        self.rolling: deque[float] = deque(maxlen=window)
        self.current_window: list[float] = []
        self.previous_window_mean: float | None = None
        self.nonfinite_count = 0
        self.first_loss: float | None = None

    def update(self, loss: float | None) -> LossStep:
        if not is_finite_number(loss):
            self.nonfinite_count += 1
            value = self.ema.value
            return LossStep(False, value, value, 0.0, 1.0, None)
        ema_before = self.ema.value
        z_score = self._z_score(loss)
        spike_ratio = loss / ema_before if ema_before is not None and ema_before > _TINY else 1.0
        setback = self.setback(loss, ema_before) if ema_before is not None else math.inf
        if self.first_loss is None:
            self.first_loss = loss
        self.ema.update(loss)
        self.rolling.append(loss)
        self.current_window.append(loss)
        closed = self._close_window() if len(self.current_window) >= self.window else None
        return LossStep(True, ema_before, self.ema.value, z_score, spike_ratio, closed, setback)

    def setback(self, value: float, level: float) -> float:
        """`setback(value, level, first loss)`."""
        return setback(value, level, self.first_loss)

    def rolling_cv(self) -> float:
        """Coefficient of variation of the rolling window (0 with fewer than 2 losses)."""
        if len(self.rolling) < 2:
            return 0.0
        return coefficient_of_variation(*mean_and_std(list(self.rolling)))

    def _z_score(self, loss: float) -> float:
        if len(self.rolling) < 2:
            return 0.0
        mean, std = mean_and_std(list(self.rolling))
        if std <= _TINY * max(abs(mean), 1.0):
            return 0.0
        return max(-MAX_CV, min(MAX_CV, (loss - mean) / std))

    def _close_window(self) -> WindowSummary:
        values = self.current_window
        mean, std = mean_and_std(values)
        previous = self.previous_window_mean
        improvement = 0.0 if previous is None else relative_improvement(previous, mean)
        summary = WindowSummary(mean, std, coefficient_of_variation(mean, std), least_squares_slope(values),
                                slope_t_statistic(values), previous, improvement,
                                math.inf if previous is None else self.setback(mean, previous),
                                std / max(abs(mean), (self.first_loss or mean) - mean, _TINY))
        self.previous_window_mean = mean
        self.current_window = []
        return summary

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": self.ema.state_dict(),
            "rolling": list(self.rolling),
            "current_window": list(self.current_window),
            "previous_window_mean": self.previous_window_mean,
            "nonfinite_count": self.nonfinite_count,
            "first_loss": self.first_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
        self.rolling = deque(state["rolling"], maxlen=self.window)
        self.current_window = list(state["current_window"])
        self.previous_window_mean = state["previous_window_mean"]
        self.nonfinite_count = state["nonfinite_count"]
        self.first_loss = state.get("first_loss")  # saved before the setback test: the next loss sets it


class RewardStatistics:
    """Reward EMA, a rolling window (for variance) and the most recent rewards (for the trend test)."""

    def __init__(self, window: int, ema_beta: float, trend_window: int) -> None:
        self.window = window
        self.ema = Ema(ema_beta)
        self.rolling: deque[float] = deque(maxlen=window)
        self.recent: deque[float] = deque(maxlen=trend_window)

    def update(self, reward: float) -> None:
        self.ema.update(reward)
        self.rolling.append(reward)
        self.recent.append(reward)

    def variance(self) -> float:
        if len(self.rolling) < 2:
            return 0.0
        std = mean_and_std(list(self.rolling))[1]
        return std * std if std < 1e150 else math.inf  # squaring a huge std would overflow

    def trend_t(self) -> float | None:
        """Least-squares slope of the recent rewards in standard errors (`slope_t_statistic`); None until
        half the trend window (at least 4 rewards) is in."""
        if len(self.recent) < max(4, (self.recent.maxlen or 0) // 2):
            return None
        return slope_t_statistic(list(self.recent))

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict(), "rolling": list(self.rolling), "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
        self.rolling = deque(state["rolling"], maxlen=self.window)
        self.recent = deque(state.get("recent", []), maxlen=self.recent.maxlen)
