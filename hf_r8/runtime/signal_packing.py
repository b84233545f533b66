"""One packing of an optimizer step's signals, shared by every adapter.

A step's loss, gradient norm, reward and MoE router aux loss travel as one small float tensor of
(sum, count) pairs, `[loss, n, grad_norm, n, reward, n, aux_loss, n]`: one tensor to sum across processes
(a NaN anywhere stays a NaN) and one copy to the host, started without waiting for the device
(`HostCopy`). A signal a step does not have is `[0, 0]`, and comes back as None.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_r8.control.controller import Observation

SIGNAL_NAMES = ("loss", "grad_norm", "reward", "router_aux_loss")
"""The signals a packing holds, in order: each is a (sum, count) pair."""


def pack_signals(device: torch.device | None, loss: Any = None, grad_norm: Any = None, reward: Any = None,
                 router_aux_loss: Any = None) -> torch.Tensor:
    """The signals given (device tensors stay on the device: no sync) as (value, 1) pairs, missing ones (0, 0),
    on `device` (None: the device of the first tensor signal, else the CPU)."""
    if device is None:
        tensors = [value for value in (loss, grad_norm, reward, router_aux_loss) if torch.is_tensor(value)]
        device = tensors[0].device if tensors else torch.device("cpu")
    parts = []
    for value in (loss, grad_norm, reward, router_aux_loss):
        if value is None:
            parts += [torch.zeros((), device=device), torch.zeros((), device=device)]
        elif torch.is_tensor(value):
            parts += [value.detach().reshape(()).to(device=device, dtype=torch.float32),
                      torch.ones((), device=device)]
        else:
            parts += [torch.tensor(float(value), device=device), torch.ones((), device=device)]
    return torch.stack(parts).float()


def unpack_signals(step: int, values: list[float]) -> Observation:
    """The step's mean of each signal from its (sum, count) pair (summed across processes, or not)."""
    loss_sum, loss_count, grad_sum, grad_count, reward_sum, reward_count, aux_sum, aux_count = values
    return Observation(step=step, loss=loss_sum / loss_count if loss_count > 0 else None,
                       grad_norm=grad_sum / grad_count if grad_count > 0 else None,
                       reward=reward_sum / reward_count if reward_count > 0 else None,
                       router_aux_loss=aux_sum / aux_count if aux_count > 0 else None)
