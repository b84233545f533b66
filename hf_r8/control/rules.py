"""The control laws as small pure functions: each docstring carries its formula.

Two kinds of LR rules exist:

* **step rules** return a multiplicative factor applied to the group's running gain this step
  (trend, grad_norm, plateau, reward trend, and the decision engine in `decision.py`);
* **level rules** return a multiplier computed afresh from the current statistics and applied on
  top of the running gain (variance, loss_decay, cyclical, reward scaling, reward variance).

`blend` combines several factors in log-space. Momentum laws return a momentum in [min, max];
`next_sigma` is the exploration law. No torch, no transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hf_r8.control.config import (
    BlendConfig,
    CyclicalConfig,
    ExplorationConfig,
    LossDecayConfig,
    MomentumConfig,
    RewardConfig,
    TrendConfig,
    VarianceConfig,
)
from hf_r8.control.signals import WindowSummary, relative_improvement

# A factor of 0 (reward scaling at center - span) means "as low as the bounds allow".
_SMALLEST_FACTOR = 1e-12


@dataclass
class Proposal:
    """One rule's multiplicative proposal for this step."""

    rule: str
    factor: float
    action: str = ""
    """Name of a discrete decision (e.g. "increase", "grad_norm_jump"); empty for continuous rules."""
    reason: str = ""
    blendable: bool = True
    """False for safety actions (the spike brake), which are never weighted down."""


def trend_factor(ema_before: float, ema: float, config: TrendConfig) -> float:
    """x u if the loss EMA improved by more than `min_rel_improve` (relative), else x d."""
    improved = relative_improvement(ema_before, ema) > config.min_rel_improve
    return config.up_factor if improved else config.down_factor


def variance_level(cv: float, config: VarianceConfig) -> float:
    """lr / (base + lambda * var), with var measured scale-free as cv^2 of the rolling loss window."""
    return 1.0 / (config.base + config.scale * cv * cv)


def loss_decay_level(loss_ema: float, config: LossDecayConfig) -> float:
    """lr / (1 + k * loss): a high loss keeps the LR low (loss clipped at 0 from below)."""
    return 1.0 / (1.0 + config.k * max(0.0, loss_ema))


def cosine_restart_level(t_cur: int, t_i: int, config: CyclicalConfig) -> float:
    """eta_min + (1 - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2, eta_min = eta_min_scale."""
    cosine = 0.5 * (1.0 + math.cos(math.pi * t_cur / max(1, t_i)))
    return config.eta_min_scale + (1.0 - config.eta_min_scale) * cosine


def reward_scaling_level(reward_ema: float, config: RewardConfig) -> float:
    """1 + clip((R - center) / span, -1, 1): center - span -> ~0x, center -> 1x, center + span -> 2x.

    The ~0 end is held up by the group's lower gain bound.
    """
    return 1.0 + max(-1.0, min(1.0, (reward_ema - config.center) / config.span))


def reward_trend_factor(direction: int, config: RewardConfig) -> float:
    """x up_factor while the reward rises significantly (direction 1), x down_factor while it falls (-1), else 1."""
    return config.up_factor if direction > 0 else config.down_factor if direction < 0 else 1.0


def reward_variance_level(variance: float, config: RewardConfig) -> float:
    """1 / (1 + variance_scale * var(R) / span^2): noisy rewards damp the LR."""
    return 1.0 / (1.0 + config.variance_scale * variance / (config.span * config.span))


def blend(proposals: list[Proposal], config: BlendConfig, instability: float) -> float:
    """exp(sum_r w_r * log f_r), with weights shifted by training stability.

    instability u in [0, 1] (rolling cv over decision.instability_threshold, clipped). With shift s:
    damping factors (f < 1) weigh w * (1 + s*(2u - 1)), growth factors (f > 1) weigh w * (1 - s*(2u - 1)),
    so an unstable run listens to its damping rules and a stable one to its growth rules.
    Non-blendable proposals enter with weight 1.
    """
    tilt = config.stability_shift * (2.0 * instability - 1.0)
    log_total = 0.0
    for proposal in proposals:
        if proposal.factor == 1.0:
            continue
        weight = config.weights.get(proposal.rule, 1.0)
        if proposal.blendable:
            weight *= (1.0 + tilt) if proposal.factor < 1.0 else (1.0 - tilt)
        else:
            weight = 1.0
        log_total += weight * math.log(max(proposal.factor, _SMALLEST_FACTOR))
    return math.exp(log_total)


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
    return momentum + config.reward_up if direction > 0 else momentum * config.reward_down if direction < 0 \
        else momentum


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
