"""hf_r8 (learnit::r8 for Hugging Face): closed-loop LR/momentum control for transformers.Trainer and TRL."""

from hf_r8.callback import R8Callback
from hf_r8.config import R8Config, available_presets
from hf_r8.controller import Controller, Event, GroupSpec, Observation
from hf_r8.decision import Decision
from hf_r8.loop import R8Loop
from hf_r8.scheduler import AdaptiveScheduler
from hf_r8.trainer import R8Trainer, with_r8

__all__ = [
    "AdaptiveScheduler",
    "Controller",
    "Decision",
    "Event",
    "GroupSpec",
    "Observation",
    "R8Callback",
    "R8Config",
    "R8Loop",
    "R8Trainer",
    "available_presets",
    "with_r8",
]
__version__ = "0.1.0"
