"""The sections of `R8Config` that turn the rules' proposals into one LR gain and keep it in bounds:
how active rules are weighed (`blend`), the absolute bounds and per-step rate limit (`bounds`), and the
gentler profile of mixture-of-experts router groups (`moe`).

Fields carry their help in ``field(metadata={"help": ...})``; `_check` holds each section's range and
cross-field checks. Nothing here knows torch or transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from hf_r8.control.config_types import ValidatedConfig, reject


@dataclass
class BlendConfig(ValidatedConfig):
    """How several active rules combine: sum of weighted log-factors."""

    SECTION: ClassVar[str] = "blend"
    weights: dict[str, float] = field(default_factory=dict, metadata={
        "help": "Per-rule weight (rule name, reward rules as reward_<name> -> weight >= 0); missing rules weigh 1."})
    stability_shift: float = field(default=0.5, metadata={
        "help": "0: fixed weights. s > 0: damping rules weigh up to (1+s) when unstable, "
                "growth rules (1+s) when stable."})

    def _check(self) -> None:
        # The names are resolved in the rule registry when an adapter takes the config (`resolve.py`).
        for name, weight in self.weights.items():
            if not (isinstance(name, str) and name):
                reject(self.SECTION, "weights", name, "a rule name")
            if not (math.isfinite(weight) and weight >= 0):
                reject(self.SECTION, f"weights.{name}", weight, ">= 0")
        self._between("stability_shift", 0.0, 1.0)


@dataclass
class BoundsConfig(ValidatedConfig):
    """Absolute safety bounds and the per-step rate limit."""

    SECTION: ClassVar[str] = "bounds"
    lr_min: float | None = field(default=None, metadata={
        "help": "Floor of the controller's LR; None derives base_lr / 100."})
    lr_max: float | None = field(default=None, metadata={"help": "Ceiling of the LR; None derives base_lr * 20."})
    max_change_per_step: float = field(default=0.5, metadata={
        "help": "The gain never moves by more than this fraction in one step (0.5: within x0.5..x1.5)."})

    def _check(self) -> None:
        for name in ("lr_min", "lr_max"):
            if getattr(self, name) is not None:
                self._greater(name, 0.0)
        if self.lr_min is not None and self.lr_max is not None and self.lr_max <= self.lr_min:
            reject(self.SECTION, "lr_max", self.lr_max, f"> bounds.lr_min ({self.lr_min})")
        self._between("max_change_per_step", 0.0, 1.0, open_low=True, open_high=True)


@dataclass
class MoEConfig(ValidatedConfig):
    """Gentler control of router/gate parameter groups (or of every group when no router group exists)."""

    SECTION: ClassVar[str] = "moe"
    enabled: bool = field(default=False, metadata={"help": "Apply the MoE profile."})
    router_patterns: list[str] = field(default_factory=lambda: ["router", "gate", "shared_expert_gate"], metadata={
        "help": "Module names of routers: a parameter whose path has a segment equal to one of these "
                "is a router parameter (`mlp.gate.weight`, not `gate_proj`); a group of router "
                "parameters only is a router group."})
    gain_min: float = field(default=0.1, metadata={"help": "Lowest LR gain of a router group."})
    gain_max: float = field(default=2.0, metadata={"help": "Highest LR gain of a router group."})
    increase_factor: float = field(default=1.05, metadata={
        "help": "Replaces decision.increase_factor (and caps every growth factor) for router groups."})
    decrease_factor: float = field(default=0.85, metadata={
        "help": "Replaces decision.decrease_factor (and floors every damping factor) for router groups."})
    max_change_per_step: float = field(default=0.15, metadata={"help": "Rate limit for router groups."})
    aux_loss_rise: float | None = field(default=0.05, metadata={
        "help": "Router load-balancing loss (`aux_loss`, returned with `output_router_logits=True`): when its fast "
                "EMA exceeds its slow EMA by this fraction (routing getting less balanced), router groups' gain is "
                "multiplied by `decrease_factor`; None turns the rule off."})
    aux_loss_fast_beta: float = field(default=0.8, metadata={"help": "Smoothing of the aux loss's fast EMA."})
    aux_loss_slow_beta: float = field(default=0.98, metadata={
        "help": "Smoothing of its slow EMA (the reference level)."})
    aux_loss_cooldown_steps: int = field(default=10, metadata={
        "help": "Steps between two aux-loss damping decisions; the rule also waits for this many aux losses."})

    def _check(self) -> None:
        if not self.router_patterns or not all(self.router_patterns):
            reject(self.SECTION, "router_patterns", self.router_patterns, "a non-empty list of non-empty strings")
        self._between("gain_min", 0.0, 1.0, open_low=True)
        self._greater("gain_max", 1.0, inclusive=True)
        self._greater("increase_factor", 1.0)
        self._between("decrease_factor", 0.0, 1.0, open_low=True, open_high=True)
        self._between("max_change_per_step", 0.0, 1.0, open_low=True, open_high=True)
        if self.aux_loss_rise is not None:
            self._greater("aux_loss_rise", 0.0)
        self._between("aux_loss_fast_beta", 0.0, 1.0, open_high=True)
        self._between("aux_loss_slow_beta", 0.0, 1.0, open_high=True)
        if self.aux_loss_fast_beta >= self.aux_loss_slow_beta:
            reject(self.SECTION, "aux_loss_fast_beta", self.aux_loss_fast_beta,
                   f"< moe.aux_loss_slow_beta={self.aux_loss_slow_beta}")
        self._positive_int("aux_loss_cooldown_steps")
