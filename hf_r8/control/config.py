"""`R8Config`: every knob of hf_r8 as a tree of dataclasses, validated at construction.

Each section is a small dataclass whose fields carry a one-line docstring (the comment under
the field). A bad value raises ``ValueError`` naming the field, the value and the allowed range
as soon as the section is built, so a typo in a YAML preset fails before training starts; a value
of the wrong type (``"false"`` for a bool, a bare string for a list) raises ``TypeError`` in the same
shape. What YAML and numpy hand over for a type (``"1e-5"``, ``np.int64(3)``, ``np.bool_``) is
accepted and stored as the plain Python value, so ``to_dict()`` stays YAML/JSON safe.
Presets live in ``configs/*.yaml`` (shipped inside the package as ``hf_r8/configs``).

This module knows nothing of torch or transformers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import numpy as np
import yaml

PRESETS_DIR = Path(__file__).parent.parent / "configs"

LR_RULES = ("decision", "trend", "variance", "loss_decay", "grad_norm", "cyclical", "plateau")
REWARD_RULES = ("scaling", "trend", "variance")
BLENDABLE_RULES = LR_RULES + tuple(f"reward_{rule}" for rule in REWARD_RULES)
SAMPLER_MODES = ("balanced", "infobatch", "uniform")
SNAPSHOT_SCOPES = ("trainable", "all")
DITHER_SHAPINGS = ("rms", "magnitude")
MOMENTUM_RULES = ("none", "inverse", "exp", "relative", "normalized", "reward")


def _problem(section: str, name: str, value: Any, allowed: str) -> str:
    """The one error shape, `section.field=value: must be ...` (top-level fields have no section)."""
    return f"{section + '.' if section else ''}{name}={value!r}: must be {allowed}"


def _fail(section: str, name: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(_problem(section, name, value, allowed))


def _as_bool(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError  # "false", 0, None: YAML and Python both have real booleans
    return bool(value)


def _as_int(value: Any) -> int:
    """Python or numpy integers, or a string `int()` reads exactly ("3", not "3.5"); never a bool."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
        raise TypeError
    return int(value)


