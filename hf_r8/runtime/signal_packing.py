"""One packing of an optimizer step's signals, shared by every adapter.

A step's loss, gradient norm, reward, MoE router aux loss and update alignment travel as one small float
tensor of (sum, count) pairs, `[loss, n, grad_norm, n, reward, n, router_aux_loss, n, update_alignment, n]`:
one tensor to sum across processes (a NaN anywhere stays a NaN) and one copy to the host, started without
waiting for the device (`HostCopy`). A signal a step does not have is `[0, 0]`, and comes back as None.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_r8.control.controller import Observation

SIGNAL_NAMES = ("loss", "grad_norm", "reward", "router_aux_loss", "update_alignment")
"""The signals a packing holds, in order: each is a (sum, count) pair (an `Observation` field of that name)."""


def pack_signals(device: torch.device | None, **signals: Any) -> torch.Tensor:
    """The signals given by name (`SIGNAL_NAMES`; device tensors stay on the device: no sync) as (value, 1) pairs,
    missing ones (0, 0), on `device` (None: the device of the first tensor signal, else the CPU)."""
    unknown = sorted(set(signals) - set(SIGNAL_NAMES))
    if unknown:
        raise TypeError(f"pack_signals() got unknown signals {unknown}: the packing holds {list(SIGNAL_NAMES)}")
    if device is None:
        tensors = [value for value in signals.values() if torch.is_tensor(value)]
        device = tensors[0].device if tensors else torch.device("cpu")
    zero, one = torch.zeros((), device=device), torch.ones((), device=device)  # stack copies: one of each will do
    parts = []
    for name in SIGNAL_NAMES:
        value = signals.get(name)
        if value is None:
            parts += [zero, zero]
        elif torch.is_tensor(value):
            parts += [value.detach().reshape(()).to(device=device, dtype=torch.float32), one]
        else:
            parts += [torch.tensor(float(value), device=device), one]
    return torch.stack(parts).float()


def unpack_signals(step: int, values: list[float]) -> Observation:
    """The step's mean of each signal from its (sum, count) pair (summed across processes, or not)."""
    if len(values) != 2 * len(SIGNAL_NAMES):
        raise ValueError(f"{len(values)} packed values: expected a (sum, count) pair for each of {list(SIGNAL_NAMES)}")
    means = {name: values[2 * index] / values[2 * index + 1] if values[2 * index + 1] > 0 else None
             for index, name in enumerate(SIGNAL_NAMES)}
    return Observation(step=step, **means)
