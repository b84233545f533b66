"""A copy of model parameters and optimizer state in CPU RAM, restorable in place.

Restoring copies the saved tensors back into the live parameters (same objects, so DDP wrappers,
optimizer references and hooks stay valid) and reloads the optimizer's state dict.
"""

from __future__ import annotations

from typing import Any

import torch


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


class CpuSnapshot:
    """Model parameters/buffers and optimizer state, copied to CPU RAM at construction."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model_state = _to_cpu(model.state_dict())
        self.optimizer_state = _to_cpu(optimizer.state_dict())

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.load_state_dict(self.model_state)
        optimizer.load_state_dict(self.optimizer_state)