def _as_float(value: Any) -> float:
    """Any real number (numpy's too), or a string `float()` reads ("1e-5": PyYAML's reading); never a bool.

    Plain ints stay ints (the user's `0` reads back as `0`); the range checks reject non-finite values.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise TypeError
    return value if type(value) in (int, float) else float(value)


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    """A converter for lists (or tuples) of `item`: a bare string is not a list of one."""
    def convert(value: Any) -> list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [item(element) for element in value]
    return convert


def _as_weights(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise TypeError
    return {key: _as_float(weight) for key, weight in value.items()}


# Field annotation (without " | None") -> (converter, what the error says is expected). Fields of other
# types (names checked against a list of choices, sections) are checked by their owner.
_CONVERTERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "bool": (_as_bool, "a boolean"),
    "int": (_as_int, "an integer"),
    "float": (_as_float, "a number"),
    "list[str]": (_list_of(_as_str), "a list of strings"),
    "list[float]": (_list_of(_as_float), "a list of numbers"),
    "dict[str, float]": (_as_weights, "a mapping of names to numbers"),
}


def _convert_fields(config: Any, section: str) -> None:
    """Store every field of the dataclass `config` as the plain Python type its annotation names.

    Runs before the range checks, so those compare numbers only; a value that is not of its field's
    type raises ``TypeError`` ("must be a number"), not a misleading range.
    """
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        optional = spec.type.endswith(" | None")
        converter = _CONVERTERS.get(spec.type.removesuffix(" | None"))
        if converter is None or (optional and value is None):
            continue
        convert, expected = converter
        try:
            setattr(config, spec.name, convert(value))
        except (TypeError, ValueError):
            expected += " or null" if optional else ""
            raise TypeError(_problem(section, spec.name, value, expected)) from None


class _Section:
    """Shared validation: converts every field to its type, then runs the section's `_validate`.

    `SECTION` is the name used in error messages.
    """

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _convert_fields(self, self.SECTION)
        self._validate()

    def _validate(self) -> None:
        """Range and cross-field checks of the section (its fields already have their types)."""

    def _greater(self, name: str, bound: float, *, inclusive: bool = False) -> None:
        value = getattr(self, name)
        if not (math.isfinite(value) and (value >= bound if inclusive else value > bound)):
            _fail(self.SECTION, name, value, f"{'>=' if inclusive else '>'} {bound}")

    def _between(self, name: str, low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> None:
        value = getattr(self, name)
        ok = math.isfinite(value)
        ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
        if not ok:
            interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            _fail(self.SECTION, name, value, f"in {interval}")

    def _positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if value < 1:
            _fail(self.SECTION, name, value, "an integer >= 1")

    def _non_negative_int(self, name: str) -> None:
        value = getattr(self, name)
        if value < 0:
            _fail(self.SECTION, name, value, "an integer >= 0")


@dataclass
class SignalConfig(_Section):
    """How raw per-step numbers become statistics."""

    SECTION: ClassVar[str] = "signals"
    window: int | None = None
    """Steps per statistics window; None derives min(50, total_steps // 20), at least 5."""
    ema_beta: float = 0.9
    """Smoothing of the loss EMA: ema = beta * ema + (1 - beta) * loss."""

    def _validate(self) -> None:
        if self.window is not None and self.window < 2:
            _fail(self.SECTION, "window", self.window, "an integer >= 2 or null")
        self._between("ema_beta", 0.0, 1.0, open_high=True)


@dataclass
class DecisionConfig(_Section):
    """The windowed decision engine: INCREASE / DECREASE / HOLD / SPIKE_DECREASE."""

    SECTION: ClassVar[str] = "decision"
    increase_threshold: float = 0.02
    """Window-over-window relative improvement above which the LR may grow."""
    plateau_threshold: float = 0.001
    """Relative improvement below which a window counts as a plateau."""
    spike_threshold: float = 1.2
    """Loss ratio (window mean over previous mean, or newest loss over EMA) that counts as a spike."""
    spike_z: float = 3.0
    """A single-step spike also needs a z-score above this against the rolling window."""
    spike_min_setback: float = 0.25
    """A spike (single loss or window) must also give back at least this share of the progress made since the
    first loss; near zero, a loss that triples is one hard example, not a reason to brake."""
    significant_fall_t: float | None = 3.0
    """Also INCREASE when the window's slope is this many standard errors below flat (a small but certain
    improvement: the LR is too low). None: only `increase_threshold` counts."""
    stability_threshold: float = 0.3
    """Growth needs the window's coefficient of variation below this."""
    instability_threshold: float = 0.5
    """A coefficient of variation above this forces a decrease."""
    increase_factor: float = 1.1
    """LR gain multiplier on INCREASE."""
    decrease_factor: float = 0.7
    """LR gain multiplier on DECREASE (plateau after patience, or instability)."""
    spike_factor: float = 0.5
    """LR gain multiplier on SPIKE_DECREASE (the emergency brake)."""
    patience_windows: int = 2
    """Plateau windows in a row before a DECREASE."""
    cooldown_steps: int = 20
    """Steps after any adjustment during which window decisions HOLD."""
    spike_cooldown_steps: int = 10
    """Steps after a brake before the next single-step brake may fire."""

    def _validate(self) -> None:
        self._greater("increase_threshold", 0.0)
        self._greater("plateau_threshold", 0.0, inclusive=True)
        self._greater("spike_threshold", 1.0)
        self._greater("spike_z", 0.0)
        self._between("spike_min_setback", 0.0, 1.0)
        if self.significant_fall_t is not None:
            self._greater("significant_fall_t", 0.0)
        self._greater("stability_threshold", 0.0)
        threshold = self.instability_threshold
        if not (math.isfinite(threshold) and threshold > self.stability_threshold):
            _fail(self.SECTION, "instability_threshold", self.instability_threshold,
                  f"> stability_threshold ({self.stability_threshold})")
        self._greater("increase_factor", 1.0)
        self._between("decrease_factor", 0.0, 1.0, open_low=True, open_high=True)
        self._between("spike_factor", 0.0, 1.0, open_low=True, open_high=True)
        self._positive_int("patience_windows")
        self._non_negative_int("cooldown_steps")
        self._non_negative_int("spike_cooldown_steps")


@dataclass
class TrendConfig(_Section):
    """Per-step trend rule: gain x up_factor while the loss EMA improves, x down_factor otherwise."""

    SECTION: ClassVar[str] = "trend"
    up_factor: float = 1.02
    """Multiplier u > 1 when the loss EMA improved by more than min_rel_improve."""
    down_factor: float = 0.98
    """Multiplier d < 1 otherwise."""
    min_rel_improve: float = 1e-4
    """Relative EMA improvement that counts as progress."""

    def _validate(self) -> None:
        self._greater("up_factor", 1.0)
        self._between("down_factor", 0.0, 1.0, open_low=True, open_high=True)
        self._greater("min_rel_improve", 0.0, inclusive=True)


@dataclass
class VarianceConfig(_Section):
    """Variance damping: level = 1 / (base + scale * cv^2) of the rolling window."""

    SECTION: ClassVar[str] = "variance"
    base: float = 1.0
    """Denominator floor; 1 means no damping on a perfectly smooth loss."""
    scale: float = 4.0
    """Lambda: how hard relative variance (cv^2) damps the LR."""

    def _validate(self) -> None:
        self._greater("base", 0.0)
        self._greater("scale", 0.0, inclusive=True)


@dataclass
class LossDecayConfig(_Section):
    """Loss decay: level = 1 / (1 + k * loss_ema)."""

    SECTION: ClassVar[str] = "loss_decay"
    k: float = 0.1
    """How strongly a high loss lowers the LR."""

    def _validate(self) -> None:
        self._greater("k", 0.0, inclusive=True)


@dataclass
class GradNormConfig(_Section):
    """Gradient-norm rule: shrink when the norm jumps, grow when its EMA collapses."""

    SECTION: ClassVar[str] = "grad_norm"
    fast_beta: float = 0.5
    """EMA smoothing of the fast grad-norm average."""
    slow_beta: float = 0.95
    """EMA smoothing of the slow (reference) grad-norm average."""
    jump_ratio: float = 2.5
    """Newest norm above jump_ratio x slow EMA: shrink."""
    collapse_ratio: float = 0.3
    """Fast EMA below collapse_ratio x slow EMA: grow."""
    shrink_factor: float = 0.8
    """Gain multiplier on a jump."""
    grow_factor: float = 1.1
    """Gain multiplier on a collapse."""
    cooldown_steps: int = 10
    """Steps between two firings of this rule."""
    min_samples: int = 10
    """Finite norms needed before the rule may fire."""

    def _validate(self) -> None:
        self._between("fast_beta", 0.0, 1.0, open_high=True)
        self._between("slow_beta", 0.0, 1.0, open_high=True)
        self._greater("jump_ratio", 1.0)
        self._between("collapse_ratio", 0.0, 1.0, open_low=True, open_high=True)
        self._between("shrink_factor", 0.0, 1.0, open_low=True, open_high=True)
        self._greater("grow_factor", 1.0)
        self._non_negative_int("cooldown_steps")
        self._positive_int("min_samples")


@dataclass
class CyclicalConfig(_Section):
    """Cosine warm restarts overlay: level falls from 1 to eta_min_scale over T_i steps, then restarts."""

    SECTION: ClassVar[str] = "cyclical"
    T0: int = 200
    """Length of the first cycle in steps."""
    T_mult: int = 2
    """Each cycle is T_mult times longer than the previous."""
    eta_min_scale: float = 0.1
    """Level at the bottom of a cycle."""

    def _validate(self) -> None:
        self._positive_int("T0")
        self._positive_int("T_mult")
        self._between("eta_min_scale", 0.0, 1.0, open_high=True)


@dataclass
class PlateauConfig(_Section):
    """Patience/cooldown big drop: no new best loss EMA for `patience` steps -> gain x big_drop."""

    SECTION: ClassVar[str] = "plateau"
    patience: int = 100
    """Steps without a new best loss EMA before the drop."""
    big_drop: float = 0.5
    """Gain multiplier of the drop."""
    cooldown: int = 50
    """Steps after a drop during which no new drop is counted."""
    min_rel_improve: float = 1e-3
    """Relative improvement over the best EMA that counts as a new best."""

    def _validate(self) -> None:
        self._positive_int("patience")
        self._between("big_drop", 0.0, 1.0, open_low=True, open_high=True)
        self._non_negative_int("cooldown")
        self._greater("min_rel_improve", 0.0, inclusive=True)


@dataclass
class RewardConfig(_Section):
    """Reward-driven LR rules for RL fine-tuning (reward replaces or joins the loss)."""

    SECTION: ClassVar[str] = "reward"
    rules: list[str] = field(default_factory=list)
    """Active reward rules, any of: scaling, trend, variance."""
    ema_beta: float = 0.9
    """Smoothing of the reward EMA."""
    center: float = 0.0
    """Reward at which `scaling` leaves the LR at 1x."""
    span: float = 1.0
    """center - span maps to ~0x, center + span to ~2x the LR (scaling)."""
    up_factor: float = 1.03
    """`trend`: gain multiplier per step while the reward rises significantly."""
    down_factor: float = 0.9
    """`trend`: gain multiplier per step while it falls significantly."""
    trend_t: float = 2.0
    """`trend` (and the `reward` momentum rule): the least-squares slope of the last `trend_window`
    rewards must be this many standard errors away from flat; in between, the gain holds. A noisy
    flat reward then moves nothing (a per-step "did the EMA rise" test is a coin flip there)."""
    trend_window: int = 16
    """Rewards in the trend test (it starts once half of them are in)."""
    kl_limit: float | None = None
    """KL to the reference model (as TRL logs it: `kl`, PPO's `objective/kl`) above which every step
    multiplies the gain by `down_factor` and the reward trend may not raise it; None: KL is not watched."""
    variance_scale: float = 1.0
    """`variance`: level = 1 / (1 + variance_scale * var(reward) / span^2)."""

    def _validate(self) -> None:
        unknown = [rule for rule in self.rules if rule not in REWARD_RULES]
        if unknown or len(set(self.rules)) != len(self.rules):
            _fail(self.SECTION, "rules", self.rules, f"a list of distinct names from {list(REWARD_RULES)}")
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
            _fail(self.SECTION, "trend_window", self.trend_window, "an integer >= 4")
        self._greater("variance_scale", 0.0, inclusive=True)


@dataclass
class MomentumConfig(_Section):
    """Momentum law, written to `momentum` (SGD-like) or `betas[0]` (Adam-like)."""

    SECTION: ClassVar[str] = "momentum"
    rule: str = "none"
    """One of: none, inverse, exp, relative, normalized, reward."""
    loss_scale: float = 1.0
    """`inverse`: mu = 1 - 1/(1 + a*loss); `exp`: mu = 1 - exp(-a*loss); this is a."""
    relative_gain: float = 1.0
    """`relative`: mu *= 1 + relative_gain * window improvement rate."""
    cv_reference: float = 0.5
    """`normalized`: mu = max - (max - min) * min(1, cv / cv_reference)."""
    reward_up: float = 0.01
    """`reward`: mu += reward_up while the reward rises significantly (see `reward.trend_t`)."""
    reward_down: float = 0.99
    """`reward`: mu *= reward_down while it falls significantly."""
    min: float = 0.0
    """Lowest momentum ever written."""
    max: float = 0.999
    """Highest momentum ever written."""

    def _validate(self) -> None:
        if self.rule not in MOMENTUM_RULES:
            _fail(self.SECTION, "rule", self.rule, f"one of {list(MOMENTUM_RULES)}")
        self._greater("loss_scale", 0.0)
        self._greater("relative_gain", 0.0, inclusive=True)
        self._greater("cv_reference", 0.0)
        self._between("reward_up", 0.0, 1.0)
        self._between("reward_down", 0.0, 1.0, open_low=True)
        self._between("min", 0.0, 1.0, open_high=True)
        self._between("max", 0.0, 1.0, open_high=True)
        if self.max < self.min:
            _fail(self.SECTION, "max", self.max, f">= momentum.min ({self.min})")


@dataclass
class ExplorationConfig(_Section):
    """Exploration dither: its strength sigma is raised on plateaus and cut on instability (see dither.py)."""

    SECTION: ClassVar[str] = "exploration"
    enabled: bool = False
    """Run the sigma law and add its dither to the trainable parameters after each optimizer step (past
    warmup, never on a skipped step): sigma * D(theta) * standard normal noise."""
    shaping: str = "rms"
    """D(theta): `rms` (each tensor's root-mean-square: noise relative to the tensor's scale) or `magnitude`
    (each element's absolute value: zeros stay zero)."""
    seed: int = 0
    """Noise seed; with the step number it makes the same noise on every process (parameters stay equal)."""
    sigma_init: float = 1e-3
    """Starting sigma."""
    sigma_min: float = 1e-5
    """Lowest sigma."""
    sigma_max: float = 1e-2
    """Highest sigma."""
    raise_factor: float = 1.5
    """Multiplier on a plateau window."""
    cut_factor: float = 0.5
    """Multiplier on an unstable window or a spike."""

    def _validate(self) -> None:
        self._greater("sigma_min", 0.0, inclusive=True)
        self._greater("sigma_max", self.sigma_min)
        self._between("sigma_init", self.sigma_min, self.sigma_max)
        self._greater("raise_factor", 1.0)
        self._between("cut_factor", 0.0, 1.0, open_low=True, open_high=True)
        if self.shaping not in DITHER_SHAPINGS:
            _fail(self.SECTION, "shaping", self.shaping, f"one of {list(DITHER_SHAPINGS)}")
        self._non_negative_int("seed")


@dataclass
class FreezingConfig(_Section):
    """Reversible freezing of parameter tensors whose gradients went quiet."""

    SECTION: ClassVar[str] = "freezing"
    enabled: bool = False
    """Freeze quiet tensors (no gradient computed, no optimizer update) and unfreeze revived ones."""
    check_every: int = 10
    """Steps between reads of the per-tensor gradient norms (one host read each time)."""
    ema_beta: float = 0.7
    """Smoothing of each tensor's gradient-norm EMA, updated at every check."""
    threshold: float = 0.01
    """A tensor is quiet while its gradient-norm EMA is below this fraction of the median EMA of the
    unfrozen tensors."""
    patience_steps: int = 50
    """Steps a tensor must stay quiet before it is frozen."""
    probe_every: int = 100
    """Steps between probes: frozen tensors get a gradient for one step (not applied) to see if it revived.
    A multiple of check_every."""
    revive_threshold: float = 0.05
    """A probed tensor whose gradient norm exceeds this fraction of the median EMA is unfrozen (above
    `threshold`: a tensor near the line does not flip at every probe)."""
    max_frozen_fraction: float = 0.9
    """Never freeze more than this fraction of the trainable parameters (by element count)."""

    def _validate(self) -> None:
        self._positive_int("check_every")
        self._between("ema_beta", 0.0, 1.0, open_high=True)
        self._between("threshold", 0.0, 1.0, open_low=True)
        self._positive_int("patience_steps")
        self._positive_int("probe_every")
        if self.probe_every % self.check_every:
            _fail(self.SECTION, "probe_every", self.probe_every, f"a multiple of check_every ({self.check_every})")
        self._greater("revive_threshold", self.threshold)
        self._between("max_frozen_fraction", 0.0, 1.0, open_low=True, open_high=True)


@dataclass
class BlendConfig(_Section):
    """How several active rules combine: sum of weighted log-factors."""

    SECTION: ClassVar[str] = "blend"
    weights: dict[str, float] = field(default_factory=dict)
    """Per-rule weight (rule name, reward rules as reward_<name> -> weight >= 0); missing rules weigh 1."""
    stability_shift: float = 0.5
    """0: fixed weights. s > 0: damping rules weigh up to (1+s) when unstable, growth rules (1+s) when stable."""

    def _validate(self) -> None:
        for name, weight in self.weights.items():
            if name not in BLENDABLE_RULES:
                _fail(self.SECTION, "weights", name, f"a rule name from {list(BLENDABLE_RULES)}")
            if not (math.isfinite(weight) and weight >= 0):
                _fail(self.SECTION, f"weights.{name}", weight, ">= 0")
        self._between("stability_shift", 0.0, 1.0)


@dataclass
class BoundsConfig(_Section):
    """Absolute safety bounds and the per-step rate limit."""

    SECTION: ClassVar[str] = "bounds"
    lr_min: float | None = None
    """Floor of the controller's LR; None derives base_lr / 100."""
    lr_max: float | None = None
    """Ceiling of the LR; None derives base_lr * 20."""
    max_change_per_step: float = 0.5
    """The gain never moves by more than this fraction in one step (0.5: within x0.5..x1.5)."""

    def _validate(self) -> None:
        for name in ("lr_min", "lr_max"):
            if getattr(self, name) is not None:
                self._greater(name, 0.0)
        if self.lr_min is not None and self.lr_max is not None and self.lr_max <= self.lr_min:
            _fail(self.SECTION, "lr_max", self.lr_max, f"> bounds.lr_min ({self.lr_min})")
        self._between("max_change_per_step", 0.0, 1.0, open_low=True, open_high=True)


@dataclass
class MoEConfig(_Section):
    """Gentler control of router/gate parameter groups (or of every group when no router group exists)."""

    SECTION: ClassVar[str] = "moe"
    enabled: bool = False
    """Apply the MoE profile."""
    router_patterns: list[str] = field(default_factory=lambda: ["router", "gate", "shared_expert_gate"])
    """Module names of routers: a parameter whose path has a segment equal to one of these is a router
    parameter (`mlp.gate.weight`, not `gate_proj`); a group of router parameters only is a router group."""
    gain_min: float = 0.1
    """Lowest LR gain of a router group."""
    gain_max: float = 2.0
    """Highest LR gain of a router group."""
    increase_factor: float = 1.05
    """Replaces decision.increase_factor (and caps every growth factor) for router groups."""
    decrease_factor: float = 0.85
    """Replaces decision.decrease_factor (and floors every damping factor) for router groups."""
    max_change_per_step: float = 0.15
    """Rate limit for router groups."""
    aux_loss_rise: float | None = 0.05
    """Router load-balancing loss (`aux_loss`, returned with `output_router_logits=True`): when its fast
    EMA exceeds its slow EMA by this fraction (routing getting less balanced), router groups' gain is
    multiplied by `decrease_factor`; None turns the rule off."""
    aux_loss_fast_beta: float = 0.8
    """Smoothing of the aux loss's fast EMA."""
    aux_loss_slow_beta: float = 0.98
    """Smoothing of its slow EMA (the reference level)."""
    aux_loss_cooldown_steps: int = 10
    """Steps between two aux-loss damping decisions; the rule also waits for this many aux losses."""

    def _validate(self) -> None:
        if not self.router_patterns or not all(self.router_patterns):
            _fail(self.SECTION, "router_patterns", self.router_patterns, "a non-empty list of non-empty strings")
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
            _fail(self.SECTION, "aux_loss_fast_beta", self.aux_loss_fast_beta,
                  f"< moe.aux_loss_slow_beta={self.aux_loss_slow_beta}")
        self._positive_int("aux_loss_cooldown_steps")


@dataclass
class RangeTestConfig(_Section):
    """LR range test at the start of training, on by default (its steps count in the run's budget).

    The first optimizer steps sweep the LR exponentially from gain_min to gain_max times the base LR
    (stopping early once the loss runs away); then model and optimizer are restored from the CPU-RAM
    snapshot rollback keeps anyway, and training goes on at (the gain of the lowest denoised loss) /
    backoff, which becomes the controller's new base (on a curve flat within its noise, as a pre-trained
    model's often is, the gain where it blows up / backoff). A choice within `keep_band` of the user's LR
    keeps it: the test cannot tell LRs that close apart. `enabled: false` leaves the user's LR as it is.
    """

    SECTION: ClassVar[str] = "range_test"
    enabled: bool = True
    """Run the test (the search for the LR); false keeps the LR the user set."""
    steps: int | None = None
    """Optimizer steps spent on the test; None sizes it to the run: budget_fraction of max_steps, within
    [min_steps, max_steps]."""
    budget_fraction: float = 0.04
    """Share of the run's steps an automatically sized test takes."""
    min_steps: int = 15
    """Fewest steps of an automatically sized test (fewer cannot resolve the loss curve)."""
    max_steps: int = 100
    """Most steps of an automatically sized test (a long run needs no longer one)."""
    max_budget_fraction: float = 0.1
    """An automatically sized test that would take more than this share of the run is skipped (short runs,
    and runs of unknown length, keep the user's LR)."""
    gain_min: float = 0.01
    """First gain of the sweep."""
    gain_max: float = 10_000.0
    """Last gain of the sweep (wide above the LR set: losses are credited to the step before, and a curve
    still falling at the sweep's top gives too low an LR)."""
    smoothing: float = 0.7
    """EMA smoothing (bias-corrected) of the test's losses, for stopping once they run away."""
    divergence_ratio: float = 4.0
    """Stop early once the smoothed loss exceeds this multiple of its minimum."""
    backoff: float = 10.0
    """Chosen gain = gain at the denoised-loss minimum / backoff."""
    keep_band: float = 3.0
    """A chosen gain within [1/keep_band, keep_band] keeps gain 1 (the user's LR); 1 always takes the choice."""
    significance: float = 3.0
    """Noise deviations that make a valley (the minimum below the level of the sweep's first third) or a
    blow-up (a loss above it); without a valley the choice is the blow-up's gain / backoff. 0: always the
    minimum's."""

    def _validate(self) -> None:
        if self.steps is not None and self.steps < 5:
            _fail(self.SECTION, "steps", self.steps, "an integer >= 5 or null")
        self._between("budget_fraction", 0.0, 1.0, open_low=True, open_high=True)
        self._positive_int("min_steps")
        if self.min_steps < 5:
            _fail(self.SECTION, "min_steps", self.min_steps, "an integer >= 5")
        self._positive_int("max_steps")
        if self.max_steps < self.min_steps:
            _fail(self.SECTION, "max_steps", self.max_steps, f">= range_test.min_steps ({self.min_steps})")
        self._between("max_budget_fraction", 0.0, 1.0, open_low=True, open_high=True)
        self._greater("gain_min", 0.0)
        self._greater("gain_max", self.gain_min)
        self._between("smoothing", 0.0, 1.0, open_high=True)
        self._greater("divergence_ratio", 1.0)
        self._greater("backoff", 1.0, inclusive=True)
        self._greater("keep_band", 1.0, inclusive=True)
        self._greater("significance", 0.0, inclusive=True)


@dataclass
class AnnealConfig(_Section):
    """End-of-run anneal when the Trainer's schedule has none (constant LR, a plain loop).

    At `start_fraction` of the planned steps R8 looks at the schedule's LR: if it still holds more than
    `flat_threshold` of its peak, the schedule will not decay in time, and R8 decays the LR itself over
    the rest of the run (1 - sqrt of the progress, the cooldown of warmup-stable-decay schedules) down
    to the lower bound. A decaying schedule (cosine, linear...) is left alone.
    """

    SECTION: ClassVar[str] = "anneal"
    enabled: bool = True
    """Anneal at the end of a run whose schedule does not decay."""
    start_fraction: float = 0.8
    """Share of the planned steps after which the anneal starts."""
    flat_threshold: float = 0.5
    """The schedule counts as not decaying if its LR at the start is above this share of its peak."""

    def _validate(self) -> None:
        self._between("start_fraction", 0.0, 1.0, open_low=True, open_high=True)
        self._between("flat_threshold", 0.0, 1.0, open_low=True, open_high=True)


@dataclass
class SamplerConfig(_Section):
    """Per-example loss catalog and balanced quartile batches (R8Trainer / with_r8 only)."""

    SECTION: ClassVar[str] = "sampler"
    enabled: bool = True
    """Own the train sampler (and keep the catalog); False leaves the Trainer's sampling alone."""
    mode: str = "balanced"
    """After the cataloging epoch: "balanced" (quartile mix per batch), "infobatch" (prune well-learned
    examples at random, rescale the kept ones' loss) or "uniform" (a plain shuffle; the catalog is still kept)."""
    prune_ratio: float = 0.5
    """infobatch: chance that an example below the mean EMA loss is left out of an epoch."""
    full_data_fraction: float = 0.125
    """infobatch: the last share of the planned epochs trains on full data again."""
    proportions: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25, 0.25])
    """Share of each batch drawn from Q1 (lowest loss) ... Q4 (highest)."""
    catalog_alpha: float = 0.3
    """EMA weight of a new per-example loss (and of the surprise in the batch-loss fallback)."""

    def _validate(self) -> None:
        values = self.proportions
        if len(values) != 4 or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
            _fail(self.SECTION, "proportions", values, "a list of 4 finite numbers >= 0 with a positive sum")
        if self.mode not in SAMPLER_MODES:
            _fail(self.SECTION, "mode", self.mode, f"one of {list(SAMPLER_MODES)}")
        self._between("prune_ratio", 0.0, 1.0, open_high=True)
        self._between("full_data_fraction", 0.0, 1.0)
        self._between("catalog_alpha", 0.0, 1.0, open_low=True)


