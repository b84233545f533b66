"""The methods compared: schedules, LR-free optimizers and hf_r8, all through transformers.Trainer.

Each method turns (task, initial LR) into Trainer arguments, optional optimizers and callbacks.
For the LR-free optimizers the swept "initial LR" is a multiplier of their recommended setting:
AdamW lr 1e-2 on the grid corresponds to Prodigy lr=1.0 (the grid divided by 1e-2, the grid's
center, where these small models train best with AdamW).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_r8 import R8Callback, R8Config

PRODIGY_GRID_CENTER = 1e-2


@dataclass
class Method:
    name: str
    args: dict[str, Any]
    make_optimizer: Callable[[torch.nn.Module, float], torch.optim.Optimizer] | None = None
    make_callbacks: Callable[[], list[Any]] = field(default=lambda: [])
    description: str = ""
    stock: str | None = None
    """hf_r8's methods: the stock Trainer method on the same schedule (what the user had without R8)."""
    test_off: str | None = None
    """hf_r8's methods: the same run with the LR range test off."""


def _prodigy(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    return Prodigy(model.parameters(), lr=lr / PRODIGY_GRID_CENTER, weight_decay=0.0)


def _r8(preset: str) -> Callable[[], list[Any]]:
    return lambda: [R8Callback(R8Config.from_preset(preset))]


def _r8_adding_rules(preset: str, *rules: str) -> Callable[[], list[Any]]:
    def make_callbacks() -> list[Any]:
        config = R8Config.from_preset(preset)
        config.rules = [*config.rules, *rules]
        return [R8Callback(config)]

    return make_callbacks


WARMUP = 0.1  # a fraction of the steps, as TrainingArguments reads warmup_steps < 1

METHODS = {
    "constant": Method("constant", {"lr_scheduler_type": "constant"}, description="constant LR"),
    "linear": Method("linear", {"lr_scheduler_type": "linear", "warmup_steps": WARMUP},
                     description="10% warmup, linear decay"),
    "cosine": Method("cosine", {"lr_scheduler_type": "cosine", "warmup_steps": WARMUP},
                     description="10% warmup, cosine decay"),
    "plateau": Method("plateau", {"lr_scheduler_type": "reduce_lr_on_plateau"},
                      description="ReduceLROnPlateau on the eval loss (HF defaults)"),
    "greedy": Method("greedy", {"lr_scheduler_type": "greedy"}, description="GreedyLR on the eval loss (HF defaults)"),
    "schedulefree": Method("schedulefree", {"optim": "schedule_free_adamw", "lr_scheduler_type": "constant",
                                            "warmup_steps": WARMUP},
                           description="AdamWScheduleFree, 10% warmup"),
    "prodigy": Method("prodigy", {"lr_scheduler_type": "cosine", "warmup_steps": WARMUP}, make_optimizer=_prodigy,
                      description="Prodigy (lr = grid / 1e-2), 10% warmup, cosine"),
    "r8_cosine": Method("r8_cosine", {"lr_scheduler_type": "cosine", "warmup_steps": WARMUP},
                        make_callbacks=_r8("default"), description="hf_r8 default preset (range test sized to the run, "
                                                       "online rules) on 10% warmup + cosine",
                        stock="cosine", test_off="r8_gentle"),
    "r8_hypergradient": Method("r8_hypergradient", {"lr_scheduler_type": "cosine", "warmup_steps": WARMUP},
                               make_callbacks=_r8_adding_rules("default", "hypergradient"),
                               description="hf_r8 default preset plus the hypergradient rule (the gain follows the "
                                           "sign of d loss / d LR) on 10% warmup + cosine", stock="cosine"),
    "r8_constant": Method("r8_constant", {"lr_scheduler_type": "constant"}, make_callbacks=_r8("default"),
                          description="hf_r8 default preset on a constant schedule (so its end-of-run anneal is on)",
                          stock="constant"),
    "r8_gentle": Method("r8_gentle", {"lr_scheduler_type": "cosine", "warmup_steps": WARMUP},
                        make_callbacks=_r8("gentle"),
                        description="hf_r8 gentle preset (the default before it searched for the LR: no range test, "
                                    "no anneal: on cosine, the default with range_test.enabled: false) on 10% "
                                    "warmup + cosine", stock="cosine"),
    "r8_find_lr": Method("r8_find_lr", {"lr_scheduler_type": "constant"}, make_callbacks=_r8("find_lr"),
                         description="hf_r8 find_lr preset (a fixed 30-step LR range test before the first step, "
                                     "weights restored, no anneal) on a constant schedule", stock="constant"),
}
