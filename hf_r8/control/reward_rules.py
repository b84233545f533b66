"""The built-in LR rules of RL fine-tuning, driven by the reward and the KL to the reference model.

`config.reward.rules` chooses among `REWARD_RULE_CLASSES` (scaling, trend, variance); their proposals, blend
weights and saved state go by `reward_<name>`. The KL brake is on whenever `reward.kl_limit` is set.
Each docstring carries its formula. No torch, no transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hf_r8.control.rules import Proposal, Rule, StepStatistics
from hf_r8.control.signals import is_finite_number

if TYPE_CHECKING:
    from hf_r8.control.config import R8Config, RewardConfig


def over_kl_limit(kl: float | None, config: RewardConfig) -> bool:
    """True while the KL to the reference model is above reward.kl_limit (never without a limit)."""
    return config.kl_limit is not None and is_finite_number(kl) and kl > config.kl_limit


class KlBrakeRule(Rule):
    """x reward.down_factor every step the KL is above reward.kl_limit, never weighted down; an event marks the
    start of each stretch over the limit."""

    state_keys = ("kl_braking",)

    def __init__(self, config: R8Config, router: bool = False) -> None:
        super().__init__(config, router)
        self.kl_braking = False

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        config = self.config.reward
        over_limit = over_kl_limit(statistics.kl, config)
        proposal = None
        if over_limit:
            proposal = self.proposal(config.down_factor, "" if self.kl_braking else "kl_brake",
                                     f"KL {statistics.kl:.4g} above reward.kl_limit={config.kl_limit:g}",
                                     blendable=False)
        if statistics.kl is not None:  # a step that logged no KL leaves the stretch as it was
            self.kl_braking = over_limit
        return proposal


class RewardTrendRule(Rule):
    """x reward.up_factor while the reward rises by more than reward.trend_t standard errors, x down_factor while
    it falls; never up while the KL is over its limit.

    Like the loss trend, it acts every step; an event marks a change of direction.
    """

    state_keys = ("reward_direction",)

    def __init__(self, config: R8Config, router: bool = False) -> None:
        super().__init__(config, router)
        self.reward_direction = 0

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        config, direction = self.config.reward, statistics.reward_direction
        proposal = None
        if direction and not (over_kl_limit(statistics.kl, config) and direction > 0):
            action = "" if direction == self.reward_direction else f"reward_{'up' if direction > 0 else 'down'}"
            reward = statistics.reward
            reason = (f"reward slope {abs(reward.trend_t()):.1f} standard errors "
                      f"{'above' if direction > 0 else 'below'} flat over the last {len(reward.recent)} "
                      f"rewards (EMA {reward.ema.value:.4g})")
            proposal = self.proposal(config.up_factor if direction > 0 else config.down_factor, action,
                                     reason)
        if direction is not None:  # a step without a new reward changes nothing
            self.reward_direction = direction
        return proposal


class RewardScalingRule(Rule):
    """1 + clip((R - center) / span, -1, 1) on the reward EMA R: center - span -> ~0x, center -> 1x,
    center + span -> 2x (the ~0 end is held up by the group's lower gain bound)."""

    kind = "level"

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        reward_ema, config = statistics.reward.ema.value, self.config.reward
        if reward_ema is None:
            return None
        return self.proposal(1.0 + max(-1.0, min(1.0, (reward_ema - config.center) / config.span)))


class RewardVarianceRule(Rule):
    """1 / (1 + variance_scale * var(R) / span^2) over the rolling reward window: noisy rewards damp the LR."""

    kind = "level"

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        if statistics.reward.ema.value is None:
            return None
        config, variance = self.config.reward, statistics.reward.variance()
        return self.proposal(1.0 / (1.0 + config.variance_scale * variance / (config.span * config.span)))


REWARD_RULE_CLASSES: dict[str, type[Rule]] = {
    "scaling": RewardScalingRule,
    "trend": RewardTrendRule,
    "variance": RewardVarianceRule,
}
"""The rules `reward.rules` may name, in the order they run."""