@dataclass
class RollbackConfig(_Section):
    """Guard against non-finite steps and roll back from a CPU-RAM snapshot after a loss spike.

    Before each optimizer step, a non-finite loss or gradient norm (on any process) skips the step,
    and so does a loss spike (z-score against the recent healthy losses, or ratio to their EMA).
    A second spike in a row, or non-finite weights, restore the last healthy snapshot, drop the step
    in flight, restart the LR lower and feed low-loss batches for a while (R8Trainer). Rollbacks in a
    row back off (a lasting LR cut); `max_consecutive` of them stop training with the healthy state
    saved as a checkpoint. Off under DeepSpeed; snapshots off under FSDP.
    """

    SECTION: ClassVar[str] = "rollback"
    enabled: bool = True
    """Take snapshots and roll back; the non-finite guard (`guard_nonfinite`) works either way."""
    guard_nonfinite: bool = True
    """Skip an optimizer step whose loss or gradient norm is NaN/inf (reads both on the host: one sync per step)."""
    every_steps: int = 50
    """Optimizer steps between snapshots (taken only when the recent steps were healthy)."""
    keep: int = 1
    """Snapshots kept in RAM; the n-th rollback in a row returns to the n-th newest (as far as kept)."""
    healthy_steps: int = 10
    """A snapshot needs this many anomaly-free steps before it."""
    window: int = 50
    """Recent healthy losses the spike test compares against."""
    min_history: int = 20
    """Losses needed in the window before a spike can be called."""
    spike_z: float = 5.0
    """A loss this many noise standard deviations (from the window's step-to-step changes) above the
    EMA of the healthy losses is a spike..."""
    spike_ratio: float = 3.0
    """...or a loss this many times that EMA."""
    spike_min_setback: float = 0.25
    """...and, either way, a loss that gives back at least this share of the progress made since training
    started (the first loss minus the EMA): near zero, a loss of 0.1 after a level of 0.03 is one hard
    example in the batch, not damage."""
    lr_cut: float = 0.5
    """After a rollback the LR restarts at this multiple and returns to 1x over the stabilization; the
    n-th rollback in a row also cuts the gain for good by lr_cut**(n-1)."""
    stabilize_steps: int = 20
    """Steps of stabilization after a rollback (doubles per repeat): the LR's way back to 1x, and the
    batches drawn from the lowest-loss quartile (R8Trainer sampling only)."""
    max_consecutive: int = 3
    """Rollbacks in a row (no healthy snapshot 2 x every_steps after the last) before training stops."""
    scope: str = "trainable"
    """What a snapshot holds besides optimizer state and buffers: "trainable" parameters (PEFT: the
    adapters) or "all" parameters."""
    max_ram_fraction: float = 0.5
    """Snapshots may use at most this share of the host RAM available at the first one, or rollback turns off."""

    def _validate(self) -> None:
        for name in ("every_steps", "keep", "healthy_steps", "window", "min_history", "max_consecutive"):
            self._positive_int(name)
        self._non_negative_int("stabilize_steps")
        if self.min_history > self.window:
            _fail(self.SECTION, "min_history", self.min_history, f"<= window ({self.window})")
        self._greater("spike_z", 0.0)
        self._greater("spike_ratio", 1.0)
        self._between("spike_min_setback", 0.0, 1.0)
        self._between("lr_cut", 0.0, 1.0, open_low=True)
        if self.scope not in SNAPSHOT_SCOPES:
            _fail(self.SECTION, "scope", self.scope, f"one of {list(SNAPSHOT_SCOPES)}")
        self._between("max_ram_fraction", 0.0, 1.0, open_low=True)


