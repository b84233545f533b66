"""hf_r8 (learnit::r8 for Hugging Face): closed-loop LR/momentum control for transformers.Trainer and TRL.

The exports are imported on first use (PEP 562), so that `hf-r8 presets` and other commands that need no
model do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hf_r8.control.config import R8Config, available_presets

if TYPE_CHECKING:
    from hf_r8.control.controller import Controller, GroupSpec, Observation
    from hf_r8.control.decision import Decision
    from hf_r8.control.events import Event
    from hf_r8.control.rule_registry import register_rule
    from hf_r8.control.rules import Proposal, Rule, StepStatistics
    from hf_r8.data.sampler_modes import EpochPlan, PlanContext, SamplerMode, register_sampler_mode
    from hf_r8.integrations.callback import R8Callback
    from hf_r8.integrations.loop import R8Loop
    from hf_r8.integrations.scheduler import AdaptiveScheduler
    from hf_r8.integrations.trainer import R8Trainer, with_r8

_LAZY = {
    "AdaptiveScheduler": "hf_r8.integrations.scheduler",
    "Controller": "hf_r8.control.controller",
    "Decision": "hf_r8.control.decision",
    "EpochPlan": "hf_r8.data.sampler_modes",
    "Event": "hf_r8.control.events",
    "GroupSpec": "hf_r8.control.controller",
    "Observation": "hf_r8.control.controller",
    "PlanContext": "hf_r8.data.sampler_modes",
    "Proposal": "hf_r8.control.rules",
    "Rule": "hf_r8.control.rules",
    "SamplerMode": "hf_r8.data.sampler_modes",
    "StepStatistics": "hf_r8.control.rules",
    "register_rule": "hf_r8.control.rule_registry",
    "register_sampler_mode": "hf_r8.data.sampler_modes",
    "R8Callback": "hf_r8.integrations.callback",
    "R8Loop": "hf_r8.integrations.loop",
    "R8Trainer": "hf_r8.integrations.trainer",
    "with_r8": "hf_r8.integrations.trainer",
}

__all__ = [
    "AdaptiveScheduler",
    "Controller",
    "Decision",
    "EpochPlan",
    "Event",
    "GroupSpec",
    "Observation",
    "PlanContext",
    "Proposal",
    "R8Callback",
    "R8Config",
    "R8Loop",
    "R8Trainer",
    "Rule",
    "SamplerMode",
    "StepStatistics",
    "available_presets",
    "register_rule",
    "register_sampler_mode",
    "with_r8",
]
__version__ = "0.3.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hf_r8' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
