"""One way for every adapter to take its configuration: an `R8Config`, its dict form, a preset name, a YAML
path, or None for the `default` preset (`R8Callback`, `R8Trainer`, `AdaptiveScheduler`, `R8Loop`).

A config built earlier is validated again when an adapter takes it (and when training starts), so fields
assigned after construction get the same checks; the rule names it holds are resolved in the rule registry
then, so a YAML may name a rule registered after it was loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_r8.control.config import R8Config, available_presets
from hf_r8.control.rule_registry import check_rule_names

ConfigLike = R8Config | dict[str, Any] | str | Path | None


def resolve_config(config: ConfigLike) -> R8Config:
    """The `R8Config` that `config` names (see the module docstring), checked by `revalidate`."""
    if config is None:
        return R8Config.from_preset("default")
    if isinstance(config, R8Config):
        return revalidate(config)
    if isinstance(config, dict):
        return revalidate(R8Config.from_dict(config))
    if isinstance(config, Path) or (isinstance(config, str) and config.endswith((".yaml", ".yml"))):
        return revalidate(R8Config.from_yaml(config))
    if isinstance(config, str):
        if config not in available_presets():
            raise ValueError(f"config={config!r}: must be a preset ({', '.join(available_presets())}) or a path "
                             "ending in .yaml")
        return R8Config.from_preset(config)
    raise TypeError(f"config={config!r}: must be an R8Config, a dict, a preset name, a YAML path or None")


def revalidate(config: R8Config) -> R8Config:
    """`config` checked as it is now: its values (fields may have been assigned since it was built) and its rule
    names, resolved in the rule registry (`check_rule_names`)."""
    config.validate()
    check_rule_names(config)
    return config
