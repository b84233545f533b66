"""The windowed decision engine: INCREASE / DECREASE / HOLD / SPIKE_DECREASE.

Every `window` steps the engine compares the closed window with the previous one:

1. SPIKE_DECREASE  if mean > previous_mean * spike_threshold and the window gives back progress (below;
                   waits only for `spike_cooldown_steps`)
2. DECREASE        if spread > instability_threshold                     (oscillating)
3. INCREASE        if (improvement_rate > increase_threshold or slope_t < -significant_fall_t)
                   and spread < stability_threshold and slope < 0

The spread is the window's coefficient of variation, with the progress since the first loss as the
scale when it is larger than the level (near zero, the level understates how much the loss can move).
4. DECREASE        if improvement_rate < plateau_threshold for `patience_windows` windows in a row
5. HOLD            otherwise, and always within `cooldown_steps` of the last adjustment

Between windows it watches every single loss for the emergency brake: a non-finite loss, or
`spike_steps` losses in a row each above spike_threshold x EMA with a z-score above spike_z, is a
SPIKE_DECREASE at once (at most once per `spike_cooldown_steps`). With `spike_steps` 1 (the default) every
outlying batch brakes: at an LR a few times too high that is the first sign of it, and waiting for a second
in a row cost tabular at 3x its best LR 8% (bench/README.md); where batches spike for their labels, 2 waits
for the next batch's loss, on the weights after the outlier's update. Pure Python; one engine per parameter
group.

Both brakes also need the loss (window mean) to give back at least `spike_min_setback` of the progress
made since the first loss: late in a classification run the loss sits near zero, where a batch with one
hard example is 3x the EMA and far outside the recent spread, and braking on it halved the LR again and
again (gain 1 -> 0.02 over 80 steps on digits, bench/README.md).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

from hf_r8.control.config import DecisionConfig
from hf_r8.control.signals import LossStep, WindowSummary


class Decision(str, enum.Enum):
    INCREASE = "increase"
    DECREASE = "decrease"
    HOLD = "hold"
    SPIKE_DECREASE = "spike_decrease"

    @property
    def code(self) -> int:
        """Numeric form for scalar loggers: +1 increase, 0 hold, -1 decrease, -2 spike."""
        return {"increase": 1, "hold": 0, "decrease": -1, "spike_decrease": -2}[self.value]


@dataclass
class Verdict:
    decision: Decision
    reason: str


@dataclass
class DecisionEngine:
    """Per-group engine state: plain counters that round-trip through JSON."""

    plateau_windows: int = 0
    # "Long ago": a fresh engine is in no cooldown (a large int rather than inf keeps the state JSON-safe).
    steps_since_adjustment: int = 1_000_000_000
    steps_since_brake: int = 1_000_000_000
    spikes_in_row: int = 0

    def on_step(self, loss_step: LossStep | None, config: DecisionConfig) -> Verdict | None:
        """Advance one optimizer step; return a non-HOLD verdict, a HOLD at window close, or None."""
        self.steps_since_adjustment += 1
        self.steps_since_brake += 1
        if loss_step is None:
            return None
        brake = self._single_step_spike(loss_step, config)
        if brake is not None:
            return brake
        if loss_step.closed_window is None:
            return None
        return self._window_decision(loss_step.closed_window, config)

    def _single_step_spike(self, loss_step: LossStep, config: DecisionConfig) -> Verdict | None:
        spiking = (loss_step.finite and loss_step.spike_ratio > config.spike_threshold
                   and loss_step.z_score > config.spike_z and loss_step.setback >= config.spike_min_setback)
        self.spikes_in_row = self.spikes_in_row + 1 if spiking else 0
        if self.steps_since_brake < config.spike_cooldown_steps:
            return None
        if not loss_step.finite:
            reason = "non-finite loss"
        elif self.spikes_in_row >= config.spike_steps:
            in_row = f" ({self.spikes_in_row} in a row)" if self.spikes_in_row > 1 else ""
            reason = (f"loss spike{in_row}: {loss_step.spike_ratio:.2f}x the EMA "
                      f"(> {config.spike_threshold}), z={loss_step.z_score:.1f} (> {config.spike_z})")
        else:
            return None
        return self._adjusted(Verdict(Decision.SPIKE_DECREASE, reason), brake=True)

    def _window_decision(self, window: WindowSummary, config: DecisionConfig) -> Verdict:
        previous = window.previous_mean
        spiked = (previous is not None and previous > 0 and window.mean > previous * config.spike_threshold
                  and window.setback >= config.spike_min_setback)
        # A brake only waits for the previous brake, never for the cooldown of ordinary adjustments.
        if spiked and self.steps_since_brake >= config.spike_cooldown_steps:
            self.plateau_windows = 0
            reason = f"window loss spike: mean {window.mean:.4g} > {config.spike_threshold} x previous {previous:.4g}"
            return self._adjusted(Verdict(Decision.SPIKE_DECREASE, reason), brake=True)
        if self.steps_since_adjustment < config.cooldown_steps:
            return Verdict(Decision.HOLD, f"cooldown ({self.steps_since_adjustment}/{config.cooldown_steps} steps)")
        spread = window.cv if window.spread is None else window.spread
        if spread > config.instability_threshold:
            self.plateau_windows = 0
            reason = f"unstable: spread={spread:.3f} (cv={window.cv:.3f}) > {config.instability_threshold}"
            return self._adjusted(Verdict(Decision.DECREASE, reason))
        fast = window.improvement_rate > config.increase_threshold
        certain = config.significant_fall_t is not None and window.slope_t < -config.significant_fall_t
        if (fast or certain) and spread < config.stability_threshold and window.slope < 0:
            self.plateau_windows = 0
            why = (f"rate={window.improvement_rate:.4f} > {config.increase_threshold}" if fast
                   else f"slope {-window.slope_t:.1f} standard errors below flat")
            reason = f"improving: {why}, cv={window.cv:.3f}, slope={window.slope:.3g}"
            return self._adjusted(Verdict(Decision.INCREASE, reason))
        if previous is not None and window.improvement_rate < config.plateau_threshold:
            self.plateau_windows += 1
            if self.plateau_windows >= config.patience_windows:
                self.plateau_windows = 0
                reason = (f"plateau: improvement rate {window.improvement_rate:.4f} < {config.plateau_threshold} "
                          f"for {config.patience_windows} windows")
                return self._adjusted(Verdict(Decision.DECREASE, reason))
            return Verdict(Decision.HOLD, f"plateau window {self.plateau_windows}/{config.patience_windows}")
        self.plateau_windows = 0
        return Verdict(Decision.HOLD, f"steady: rate={window.improvement_rate:.4f}, cv={window.cv:.3f}")

    def _adjusted(self, verdict: Verdict, *, brake: bool = False) -> Verdict:
        self.steps_since_adjustment = 0
        if brake:
            self.steps_since_brake = 0
        return verdict

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