_SECTIONS: dict[str, type] = {
    "signals": SignalConfig,
    "decision": DecisionConfig,
    "trend": TrendConfig,
    "variance": VarianceConfig,
    "loss_decay": LossDecayConfig,
    "grad_norm": GradNormConfig,
    "cyclical": CyclicalConfig,
    "plateau": PlateauConfig,
    "reward": RewardConfig,
    "momentum": MomentumConfig,
    "exploration": ExplorationConfig,
    "blend": BlendConfig,
    "bounds": BoundsConfig,
    "moe": MoEConfig,
    "range_test": RangeTestConfig,
    "anneal": AnnealConfig,
    "sampler": SamplerConfig,
    "rollback": RollbackConfig,
    "freezing": FreezingConfig,
}


@dataclass
class R8Config:
    """Everything hf_r8 reads. Build it in code, from a preset, or from YAML.

    Example:
        ```python
        config = R8Config.from_preset("conservative")
        config = R8Config(rules=["decision", "variance"], decision=DecisionConfig(patience_windows=3))
        ```
    """

    rules: list[str] = field(default_factory=lambda: ["decision", "grad_norm"])
    """Active LR rules, any of: decision, trend, variance, loss_decay, grad_norm, cyclical, plateau."""
    warmup_steps: int | None = None
    """Adaptation starts after this many optimizer steps; None takes the Trainer's warmup."""
    signals: SignalConfig = field(default_factory=SignalConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    trend: TrendConfig = field(default_factory=TrendConfig)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    loss_decay: LossDecayConfig = field(default_factory=LossDecayConfig)
    grad_norm: GradNormConfig = field(default_factory=GradNormConfig)
    cyclical: CyclicalConfig = field(default_factory=CyclicalConfig)
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    bounds: BoundsConfig = field(default_factory=BoundsConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    range_test: RangeTestConfig = field(default_factory=RangeTestConfig)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rollback: RollbackConfig = field(default_factory=RollbackConfig)
    freezing: FreezingConfig = field(default_factory=FreezingConfig)
    dashboard: bool = True
    """Live rich dashboard on the main process (periodic lines when stdout is not a terminal)."""
    run_files: bool = True
    """Write r8_events.jsonl and r8_metrics.jsonl into <output_dir>/r8/ (the Trainer's output_dir)."""
    report: bool = True
    """Write the plots and summary of `hf-r8 report` into <output_dir>/r8/r8_report at the end of training."""

    def __post_init__(self) -> None:
        _convert_fields(self, "")
        if any(rule not in LR_RULES for rule in self.rules) or len(set(self.rules)) != len(self.rules):
            _fail("", "rules", self.rules, f"a list of distinct names from {list(LR_RULES)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            _fail("", "warmup_steps", self.warmup_steps, "an integer >= 0 or null")
        for name, section_type in _SECTIONS.items():
            if not isinstance(getattr(self, name), section_type):
                raise TypeError(_problem("", name, getattr(self, name), f"a {section_type.__name__}"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> R8Config:
        """Build from nested plain data; unknown keys raise a ValueError naming them.

        A section given as None (in YAML, its name with nothing under it) keeps its defaults.
        """
        if not isinstance(data, dict):
            raise ValueError(f"R8Config: expected a mapping, got {type(data).__name__}")
        top_level = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - top_level)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}: allowed keys are {sorted(top_level)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in _SECTIONS:
                kwargs[key] = _section_from_dict(key, _SECTIONS[key], {} if value is None else value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data (JSON/YAML safe); `from_dict(to_dict())` rebuilds an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path) -> R8Config:
        """Load a YAML file; a preset may name a `base` preset it starts from.

        An empty section (`rollback:` with nothing under it) changes nothing: defaults, or the base's values.
        """
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data = {key: value for key, value in data.items() if not (key in _SECTIONS and value is None)}
        base_name = data.pop("base", None)
        if base_name is None:
            return cls.from_dict(data)
        return cls.from_dict(_deep_merge(cls.from_preset(base_name).to_dict(), data))

    @classmethod
    def from_preset(cls, name: str) -> R8Config:
        """One of the shipped presets: see `available_presets()`."""
        path = PRESETS_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"preset={name!r}: must be one of {available_presets()}")
        return cls.from_yaml(path)


def available_presets() -> list[str]:
    """Names of the YAML presets shipped with hf_r8."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def _section_from_dict(name: str, section_type: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise TypeError(_problem("", name, data, f"a mapping of {section_type.__name__} fields"))
    allowed = {f.name for f in dataclasses.fields(section_type)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{name}.{key}' for key in unknown]}: "
                         f"allowed keys in {name} are {sorted(allowed)}")
    return section_type(**data)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "weights":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
