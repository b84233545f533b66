"""The few collective operations hf_r8 needs, one job each, called identically on every process.

No other module calls `torch.distributed` directly. With a single process every function is the
identity, so the same code runs under `python`, `torchrun` and `accelerate launch`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over all processes (in place and returned). A NaN anywhere is a NaN everywhere."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of the same length on every process, in rank order.

    Equal lengths need no exchange of sizes first, so on an accelerator the gather is only enqueued:
    the host does not wait for it.
    """
    if world_size() == 1:
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(pieces, tensor)
    return torch.cat(pieces)
