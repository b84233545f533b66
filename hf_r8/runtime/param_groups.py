"""Reading and writing an optimizer parameter group's LR and momentum, whatever the optimizer.

Momentum is `betas[0]` for Adam-style optimizers and `momentum` for SGD-style ones; an optimizer with
neither has none, and nothing is written. A tensor LR (capturable / fused optimizers) is filled in place.
"""

from __future__ import annotations

from typing import Any

import torch


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
