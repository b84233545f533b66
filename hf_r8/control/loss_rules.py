"""The built-in LR rules driven by the loss and the gradient norm; each docstring carries its formula.

Step rules: `decision` (the windowed engine of decision.py), `trend`, `grad_norm`, `plateau`.
Level rules: `variance`, `loss_decay`, `cyclical`. They are registered under these names in
rule_registry.py. Their state keys are the names version 1 of the controller state used for them, so an
old checkpoint maps onto them as it is. No torch, no transformers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from hf_r8.control.decision import Decision, DecisionEngine
from hf_r8.control.rules import Proposal, Rule, StepStatistics
from hf_r8.control.signals import relative_improvement

if TYPE_CHECKING:
    from hf_r8.control.config import R8Config


class DecisionRule(Rule):
    """x decision.increase_factor / decrease_factor / spike_factor on the decision engine's verdicts.

    A router group takes the gentler moe.increase_factor / decrease_factor; the spike brake is never weighted
    down by the blend.
    """

    def __init__(self, config: R8Config, router: bool = False) -> None:
        super().__init__(config, router)
        self.engine = DecisionEngine()

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        verdict = self.engine.on_step(statistics.loss_step, self.config.decision)
        if verdict is None:
            return None
        factor = self._factor(verdict.decision)
        if factor == 1.0:
            return None
        return self.proposal(factor, verdict.decision.value, verdict.reason,
                             blendable=verdict.decision is not Decision.SPIKE_DECREASE)

    def _factor(self, decision: Decision) -> float:
        config, moe = self.config.decision, self.config.moe
        if decision is Decision.INCREASE:
            return moe.increase_factor if self.router else config.increase_factor
        if decision is Decision.DECREASE:
            return moe.decrease_factor if self.router else config.decrease_factor
        if decision is Decision.SPIKE_DECREASE:
            return config.spike_factor
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])


class TrendRule(Rule):
    """x trend.up_factor if the loss EMA improved by more than trend.min_rel_improve (relative), else x down_factor.

    It acts every step with a finite loss; only a change of direction is a decision worth an event.
    """

    state_keys = ("trend_direction",)

    def __init__(self, config: R8Config, router: bool = False) -> None:
        super().__init__(config, router)
        self.trend_direction = 0

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        loss_step = statistics.loss_step
        if loss_step is None or not loss_step.finite or loss_step.ema_before is None:
            return None
        config = self.config.trend
        improved = relative_improvement(loss_step.ema_before, loss_step.ema) > config.min_rel_improve
        factor = config.up_factor if improved else config.down_factor
        direction = 1 if factor > 1.0 else -1
        action = "" if direction == self.trend_direction else f"trend_{'up' if direction > 0 else 'down'}"
        reason = f"loss EMA {'improving' if direction > 0 else 'not improving'} ({loss_step.ema:.4g})"
        self.trend_direction = direction
        return self.proposal(factor, action, reason)


class GradNormRule(Rule):
    """x grad_norm.shrink_factor when the gradient norm jumps on grad_norm.jump_steps steps in a row, x grow_factor
    when its level collapses on grad_norm.collapse_steps steps in a row, then grad_norm.cooldown_steps steps
    without acting.

    A single jump is one batch: once most examples are fit, a batch holding one that is not has a norm several
    times the average. At a good LR such batches are rare and far apart; at an LR a few times too high the jumps
    come often, and the shrinks are the correction. Keeping every shrink (`confirm_steps` 0) ratchets the gain
    down at a good LR; waiting for jumps on batches in a row (`jump_steps` 2) removes the correction too
    (bench/README.md). So each shrink acts at once and is undone unless another jump follows within
    `confirm_steps` steps: kept where jumps recur, given back where one batch was the cause.

    A collapse compares geometric means (EMAs of the log norm): at an LR a few times too high the norms are
    heavy-tailed, and a plain slow EMA that takes each jump at its size stood far above the typical batch, which
    then read as a collapse and grew the gain after every jump. A collapse must also hold on `collapse_steps`
    steps in a row: the fast average of two or three small batches is not a level.
    """

    state_keys = ("steps_since_grad_rule", "jumps_in_row", "collapses_in_row", "unconfirmed_for")

    def __init__(self, config: R8Config, router: bool = False) -> None:
        super().__init__(config, router)
        self.steps_since_grad_rule = 1_000_000_000  # "long ago": no cooldown at start
        self.jumps_in_row = 0
        self.collapses_in_row = 0
        self.unconfirmed_for: int | None = None
        """Steps since a shrink that no later jump has confirmed (`confirm_steps` > 0); None when none is pending."""

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        config = self.config.grad_norm
        self.steps_since_grad_rule += 1
        self.jumps_in_row = self.jumps_in_row + 1 if statistics.grad_jump else 0
        self.collapses_in_row = self.collapses_in_row + 1 if statistics.grad_collapse else 0
        undo = self._settle_shrink(statistics.grad_jump)
        jumped = self.jumps_in_row >= config.jump_steps
        collapsed = self.collapses_in_row >= config.collapse_steps
        cooling_down = self.steps_since_grad_rule <= config.cooldown_steps
        if undo is not None or not (jumped or collapsed) or cooling_down:
            return undo  # an undo takes its step; a collapse seen on it is judged again at the next
        self.steps_since_grad_rule = 0
        slow = statistics.grad_slow.value
        if jumped:
            in_row = f" on {self.jumps_in_row} steps in a row" if self.jumps_in_row > 1 else ""
            provisional = config.confirm_steps > 0
            if provisional:
                self.unconfirmed_for = 0
            return self.proposal(config.shrink_factor, "grad_norm_jump",
                                 f"norm > {config.jump_ratio} x EMA {slow:.4g}{in_row}", blendable=not provisional)
        fast, level = math.exp(statistics.grad_log_fast.value), math.exp(statistics.grad_log_slow.value)
        return self.proposal(config.grow_factor, "grad_norm_collapse",
                             f"fast geometric mean {fast:.4g} < {config.collapse_ratio} x slow {level:.4g} on "
                             f"{self.collapses_in_row} steps in a row")

    def _settle_shrink(self, jump: bool) -> Proposal | None:
        """A pending shrink is kept on a new jump, and undone once `confirm_steps` steps have passed without one."""
        if self.unconfirmed_for is None:
            return None
        if jump:
            self.unconfirmed_for = None
            return None
        self.unconfirmed_for += 1
        config = self.config.grad_norm
        if self.unconfirmed_for < config.confirm_steps:
            return None
        self.unconfirmed_for = None
        return self.proposal(1.0 / config.shrink_factor, "grad_norm_jump_undone",
                             f"no other jump in the {config.confirm_steps} steps after the shrink: one outlying "
                             "batch, not the LR", blendable=False)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state saved before jumps or collapses were counted in a row, or before shrinks were confirmed, has none
        under way."""
        super().load_state_dict({"jumps_in_row": 0, "collapses_in_row": 0, "unconfirmed_for": None, **state})


