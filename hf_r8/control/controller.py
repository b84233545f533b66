"""The controller: from per-step signals (loss, grad norm, reward) to an LR gain, momentum and sigma.

Each optimizer step the caller hands an `Observation`; the controller updates its statistics and,
after the warmup hand-off, every parameter group's state:

    step factor = rate_limit(blend(step rules))          # decision engine, trend, grad_norm, plateau, reward trend
    running gain = clip(running gain * step factor, gain_min, gain_max)
    lr_gain     = clip(running gain * blend(level rules), gain_min, gain_max)   # variance, loss_decay, cyclical, reward

The LR actually used is `compose_lr(group, schedule_lr, anneal)`: the base schedule's value times the gain
(and the end-of-run anneal's factor, `anneal.py`), never pushed below lr_min (unless the schedule itself is
lower) nor above lr_max. With every rule off the controller is the identity. The rules are small classes
looked up by name (rule_registry.py): each group runs its own instances, and the controller only hands them
the step's statistics and combines what they propose.
Everything here is plain Python: no torch, no transformers; `state_dict()` is JSON-safe and `load_state_dict()`
restores it exactly (a version-1 state, from before the rules were classes, too).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from hf_r8.control import state_versions
from hf_r8.control.config import R8Config
from hf_r8.control.decision import Decision
from hf_r8.control.events import Event
from hf_r8.control.laws import next_momentum, next_sigma
from hf_r8.control.rule_registry import build_rules, rule_states_kept_in_the_group, version_1_rule_states
from hf_r8.control.rules import Proposal, Rule, StepStatistics, blend
from hf_r8.control.signals import Ema, LossStatistics, LossStep, RewardStatistics, WindowSummary, is_finite_number


@dataclass
class GroupSpec:
    """What the controller needs to know about one optimizer parameter group."""

    base_lr: float
    """The group's peak LR (the schedule's value after warmup)."""
    momentum: float | None = None
    """Its momentum (`momentum` or `betas[0]`), or None when the optimizer has none."""
    is_router: bool = False
    """True for an MoE router/gate group."""
    initial_gain: float = 1.0
    """Gain to start from (an LR range test's choice); auto bounds are relative to base_lr * initial_gain."""


@dataclass
class Observation:
    """Signals of one optimizer step. Any of them may be missing (None) or non-finite."""

    step: int
    loss: float | None = None
    grad_norm: float | None = None
    reward: float | None = None
    kl: float | None = None
    """KL divergence to the reference model (RL fine-tuning), when the trainer logs it."""
    router_aux_loss: float | None = None
    """MoE router load-balancing loss, when the model returns it."""
    update_alignment: float | None = None
    """Cosine of the step's gradient with the optimizer's previous update, when the hypergradient rule runs."""


@dataclass
class GroupState:
    """Per-group controller state: plain numbers (each rule keeps its own state)."""

    running_gain: float = 1.0
    lr_gain: float = 1.0
    momentum: float | None = None


class Controller:
    """Adaptive LR/momentum/sigma controller for a list of parameter groups.

    Args:
        config: the full `R8Config`.
        groups: one `GroupSpec` per optimizer parameter group.
        total_steps: planned optimizer steps (derives the statistics window); None if unknown.
        warmup_steps: steps during which signals are gathered but nothing adapts; overrides
            `config.warmup_steps` when that is None.
    """

    def __init__(self, config: R8Config, groups: list[GroupSpec], total_steps: int | None = None,
                 warmup_steps: int = 0) -> None:
        if not groups:
            raise ValueError("groups: the optimizer has no parameter groups")
        self.config = config
        self.specs = list(groups)
        self.warmup_steps = config.warmup_steps if config.warmup_steps is not None else warmup_steps
        self.total_steps = total_steps
        self.window = config.signals.window or max(5, min(50, (total_steps or 1000) // 20))
        self.loss = LossStatistics(self.window, config.signals.ema_beta)
        self.reward = RewardStatistics(self.window, config.reward.ema_beta, config.reward.trend_window)
        self.grad_fast = Ema(config.grad_norm.fast_beta)
        self.grad_slow = Ema(config.grad_norm.slow_beta)
        self.grad_log_fast = Ema(config.grad_norm.fast_beta)
        self.grad_log_slow = Ema(config.grad_norm.slow_beta)
        self.aux_fast = Ema(config.moe.aux_loss_fast_beta)
        self.aux_slow = Ema(config.moe.aux_loss_slow_beta)
        self.sigma = config.exploration.sigma_init if config.exploration.enabled else 0.0
        self.step = 0
        self.last_window: WindowSummary | None = None
        no_router_group = not any(spec.is_router for spec in self.specs)
        # Router groups always get the MoE profile; with `moe.enabled` and no router group, every group does.
        self.router_profile = [spec.is_router or (config.moe.enabled and no_router_group) for spec in self.specs]
        self.gain_bounds = [self._gain_bounds(i) for i in range(len(self.specs))]
        self.groups = [GroupState(running_gain=spec.initial_gain, lr_gain=spec.initial_gain, momentum=spec.momentum)
                       for spec in self.specs]
        self.group_rules: list[dict[str, Rule]] = [build_rules(config, router) for router in self.router_profile]
        """Per group, the rules it runs by name, in the order they propose."""

    # ----------------------------------------------------------------------------------- bounds
    def lr_bounds(self, index: int) -> tuple[float, float]:
        """Absolute (lr_min, lr_max) of a group: configured, or base/100 and base*20."""
        bounds, spec = self.config.bounds, self.specs[index]
        base = spec.base_lr * spec.initial_gain
        lr_min = bounds.lr_min if bounds.lr_min is not None else base / 100.0
        lr_max = bounds.lr_max if bounds.lr_max is not None else base * 20.0
        return lr_min, lr_max

    def _gain_bounds(self, index: int) -> tuple[float, float]:
        base = self.specs[index].base_lr
        if not (is_finite_number(base) and base > 0):
            return 1.0, 1.0
        lr_min, lr_max = self.lr_bounds(index)
        gain_min, gain_max = lr_min / base, lr_max / base
        if self.router_profile[index]:
            initial, moe = self.specs[index].initial_gain, self.config.moe
            gain_min, gain_max = max(gain_min, moe.gain_min * initial), min(gain_max, moe.gain_max * initial)
        return gain_min, max(gain_min, gain_max)

    def compose_lr(self, index: int, schedule_lr: float, factor: float = 1.0) -> float:
        """LR to use: schedule_lr * lr_gain * `factor` (the engine's: the recovery after a rollback, the end-of-run
        anneal), kept within [min(lr_min, schedule_lr), lr_max]. A read: it changes nothing."""
        lr_min, lr_max = self.lr_bounds(index)
        composed = schedule_lr * self.groups[index].lr_gain * factor
        return min(lr_max, max(min(lr_min, schedule_lr), composed))

    # ---------------------------------------------------------------------------------- stepping
    def observe(self, observation: Observation) -> list[Event]:
        """Consume one step's signals; adapt every group once past warmup. Returns the decisions made."""
        self.step = observation.step
        loss_step = self.loss.update(observation.loss) if observation.loss is not None else None
        if loss_step is not None and loss_step.closed_window is not None:
            self.last_window = loss_step.closed_window
        grad_jump, grad_collapse = self._update_grad_norm(observation.grad_norm)
        aux_rise = self._update_aux_loss(observation.router_aux_loss)
        reward_updated = is_finite_number(observation.reward)
        if reward_updated:
            self.reward.update(observation.reward)
        if observation.step <= self.warmup_steps:
            return []
        statistics = StepStatistics(observation.step, loss_step, self.loss, self.reward,
                                    self._reward_direction() if reward_updated else None, self.grad_fast,
                                    self.grad_slow, self.grad_log_fast, self.grad_log_slow, grad_jump, grad_collapse,
                                    observation.kl, aux_rise, observation.update_alignment)
        instability = min(1.0, self.loss.rolling_cv() / self.config.decision.instability_threshold)
        events: list[Event] = []
        for index in range(len(self.groups)):
            events += self._adapt_group(index, statistics, instability)
        events += self._adapt_sigma(loss_step, events)
        return events

    def _reward_direction(self) -> int:
        """1 / -1 while the recent rewards rise / fall by more than `reward.trend_t` standard errors, else 0
        (the caller passes None for a step without a new reward)."""
        t = self.reward.trend_t()
        threshold = self.config.reward.trend_t
        return 0 if t is None or abs(t) <= threshold else (1 if t > 0 else -1)

    def _update_aux_loss(self, aux_loss: float | None) -> float | None:
        """Update the aux-loss EMAs; the fast EMA's relative excess over the slow one, once it is meaningful."""
        config = self.config.moe
        if config.aux_loss_rise is None or not is_finite_number(aux_loss):
            return None
        self.aux_fast.update(aux_loss)
        self.aux_slow.update(aux_loss)
        if self.aux_slow.count < config.aux_loss_cooldown_steps or self.aux_slow.value <= 0:
            return None
        return self.aux_fast.value / self.aux_slow.value - 1.0

    def _update_grad_norm(self, grad_norm: float | None) -> tuple[bool, bool]:
        if not is_finite_number(grad_norm) or grad_norm < 0:
            return False, False
        config = self.config.grad_norm
        ready = self.grad_slow.count >= config.min_samples
        jump = ready and grad_norm > config.jump_ratio * self.grad_slow.value
        self.grad_fast.update(grad_norm)
        self.grad_slow.update(grad_norm)
        if grad_norm == 0.0:
            return jump, False  # no level to compare in the log domain (and no LR moves a zero gradient)
        log_norm = math.log(grad_norm)
        self.grad_log_fast.update(log_norm)
        self.grad_log_slow.update(log_norm)
        collapse = (self.grad_log_slow.count >= config.min_samples and not jump
                    and self.grad_log_fast.value - self.grad_log_slow.value < math.log(config.collapse_ratio))
        return jump, collapse

    def _adapt_group(self, index: int, statistics: StepStatistics, instability: float) -> list[Event]:
        """Ask the group's rules; the blended step factor (rate-limited) moves the running gain, the blended level
        applies on top of it."""
        config, group = self.config, self.groups[index]
        step_proposals: list[Proposal] = []
        level_proposals: list[Proposal] = []
        for name, rule in self.group_rules[index].items():
            proposal = rule.propose(statistics)
            if proposal is None:
                continue
            proposal.rule = name  # what blend.weights and the events know it by, whatever the rule wrote
            if rule.kind == "level":
                level_proposals.append(proposal)
            else:
                step_proposals.append(proposal)
        max_change = config.moe.max_change_per_step if self.router_profile[index] else config.bounds.max_change_per_step
        step_factor = min(1.0 + max_change, max(1.0 - max_change, blend(step_proposals, config.blend, instability)))
        gain_min, gain_max = self.gain_bounds[index]
        old_gain = group.lr_gain
        group.running_gain = min(gain_max, max(gain_min, group.running_gain * step_factor))
        new_gain = group.running_gain * blend(level_proposals, config.blend, instability)
        group.lr_gain = min(gain_max, max(gain_min, new_gain)) if math.isfinite(new_gain) else group.lr_gain
        if config.momentum.rule != "none" and group.momentum is not None:
            group.momentum = next_momentum(group.momentum, statistics, config.momentum)
        return [Event(self.step, index, p.rule, p.action, old_gain, group.lr_gain, p.reason)
                for p in step_proposals + level_proposals if p.action]

    def _adapt_sigma(self, loss_step: LossStep | None, events: list[Event]) -> list[Event]:
        exploration = self.config.exploration
        if not exploration.enabled or loss_step is None or loss_step.closed_window is None:
            return []
        spiked = any(event.action == Decision.SPIKE_DECREASE.value for event in events) or not loss_step.finite
        decision = self.config.decision
        new_sigma, reason = next_sigma(self.sigma, loss_step.closed_window, spiked, decision.instability_threshold,
                                       decision.plateau_threshold, exploration)
        if reason is None or new_sigma == self.sigma:
            return []
        event = Event(self.step, -1, "exploration", "sigma", self.sigma, new_sigma, reason, quantity="sigma")
        self.sigma = new_sigma
        return [event]

    def rollback_brake(self, lasting_factor: float, recovery_factor: float, step: int, reason: str) -> list[Event]:
        """After a rollback: multiply every group's gain by `lasting_factor` (within its bounds); the events give
        the LR's new multiplier with the recovery's `recovery_factor` on top (the engine's `RollbackRecovery`)."""
        events = []
        for index, group in enumerate(self.groups):
            low, high = self.gain_bounds[index]
            new_gain = min(high, max(low, group.lr_gain * lasting_factor))
            events.append(Event(step, index, "rollback", "cut", group.lr_gain, new_gain * recovery_factor, reason))
            group.lr_gain = group.running_gain = new_gain
        return events

    # ----------------------------------------------------------------------------------- queries
    def lr_gain(self, index: int = 0) -> float:
        return self.groups[index].lr_gain

    def momentum(self, index: int = 0) -> float | None:
        """Momentum to write, or None when the rule is off or the group has no momentum."""
        if self.config.momentum.rule == "none":
            return None
        return self.groups[index].momentum

    def metrics(self) -> dict[str, float]:
        """Scalar statistics for loggers (group 0 for per-group values)."""
        values: dict[str, float] = {
            "lr_gain": self.groups[0].lr_gain,
            "loss_cv": self.loss.rolling_cv(),
            "nonfinite_losses": float(self.loss.nonfinite_count),
        }
        optional = {
            "loss_ema": self.loss.ema.value,
            "loss_slope": self.last_window.slope if self.last_window else None,
            "improvement_rate": self.last_window.improvement_rate if self.last_window else None,
            "grad_norm_ema": self.grad_slow.value,
            "router_aux_loss_ema": self.aux_fast.value,
            "reward_ema": self.reward.ema.value,
            "momentum": self.momentum(0),
            "sigma": self.sigma if self.config.exploration.enabled else None,
        }
        values.update({key: float(value) for key, value in optional.items() if value is not None})
        return values

    # ----------------------------------------------------------------------------- serialization
    def state_dict(self) -> dict[str, Any]:
        """Everything that evolves, as JSON-safe plain data."""
        return {
            "version": state_versions.CONTROLLER,
            "step": self.step,
            "window": self.window,
            "warmup_steps": self.warmup_steps,
            "sigma": self.sigma,
            "last_window": asdict(self.last_window) if self.last_window else None,
            "loss": self.loss.state_dict(),
            "reward": self.reward.state_dict(),
            "grad_fast": self.grad_fast.state_dict(),
            "grad_slow": self.grad_slow.state_dict(),
            "grad_log_fast": self.grad_log_fast.state_dict(),
            "grad_log_slow": self.grad_log_slow.state_dict(),
            "aux_fast": self.aux_fast.state_dict(),
            "aux_slow": self.aux_slow.state_dict(),
            "groups": [{**asdict(group), "rules": {name: rule.state_dict() for name, rule in rules.items()}}
                       for group, rules in zip(self.groups, self.group_rules, strict=True)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output, or a version-1 state; a rule the saved run did not run starts fresh."""
        version = state_versions.saved_version("controller", state, state_versions.CONTROLLER)
        if version < 1:
            raise ValueError(f"controller state without a version: expected {state_versions.CONTROLLER} (or 1)")
        if len(state["groups"]) != len(self.groups):
            raise ValueError(f"controller state has {len(state['groups'])} parameter groups, "
                             f"the optimizer has {len(self.groups)}")
        self.step = state["step"]
        self.window = state["window"]
        self.warmup_steps = state["warmup_steps"]
        self.sigma = state["sigma"]
        self.last_window = WindowSummary(**state["last_window"]) if state["last_window"] else None
        self.loss = LossStatistics(self.window, self.config.signals.ema_beta)
        self.loss.load_state_dict(state["loss"])
        self.reward = RewardStatistics(self.window, self.config.reward.ema_beta, self.config.reward.trend_window)
        self.reward.load_state_dict(state["reward"])
        self.grad_fast.load_state_dict(state["grad_fast"])
        self.grad_slow.load_state_dict(state["grad_slow"])
        if "grad_log_fast" in state:  # saved when the collapse test compared the plain EMAs: they start fresh
            self.grad_log_fast.load_state_dict(state["grad_log_fast"])
            self.grad_log_slow.load_state_dict(state["grad_log_slow"])
        if "aux_fast" in state:  # saved before the aux-loss rule existed: it starts fresh
            self.aux_fast.load_state_dict(state["aux_fast"])
            self.aux_slow.load_state_dict(state["aux_slow"])
        for group, rules, saved in zip(self.groups, self.group_rules, state["groups"], strict=True):
            for name in (spec.name for spec in fields(GroupState) if spec.name in saved):  # older states lack some
                setattr(group, name, saved[name])
            rule_states = saved["rules"] if version == state_versions.CONTROLLER else version_1_rule_states(saved)
            rule_states = {**rule_states_kept_in_the_group(saved), **rule_states}
            for name, rule in rules.items():
                if name in rule_states:
                    rule.load_state_dict(rule_states[name])
