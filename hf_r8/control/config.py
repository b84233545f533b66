"""`R8Config`: every knob of hf_r8 as a tree of dataclasses, checked at construction and before use.

The root holds the top-level switches and one dataclass per section; the sections live by theme in
config_rules.py (the control law's rules), config_limits.py (blending, bounds, MoE) and
config_training.py (range test, anneal, sampler, rollback, dither, freezing), on the checking machinery
of config_types.py. Every field carries its help in ``field(metadata={"help": ...})``, from which
config_reference.py generates docs/configuration.md.

A bad value raises as soon as the config is built, so a typo in a YAML preset fails before training
starts; `R8Config.validate()` runs the same checks again on the config as it is then, and whoever
consumes a config calls it, so a field assigned after construction is checked as well. This module
owns the root, the presets (``configs/*.yaml``, shipped inside the package as ``hf_r8/configs``) and
loading from dicts and YAML; it re-exports the section classes, the names the rest of hf_r8 imports
from here. It knows nothing of torch or transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_r8.control.config_limits import BlendConfig, BoundsConfig, MoEConfig
from hf_r8.control.config_rules import (
    CyclicalConfig,
    DecisionConfig,
    GradNormConfig,
    HypergradientConfig,
    LossDecayConfig,
    MomentumConfig,
    PlateauConfig,
    RewardConfig,
    SignalConfig,
    TrendConfig,
    VarianceConfig,
)
from hf_r8.control.config_training import (
    AnnealConfig,
    ExplorationConfig,
    FreezingConfig,
    RangeTestConfig,
    RollbackConfig,
    SamplerConfig,
)
from hf_r8.control.config_types import ValidatedConfig, problem, reject

__all__ = [
    "PRESETS_DIR",
    "SECTIONS",
    "AnnealConfig",
    "BlendConfig",
    "BoundsConfig",
    "CyclicalConfig",
    "DecisionConfig",
    "ExplorationConfig",
    "FreezingConfig",
    "GradNormConfig",
    "HypergradientConfig",
    "LossDecayConfig",
    "MoEConfig",
    "MomentumConfig",
    "PlateauConfig",
    "R8Config",
    "RangeTestConfig",
    "RewardConfig",
    "RollbackConfig",
    "SamplerConfig",
    "SignalConfig",
    "TrendConfig",
    "VarianceConfig",
    "available_presets",
    "preset_digest",
]

PRESETS_DIR = Path(__file__).parent.parent / "configs"


@dataclass
class R8Config(ValidatedConfig):
    """Everything hf_r8 reads. Build it in code, from a preset, or from YAML.

    Example:
        ```python
        config = R8Config(rules=["decision", "variance"], decision=DecisionConfig(patience_windows=3))
        config = R8Config.from_preset("conservative")
        config.decision.patience_windows = 3
        config.validate()  # optional: hf_r8 runs it too when it takes the config
        ```
    """

    rules: list[str] = field(default_factory=lambda: ["decision", "grad_norm"], metadata={
        "help": "Active LR rules, any of: decision, trend, variance, loss_decay, grad_norm, cyclical, plateau, "
                "hypergradient, "
                "or a name registered with register_rule (resolved when hf_r8 takes the config)."})
    rule_settings: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "Settings of your own rules, by registered name (rule name -> mapping); a rule reads its own "
                "as `self.settings`."})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "Adaptation starts after this many optimizer steps; None takes the Trainer's warmup."})
    signals: SignalConfig = field(default_factory=SignalConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    trend: TrendConfig = field(default_factory=TrendConfig)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    loss_decay: LossDecayConfig = field(default_factory=LossDecayConfig)
    grad_norm: GradNormConfig = field(default_factory=GradNormConfig)
    hypergradient: HypergradientConfig = field(default_factory=HypergradientConfig)
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
    dashboard: bool = field(default=True, metadata={
        "help": "Live rich dashboard on the main process (periodic lines when stdout is not a terminal)."})
    run_files: bool = field(default=True, metadata={
        "help": "Write r8_events.jsonl and r8_metrics.jsonl into <output_dir>/r8/ (the Trainer's output_dir)."})
    report: bool = field(default=True, metadata={
        "help": "Write the plots and summary of `hf-r8 report` into <output_dir>/r8/r8_report at the end of training."})

    def _check(self) -> None:
        """Top-level checks, then every section's `validate()`: a section may have changed since it was built."""
        # The names themselves are resolved in the rule registry when an adapter takes the config (`resolve.py`):
        # a YAML may name a rule the user registers after loading it.
        if (not isinstance(self.rules, list) or not all(isinstance(rule, str) and rule for rule in self.rules)
                or len(set(self.rules)) != len(self.rules)):
            reject("", "rules", self.rules, "a list of distinct rule names")
        if not (isinstance(self.rule_settings, dict) and all(
                isinstance(name, str) and isinstance(settings, dict) for name, settings in self.rule_settings.items())):
            reject("", "rule_settings", self.rule_settings, "a mapping of rule name -> mapping of settings")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            reject("", "warmup_steps", self.warmup_steps, "an integer >= 0 or null")
        for name, section_type in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, section_type):
                raise TypeError(problem("", name, section, f"a {section_type.__name__}"))
            section.validate()

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
            if key in SECTIONS:
                kwargs[key] = _section_from_dict(key, SECTIONS[key], {} if value is None else value)
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
        data = {key: value for key, value in data.items() if not (key in SECTIONS and value is None)}
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


# Section name -> its dataclass, read off the root's fields so the two cannot disagree.
SECTIONS: dict[str, type[ValidatedConfig]] = {
    spec.name: spec.default_factory for spec in dataclasses.fields(R8Config)
    if isinstance(spec.default_factory, type) and issubclass(spec.default_factory, ValidatedConfig)
}


def available_presets() -> list[str]:
    """Names of the YAML presets shipped with hf_r8."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def preset_digest(name: str = "default") -> str:
    """A short fingerprint of preset `name` as it loads (every field, defaults included): outputs that show a
    preset's behaviour (the notebook's) record it, and a test says when they were made with another one."""
    text = json.dumps(R8Config.from_preset(name).to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _section_from_dict(name: str, section_type: type, data: Any) -> Any:
    """Build section `name` from a mapping, naming unknown keys (typos) with the keys it allows."""
    if not isinstance(data, dict):
        raise TypeError(problem("", name, data, f"a mapping of {section_type.__name__} fields"))
    allowed = {f.name for f in dataclasses.fields(section_type)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{name}.{key}' for key in unknown]}: "
                         f"allowed keys in {name} are {sorted(allowed)}")
    return section_type(**data)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`, section by section; `blend.weights` is replaced whole (a preset that
    names weights means exactly those)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "weights":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
