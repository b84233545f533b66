"""The rule protocol: an LR rule is a small class that proposes a change of the gain from the step's statistics.

Two kinds exist:

* **step rules** propose a multiplicative factor applied to the group's running gain this step, which it
  keeps (decision engine, trend, grad_norm, plateau, the KL brake, reward trend);
* **level rules** propose a multiplier computed afresh from the current statistics and applied on top of
  the running gain, this step only (variance, loss_decay, cyclical, reward scaling, reward variance).

Every parameter group runs its own instance of each active rule, so a rule keeps its state (counters,
cooldowns, directions) in plain attributes and says what to save in `state_dict()`. The controller builds
the rules by name (`rule_registry.py`), hands each the same `StepStatistics`, and combines their proposals
with `blend`; a rule knows nothing of the other rules, the gains or their bounds. The built-in rules live
in `loss_rules.py` and `reward_rules.py`. No torch, no transformers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from hf_r8.control.config import BlendConfig, R8Config
    from hf_r8.control.signals import Ema, LossStatistics, LossStep, RewardStatistics

# A factor of 0 (reward scaling at center - span) means "as low as the bounds allow".
_SMALLEST_FACTOR = 1e-12


@dataclass
class Proposal:
    """One rule's multiplicative proposal for this step."""

    rule: str
    """The rule's registered name, which `blend.weights` and the events know it by: the controller sets it to the
    name the rule was built under (`Rule.proposal` fills it in)."""
    factor: float
    action: str = ""
    """Name of a discrete decision (e.g. "increase", "grad_norm_jump"), which becomes an event; empty for
    continuous rules."""
    reason: str = ""
    blendable: bool = True
    """False for safety actions (the spike brake), which are never weighted down."""


@dataclass(frozen=True)
class StepStatistics:
    """What one optimizer step (after warmup) tells the rules; the same record for every parameter group.

    The statistics objects are the controller's own, already updated with this step's signals: read them,
    never update them.
    """

    step: int
    loss_step: LossStep | None
    """What this step's loss did to the loss statistics; None when the step had no loss."""
    loss: LossStatistics
    reward: RewardStatistics
    reward_direction: int | None
    """1 / -1 while the recent rewards rise / fall significantly, else 0; None for a step without a new reward."""
    grad_fast: Ema
    """The gradient norm's fast EMA (grad_norm.fast_beta), for rules of your own; the built-in ones compare
    geometric means for a collapse (`grad_log_fast`)."""
    grad_slow: Ema
    """The gradient norm's slow EMA: what a jump is measured against."""
    grad_log_fast: Ema
    grad_log_slow: Ema
    """Fast and slow EMAs of the log of the gradient norm: logs of geometric means, which one outlying batch moves
    by its log, not by its size."""
    grad_jump: bool
    """This step's gradient norm is above grad_norm.jump_ratio x its slow EMA."""
    grad_collapse: bool
    """The fast geometric mean of the gradient norm is below grad_norm.collapse_ratio x the slow one."""
    kl: float | None
    """KL divergence to the reference model (RL fine-tuning), when the trainer logs it."""
    router_aux_rise: float | None = None
    """The MoE router aux loss's fast EMA over its slow EMA, minus 1, once the slow one has seen
    `moe.aux_loss_cooldown_steps` values; None without an aux loss."""
    update_alignment: float | None = None
    """The cosine of this step's gradient with the optimizer's previous update (hypergradient.py); None when it
    was not measured."""


class Rule(ABC):
    """One LR rule of one parameter group: subclass it, implement `propose`, register it by name.

    Args:
        config: the full `R8Config`; a built-in rule reads its own section, a user rule its `settings`.
        router: whether the group gets the mixture-of-experts router profile (gentler factors).

    Once built, a rule knows the name it was registered under (`name`) and its entry of `config.rule_settings`
    (`settings`); read them in `propose`.

    Example:
        ```python
        class CoolDownBelowOne(Rule):
            '''x0.99 every step the loss EMA is below 1.'''

            def propose(self, statistics):
                ema = statistics.loss.ema.value
                below = self.settings.get("below", 1.0)
                return self.proposal(0.99) if ema is not None and ema < below else None

        register_rule("cool_down", CoolDownBelowOne)   # hf_r8.control.rule_registry
        config = R8Config(rules=["decision", "cool_down"], rule_settings={"cool_down": {"below": 0.5}})
        ```
    """

    kind: ClassVar[Literal["step", "level"]] = "step"
    """"step": the factor multiplies the running gain and stays; "level": it applies on top, this step only."""
    state_keys: ClassVar[tuple[str, ...]] = ()
    """The attributes that evolve (plain, JSON-safe values): the default `state_dict` saves them by name and
    `load_state_dict` restores them."""

    def __init__(self, config: R8Config, router: bool = False) -> None:
        self.config = config
        self.router = router
        self.name = ""
        """The name the rule is registered under, set when the controller builds it."""

    @property
    def settings(self) -> dict[str, Any]:
        """This rule's entry of `config.rule_settings` (empty when it has none)."""
        return self.config.rule_settings.get(self.name, {})

    def proposal(self, factor: float, action: str = "", reason: str = "", blendable: bool = True) -> Proposal:
        """A proposal of `factor` under this rule's name (see `Proposal`)."""
        return Proposal(self.name, factor, action, reason, blendable)

    @abstractmethod
    def propose(self, statistics: StepStatistics) -> Proposal | None:
        """This step's proposal (named after the rule), or None to leave the gain alone.

        Called once per optimizer step after warmup, for every group; a rule may update its own state here.
        """

    def state_dict(self) -> dict[str, Any]:
        """What evolves, as JSON-safe plain data: the `state_keys` attributes (override for anything else)."""
        return {key: getattr(self, key) for key in self.state_keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned: the `state_keys` attributes. State this default does not know (a
        `state_dict` overridden alone) is an error rather than a silent resume from a fresh state."""
        unknown = sorted(set(state) - set(self.state_keys))
        if unknown:
            raise NotImplementedError(f"{type(self).__name__}.load_state_dict() does not restore {unknown}: name "
                                      "them in state_keys or override load_state_dict()")
        for key in self.state_keys:
            setattr(self, key, state[key])


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
