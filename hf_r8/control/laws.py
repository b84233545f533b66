"""The momentum and exploration laws as small pure functions: each docstring carries its formula.

`momentum.rule` picks one momentum law per run (`next_momentum` applies it to a step's statistics);
`next_sigma` moves the exploration dither's scale at each closed loss window. The LR rules are classes
of their own (rules.py, loss_rules.py, reward_rules.py). No torch, no transformers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_r8.control.config import ExplorationConfig, MomentumConfig
    from hf_r8.control.rules import StepStatistics
    from hf_r8.control.signals import WindowSummary


def loss_momentum(rule: str, loss_ema: float, config: MomentumConfig) -> float:
    """`inverse`: mu = 1 - 1 / (1 + a * loss); `exp`: mu = 1 - exp(-a * loss) (loss clipped at 0)."""
    scaled = config.loss_scale * max(0.0, loss_ema)
    if rule == "inverse":
        return 1.0 - 1.0 / (1.0 + scaled)
    return 1.0 - math.exp(-scaled)


def relative_momentum(momentum: float, window: WindowSummary, config: MomentumConfig) -> float:
    """mu * (1 + relative_gain * clip(improvement_rate, -1, 1)): consistent gains raise momentum."""
    return momentum * (1.0 + config.relative_gain * max(-1.0, min(1.0, window.improvement_rate)))


def normalized_momentum(cv: float, config: MomentumConfig) -> float:
    """max - (max - min) * min(1, cv / cv_reference): smooth loss -> high momentum, noisy -> low."""
    return config.max - (config.max - config.min) * min(1.0, cv / config.cv_reference)


def reward_momentum(momentum: float, direction: int, config: MomentumConfig) -> float:
    """mu + reward_up while the reward rises significantly, mu * reward_down while it falls, else mu."""
    if direction > 0:
        return momentum + config.reward_up
    return momentum * config.reward_down if direction < 0 else momentum


def next_momentum(momentum: float, statistics: StepStatistics, config: MomentumConfig) -> float:
    """The law `config.rule` (not "none") applied after one step, clipped to [min, max].

    A law with nothing to go on yet (no loss EMA, no closed window, no significant reward trend) leaves the
    momentum where it is; a non-finite result leaves it unclipped and unchanged.
    """
    loss, loss_step = statistics.loss, statistics.loss_step
    window = loss_step.closed_window if loss_step is not None else None
    updated = momentum
    if config.rule in ("inverse", "exp") and loss.ema.value is not None:
        updated = loss_momentum(config.rule, loss.ema.value, config)
    elif config.rule == "relative" and window is not None:
        updated = relative_momentum(momentum, window, config)
    elif config.rule == "normalized" and len(loss.rolling) >= 2:
        updated = normalized_momentum(loss.rolling_cv(), config)
    elif config.rule == "reward" and statistics.reward_direction:
        updated = reward_momentum(momentum, statistics.reward_direction, config)
    return min(config.max, max(config.min, updated)) if math.isfinite(updated) else momentum


def next_sigma(sigma: float, window: WindowSummary, spiked: bool, instability_threshold: float,
               plateau_threshold: float, config: ExplorationConfig) -> tuple[float, str | None]:
    """Exploration law at each closed window: x cut on instability or spike, x raise on a plateau.

    Unstable means cv > decision.instability_threshold; a plateau means |improvement_rate| below
    decision.plateau_threshold. Returns the clipped sigma and why it moved (None when it did not).
    """
    if spiked or window.cv > instability_threshold:
        new_sigma, reason = sigma * config.cut_factor, f"unstable (cv={window.cv:.3f}) or spike: cut exploration"
    elif window.previous_mean is not None and abs(window.improvement_rate) < plateau_threshold:
        new_sigma, reason = sigma * config.raise_factor, (
            f"plateau (rate={window.improvement_rate:.4f}): raise exploration")
    else:
        return sigma, None
    return min(config.sigma_max, max(config.sigma_min, new_sigma)), reason