class PlateauRule(Rule):
    """x plateau.big_drop after plateau.patience steps without a new best loss EMA (better by more than
    min_rel_improve, relative); then plateau.cooldown steps in which bad steps do not count (as in
    ReduceLROnPlateau)."""

    state_keys = ("plateau_best", "plateau_steps", "plateau_cooldown")

    def __init__(self, config: R8Config, router: bool = False) -> None:
        super().__init__(config, router)
        self.plateau_best: float | None = None
        self.plateau_steps = 0
        self.plateau_cooldown = 0

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        loss_step = statistics.loss_step
        if loss_step is None or not loss_step.finite:
            return None
        config = self.config.plateau
        if self.plateau_best is None or relative_improvement(self.plateau_best, loss_step.ema) > config.min_rel_improve:
            self.plateau_best = loss_step.ema
            self.plateau_steps = 0
            return None
        if self.plateau_cooldown > 0:
            self.plateau_cooldown -= 1
            return None
        self.plateau_steps += 1
        if self.plateau_steps < config.patience:
            return None
        self.plateau_steps = 0
        self.plateau_cooldown = config.cooldown
        return self.proposal(config.big_drop, "plateau_drop",
                             f"no new best loss EMA ({self.plateau_best:.4g}) for {config.patience} steps")


class VarianceRule(Rule):
    """lr / (variance.base + variance.scale * var), with var measured scale-free as cv^2 of the rolling loss
    window."""

    kind = "level"

    def propose(self, statistics: StepStatistics) -> Proposal:
        config = self.config.variance
        cv = statistics.loss.rolling_cv()
        return self.proposal(1.0 / (config.base + config.scale * cv * cv))


class LossDecayRule(Rule):
    """lr / (1 + loss_decay.k * loss EMA): a high loss keeps the LR low (the loss clipped at 0 from below)."""

    kind = "level"

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        loss_ema = statistics.loss.ema.value
        if loss_ema is None:
            return None
        return self.proposal(1.0 / (1.0 + self.config.loss_decay.k * max(0.0, loss_ema)))


class CyclicalRule(Rule):
    """Cosine warm restarts: eta_min + (1 - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2, eta_min = eta_min_scale.

    T_cur counts the steps of the cycle under way; a cycle of T_i steps is followed by one of T_i * T_mult,
    starting from cyclical.T0.
    """

    kind = "level"
    state_keys = ("cycle_position", "cycle_length")

    def __init__(self, config: R8Config, router: bool = False) -> None:
        super().__init__(config, router)
        self.cycle_position = 0
        self.cycle_length = config.cyclical.T0

    def propose(self, statistics: StepStatistics) -> Proposal:
        config = self.config.cyclical
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.cycle_position / max(1, self.cycle_length)))
        level = config.eta_min_scale + (1.0 - config.eta_min_scale) * cosine
        self.cycle_position += 1
        if self.cycle_position >= self.cycle_length:
            self.cycle_position = 0
            self.cycle_length *= config.T_mult
        return self.proposal(level)
