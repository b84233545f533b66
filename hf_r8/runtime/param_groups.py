"""Reading and writing an optimizer parameter group's LR and momentum, whatever the optimizer.

Momentum is `betas[0]` for Adam-style optimizers and `momentum` for SGD-style ones; an optimizer with
neither has none, and nothing is written. A tensor LR (capturable / fused optimizers) is filled in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from hf_r8.control.controller import GroupSpec
from hf_r8.runtime.moe import is_router_parameter


def read_momentum(group: dict[str, Any]) -> float | None:
    if "betas" in group:
        return float(group["betas"][0])
    if "momentum" in group:
        return float(group["momentum"])
    return None


def write_momentum(group: dict[str, Any], momentum: float) -> None:
    if "betas" in group:
        group["betas"] = (momentum, *tuple(group["betas"])[1:])
    elif "momentum" in group:
        group["momentum"] = momentum


def write_lr(group: dict[str, Any], lr: float) -> None:
    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def write_lrs(optimizer: torch.optim.Optimizer, schedule_lrs: Sequence[float], lr_of: Callable[[int, float], float],
              momentum_of: Callable[[int], float | None]) -> list[float]:
    """One step's write, the same in every adapter that holds the optimizer: group i gets the LR
    `lr_of(i, schedule_lrs[i])` and, where `momentum_of(i)` is not None, that momentum. Returns the LRs written."""
    written = []
    for index, (group, schedule_lr) in enumerate(zip(optimizer.param_groups, schedule_lrs, strict=True)):
        lr = lr_of(index, schedule_lr)
        write_lr(group, lr)
        momentum = momentum_of(index)
        if momentum is not None:
            write_momentum(group, momentum)
        written.append(lr)
    return written


def group_specs(optimizer: torch.optim.Optimizer, initial_gains: list[float] | None = None,
                model: torch.nn.Module | None = None, router_patterns: Sequence[str] = ()) -> list[GroupSpec]:
    """What the controller needs to know of each parameter group: its base LR (the schedule's `initial_lr`),
    its momentum, whether it holds only MoE routers (named by `router_patterns`, when `model` names the
    parameters), and the gain it starts from (1 unless given)."""
    names = {id(param): name for name, param in model.named_parameters()} if model is not None else {}
    specs = []
    for index, group in enumerate(optimizer.param_groups):
        param_names = [names.get(id(param), "") for param in group["params"]] if names else []
        is_router = bool(param_names) and all(is_router_parameter(name, router_patterns) for name in param_names)
        specs.append(GroupSpec(float(group.get("initial_lr", group["lr"])), read_momentum(group), is_router,
                               initial_gains[index] if initial_gains else 1.0))
    return specs
