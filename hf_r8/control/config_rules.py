"""The sections of `R8Config` that configure the control law's rules: how the per-step numbers become
statistics (`signals`), the windowed decision engine, the per-step LR rules, the reward rules of RL
fine-tuning and the momentum law.

Each section is a dataclass whose fields carry their help in ``field(metadata={"help": ...})`` (the
configuration reference is generated from it) and whose `_check` holds the section's range and
cross-field checks. The rules themselves live in rules.py and decision.py; this module only describes
and checks their knobs, and knows nothing of torch or transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from hf_r8.control.config_types import ValidatedConfig, reject

REWARD_RULES = ("scaling", "trend", "variance")
MOMENTUM_RULES = ("none", "inverse", "exp", "relative", "normalized", "reward")


@dataclass
class SignalConfig(ValidatedConfig):
    """How raw per-step numbers become statistics."""

    SECTION: ClassVar[str] = "signals"
    window: int | None = field(default=None, metadata={
        "help": "Steps per statistics window; None derives min(50, total_steps // 20), at least 5."})
    ema_beta: float = field(default=0.9, metadata={
        "help": "Smoothing of the loss EMA: ema = beta * ema + (1 - beta) * loss."})

    def _check(self) -> None:
        if self.window is not None and self.window < 2:
            reject(self.SECTION, "window", self.window, "an integer >= 2 or null")
        self._between("ema_beta", 0.0, 1.0, open_high=True)


@dataclass
class DecisionConfig(ValidatedConfig):
    """The windowed decision engine: INCREASE / DECREASE / HOLD / SPIKE_DECREASE."""

    SECTION: ClassVar[str] = "decision"
    increase_threshold: float = field(default=0.02, metadata={
        "help": "Window-over-window relative improvement above which the LR may grow."})
    plateau_threshold: float = field(default=0.001, metadata={
        "help": "Relative improvement below which a window counts as a plateau."})
    spike_threshold: float = field(default=1.2, metadata={
        "help": "Loss ratio (window mean over previous mean, or newest loss over EMA) that counts as a spike."})
    spike_z: float = field(default=3.0, metadata={
        "help": "A single-step spike also needs a z-score above this against the rolling window."})
    spike_steps: int = field(default=1, metadata={
        "help": "Losses in a row that must each be a single-step spike before the brake fires. 1 brakes on every "
                "outlying batch, which at an LR a few times too high is the first sign of it (bench/README.md); 2 "
                "waits for the next batch, on the weights after the outlier's update, where single batches spike "
                "for their labels (many mislabelled or rare examples), not for the LR."})
    spike_min_setback: float = field(default=0.25, metadata={
        "help": "A spike (single loss or window) must also give back at least this share of the progress made since "
                "the first loss; near zero, a loss that triples is one hard example, not a reason to brake."})
    significant_fall_t: float | None = field(default=3.0, metadata={
        "help": "Also INCREASE when the window's slope is this many standard errors below flat (a small but certain "
                "improvement: the LR is too low). None: only `increase_threshold` counts."})
    stability_threshold: float = field(default=0.3, metadata={
        "help": "Growth needs the window's coefficient of variation below this."})
    instability_threshold: float = field(default=0.5, metadata={
        "help": "A coefficient of variation above this forces a decrease."})
    increase_factor: float = field(default=1.1, metadata={"help": "LR gain multiplier on INCREASE."})
    decrease_factor: float = field(default=0.7, metadata={
        "help": "LR gain multiplier on DECREASE (plateau after patience, or instability)."})
    spike_factor: float = field(default=0.5, metadata={
        "help": "LR gain multiplier on SPIKE_DECREASE (the emergency brake)."})
    patience_windows: int = field(default=2, metadata={"help": "Plateau windows in a row before a DECREASE."})
    cooldown_steps: int = field(default=20, metadata={
        "help": "Steps after any adjustment during which window decisions HOLD."})
    spike_cooldown_steps: int = field(default=10, metadata={
        "help": "Steps after a brake before the next single-step brake may fire."})

    def _check(self) -> None:
        self._greater("increase_threshold", 0.0)
        self._greater("plateau_threshold", 0.0, inclusive=True)
        self._greater("spike_threshold", 1.0)
        self._greater("spike_z", 0.0)
        self._positive_int("spike_steps")
        self._between("spike_min_setback", 0.0, 1.0)
        if self.significant_fall_t is not None:
            self._greater("significant_fall_t", 0.0)
        self._greater("stability_threshold", 0.0)
        threshold = self.instability_threshold
        if not (math.isfinite(threshold) and threshold > self.stability_threshold):
            reject(self.SECTION, "instability_threshold", self.instability_threshold,
                   f"> stability_threshold ({self.stability_threshold})")
        self._greater("increase_factor", 1.0)
        self._between("decrease_factor", 0.0, 1.0, open_low=True, open_high=True)
        self._between("spike_factor", 0.0, 1.0, open_low=True, open_high=True)
        self._positive_int("patience_windows")
        self._non_negative_int("cooldown_steps")
        self._non_negative_int("spike_cooldown_steps")


@dataclass
class TrendConfig(ValidatedConfig):
    """Per-step trend rule: gain x up_factor while the loss EMA improves, x down_factor otherwise."""

    SECTION: ClassVar[str] = "trend"
    up_factor: float = field(default=1.02, metadata={
        "help": "Multiplier u > 1 when the loss EMA improved by more than min_rel_improve."})
    down_factor: float = field(default=0.98, metadata={"help": "Multiplier d < 1 otherwise."})
    min_rel_improve: float = field(default=1e-4, metadata={"help": "Relative EMA improvement that counts as progress."})

    def _check(self) -> None:
        self._greater("up_factor", 1.0)
        self._between("down_factor", 0.0, 1.0, open_low=True, open_high=True)
        self._greater("min_rel_improve", 0.0, inclusive=True)


@dataclass
class VarianceConfig(ValidatedConfig):
    """Variance damping: level = 1 / (base + scale * cv^2) of the rolling window."""

    SECTION: ClassVar[str] = "variance"
    base: float = field(default=1.0, metadata={
        "help": "Denominator floor; 1 means no damping on a perfectly smooth loss."})
    scale: float = field(default=4.0, metadata={"help": "Lambda: how hard relative variance (cv^2) damps the LR."})

    def _check(self) -> None:
        self._greater("base", 0.0)
        self._greater("scale", 0.0, inclusive=True)


@dataclass
class LossDecayConfig(ValidatedConfig):
    """Loss decay: level = 1 / (1 + k * loss_ema)."""

    SECTION: ClassVar[str] = "loss_decay"
    k: float = field(default=0.1, metadata={"help": "How strongly a high loss lowers the LR."})

    def _check(self) -> None:
        self._greater("k", 0.0, inclusive=True)


@dataclass
class GradNormConfig(ValidatedConfig):
    """Gradient-norm rule: shrink when the norm jumps, grow when its level collapses."""

    SECTION: ClassVar[str] = "grad_norm"
    fast_beta: float = field(default=0.5, metadata={
        "help": "EMA smoothing of the fast geometric mean of the grad norm (an EMA of its log), for collapses."})
    slow_beta: float = field(default=0.95, metadata={
        "help": "EMA smoothing of the slow grad-norm averages: the plain one a jump is measured against, and the "
                "geometric one a collapse is."})
    jump_ratio: float = field(default=2.5, metadata={"help": "Newest norm above jump_ratio x slow EMA: a jump."})
    jump_steps: int = field(default=1, metadata={
        "help": "Jumps in a row before the rule shrinks. 1 shrinks on every outlying batch (confirm_steps then decides "
                "whether the shrink stays); 2 waits for the next batch's norm, on the weights after the outlier's "
                "update: measured with every shrink kept, it removed a good LR's ratchet and a too-high LR's "
                "correction with it (bench/README.md)."})
    confirm_steps: int = field(default=30, metadata={
        "help": "0 keeps every shrink. n > 0: a shrink is provisional, kept when another jump follows within n steps "
                "and undone when none does: one outlying batch says nothing of the LR, jumps that recur do. 30 is "
                "three of the rule's cooldowns; on digits at its best LR outlying batches came 39-108 steps apart, "
                "at 3-10x above it most within 30 (bench/README.md). The shrink and its undo are exact (not blended "
                "with other rules), so an undo gives back what the shrink took."})
    collapse_ratio: float = field(default=0.3, metadata={
        "help": "Fast geometric mean below collapse_ratio x the slow one: a collapse. Geometric means, so a jump "
                "does not lift the reference far above the typical batch (bench/README.md)."})
    collapse_steps: int = field(default=3, metadata={
        "help": "Collapses in a row before the rule grows: a level held for several batches, not a few small ones."})
    shrink_factor: float = field(default=0.8, metadata={"help": "Gain multiplier on a jump."})
    grow_factor: float = field(default=1.1, metadata={"help": "Gain multiplier on a collapse."})
    cooldown_steps: int = field(default=10, metadata={"help": "Steps between two firings of this rule."})
    min_samples: int = field(default=10, metadata={"help": "Finite norms needed before the rule may fire."})

    def _check(self) -> None:
        self._between("fast_beta", 0.0, 1.0, open_high=True)
        self._between("slow_beta", 0.0, 1.0, open_high=True)
        self._greater("jump_ratio", 1.0)
        self._positive_int("jump_steps")
        self._non_negative_int("confirm_steps")
        self._between("collapse_ratio", 0.0, 1.0, open_low=True, open_high=True)
        self._positive_int("collapse_steps")
        self._between("shrink_factor", 0.0, 1.0, open_low=True, open_high=True)
        self._greater("grow_factor", 1.0)
        self._non_negative_int("cooldown_steps")
        self._positive_int("min_samples")


@dataclass
class HypergradientConfig(ValidatedConfig):
    """Hypergradient rule: the gain follows the sign of d loss / d LR, read from how each step's gradient lines
    up with the update before it (both ways, in small steps, only while a window of steps agrees)."""

    SECTION: ClassVar[str] = "hypergradient"
    window: int = field(default=20, metadata={
        "help": "Steps of alignment (cosine of the gradient with the last update) each test reads."})
    significance: float = field(default=3.0, metadata={
        "help": "Standard errors the window's mean alignment must lie above (below) zero before the gain grows "
                "(shrinks)."})
    rate: float = field(default=0.02, metadata={
        "help": "Relative change of the gain per step while the alignment is significant: x (1 + rate) or "
                "/ (1 + rate)."})

    def _check(self) -> None:
        if self.window < 3:
            reject(self.SECTION, "window", self.window, "an integer >= 3")
        self._greater("significance", 0.0)
        self._between("rate", 0.0, 1.0, open_low=True)


@dataclass
class CyclicalConfig(ValidatedConfig):
    """Cosine warm restarts overlay: level falls from 1 to eta_min_scale over T_i steps, then restarts."""

    SECTION: ClassVar[str] = "cyclical"
    T0: int = field(default=200, metadata={"help": "Length of the first cycle in steps."})
    T_mult: int = field(default=2, metadata={"help": "Each cycle is T_mult times longer than the previous."})
    eta_min_scale: float = field(default=0.1, metadata={"help": "Level at the bottom of a cycle."})

    def _check(self) -> None:
        self._positive_int("T0")
        self._positive_int("T_mult")
        self._between("eta_min_scale", 0.0, 1.0, open_high=True)


@dataclass
class PlateauConfig(ValidatedConfig):
    """Patience/cooldown big drop: no new best loss EMA for `patience` steps -> gain x big_drop."""

    SECTION: ClassVar[str] = "plateau"
    patience: int = field(default=100, metadata={"help": "Steps without a new best loss EMA before the drop."})
    big_drop: float = field(default=0.5, metadata={"help": "Gain multiplier of the drop."})
    cooldown: int = field(default=50, metadata={"help": "Steps after a drop during which no new drop is counted."})
    min_rel_improve: float = field(default=1e-3, metadata={
        "help": "Relative improvement over the best EMA that counts as a new best."})

    def _check(self) -> None:
        self._positive_int("patience")
        self._between("big_drop", 0.0, 1.0, open_low=True, open_high=True)
        self._non_negative_int("cooldown")
        self._greater("min_rel_improve", 0.0, inclusive=True)


@dataclass
class RewardConfig(ValidatedConfig):
    """Reward-driven LR rules for RL fine-tuning (reward replaces or joins the loss)."""

    SECTION: ClassVar[str] = "reward"
    rules: list[str] = field(default_factory=list, metadata={
        "help": "Active reward rules, any of: scaling, trend, variance."})
    ema_beta: float = field(default=0.9, metadata={"help": "Smoothing of the reward EMA."})
    center: float = field(default=0.0, metadata={"help": "Reward at which `scaling` leaves the LR at 1x."})
    span: float = field(default=1.0, metadata={
        "help": "center - span maps to ~0x, center + span to ~2x the LR (scaling)."})
    up_factor: float = field(default=1.03, metadata={
        "help": "`trend`: gain multiplier per step while the reward rises significantly."})
    down_factor: float = field(default=0.9, metadata={
        "help": "`trend`: gain multiplier per step while it falls significantly."})
    trend_t: float = field(default=2.0, metadata={
        "help": "`trend` (and the `reward` momentum rule): the least-squares slope of the last `trend_window` "
                "rewards must be this many standard errors away from flat; in between, the gain holds. A noisy flat "
                'reward then moves nothing (a per-step "did the EMA rise" test is a coin flip there).'})
    trend_window: int = field(default=16, metadata={
        "help": "Rewards in the trend test (it starts once half of them are in)."})
    kl_limit: float | None = field(default=None, metadata={
        "help": "KL to the reference model (as TRL logs it: `kl`, PPO's `objective/kl`) above "
                "which every step multiplies the gain by `down_factor` and the reward trend may "
                "not raise it; None: KL is not watched."})
    variance_scale: float = field(default=1.0, metadata={
        "help": "`variance`: level = 1 / (1 + variance_scale * var(reward) / span^2)."})

    def _check(self) -> None:
        unknown = [rule for rule in self.rules if rule not in REWARD_RULES]
        if unknown or len(set(self.rules)) != len(self.rules):
            reject(self.SECTION, "rules", self.rules, f"a list of distinct names from {list(REWARD_RULES)}")
        self._between("ema_beta", 0.0, 1.0, open_high=True)
        self._between("center", -math.inf, math.inf, open_low=True, open_high=True)
        self._greater("span", 0.0)
        self._greater("up_factor", 1.0)
        self._between("down_factor", 0.0, 1.0, open_low=True, open_high=True)
        self._greater("trend_t", 0.0)
        if self.kl_limit is not None:
            self._greater("kl_limit", 0.0)
        self._positive_int("trend_window")
        if self.trend_window < 4:
            reject(self.SECTION, "trend_window", self.trend_window, "an integer >= 4")
        self._greater("variance_scale", 0.0, inclusive=True)


@dataclass
class MomentumConfig(ValidatedConfig):
    """Momentum law, written to `momentum` (SGD-like) or `betas[0]` (Adam-like)."""

    SECTION: ClassVar[str] = "momentum"
    rule: str = field(default="none", metadata={"help": "One of: none, inverse, exp, relative, normalized, reward."})
    loss_scale: float = field(default=1.0, metadata={
        "help": "`inverse`: mu = 1 - 1/(1 + a*loss); `exp`: mu = 1 - exp(-a*loss); this is a."})
    relative_gain: float = field(default=1.0, metadata={
        "help": "`relative`: mu *= 1 + relative_gain * window improvement rate."})
    cv_reference: float = field(default=0.5, metadata={
        "help": "`normalized`: mu = max - (max - min) * min(1, cv / cv_reference)."})
    reward_up: float = field(default=0.01, metadata={
        "help": "`reward`: mu += reward_up while the reward rises significantly (see `reward.trend_t`)."})
    reward_down: float = field(default=0.99, metadata={
        "help": "`reward`: mu *= reward_down while it falls significantly."})
    min: float = field(default=0.0, metadata={"help": "Lowest momentum ever written."})
    max: float = field(default=0.999, metadata={"help": "Highest momentum ever written."})

    def _check(self) -> None:
        if self.rule not in MOMENTUM_RULES:
            reject(self.SECTION, "rule", self.rule, f"one of {list(MOMENTUM_RULES)}")
        self._greater("loss_scale", 0.0)
        self._greater("relative_gain", 0.0, inclusive=True)
        self._greater("cv_reference", 0.0)
        self._between("reward_up", 0.0, 1.0)
        self._between("reward_down", 0.0, 1.0, open_low=True)
        self._between("min", 0.0, 1.0, open_high=True)
        self._between("max", 0.0, 1.0, open_high=True)
        if self.max < self.min:
            reject(self.SECTION, "max", self.max, f">= momentum.min ({self.min})")
