"""Per-example losses on their way from the accelerator to the `LossCatalog`, without stalling it.

`record` runs inside `compute_loss`, right after the forward pass. It pads the micro-batch's
(index, loss) pairs to a fixed length, so the gather across processes needs no host-side length
exchange, enqueues that gather and a non-blocking copy to (pinned) host memory, and marks the copy
with an event. `apply` later moves every copy that has landed into the catalog, in recording order;
`apply(wait=True)` first waits for all of them, which the sampler does before planning an epoch and
the Trainer before saving a checkpoint, so every rank plans from, and saves, the same catalog.

On CPU the copy is a no-op and an update is applied at the next `apply`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hf_r8.data.catalog import LossCatalog
from hf_r8.runtime.distributed import gather_across_processes

PADDING_INDEX = -1


@dataclass
class _InFlight:
    indices: torch.Tensor  # every process's padded indices, on the host once `copied` has completed
    losses: torch.Tensor  # per-example losses, or each process's batch loss repeated (surprise path)
    exact: bool
    step: int
    copied: torch.Event | None  # None: already on the host


class CatalogUpdateQueue:
    """FIFO of gathered (index, loss) pairs whose device-to-host copies may still be running.

    Args:
        capacity: the most examples one process's micro-batch holds (its per-device batch size).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity!r}: must be >= 1 (the per-device batch size)")
        self.capacity = capacity
        self._in_flight: list[_InFlight] = []

    def __len__(self) -> int:
        return len(self._in_flight)

    def record(self, indices: torch.Tensor, losses: torch.Tensor | None, batch_loss: torch.Tensor,
               step: int) -> None:
        """Queue one micro-batch: its examples' own `losses`, or only its mean `batch_loss` (surprise).

        A collective when several processes train: every process records the same number of times.
        """
        indices = indices.detach().reshape(-1).long()
        exact = losses is not None
        values = losses.detach().reshape(-1).float() if exact else \
            batch_loss.detach().float().reshape(1).expand(indices.numel())
        if indices.numel() > self.capacity:
            raise ValueError(f"a micro-batch of {indices.numel()} examples exceeds the catalog update capacity "
                             f"{self.capacity} (the per-device train batch size)")
        values = values.to(indices.device)
        length = self.capacity
        padded_indices = torch.full((length,), PADDING_INDEX, dtype=torch.long, device=indices.device)
        padded_values = torch.full((length,), float("nan"), dtype=torch.float32, device=indices.device)
        padded_indices[: indices.numel()] = indices
        padded_values[: values.numel()] = values
        all_indices = gather_across_processes(padded_indices)
        all_values = gather_across_processes(padded_values)
        copied = None
        if all_indices.device.type != "cpu":
            all_indices = all_indices.to("cpu", non_blocking=True)
            all_values = all_values.to("cpu", non_blocking=True)
            copied = torch.Event(device=padded_indices.device)
            copied.record()
        self._in_flight.append(_InFlight(all_indices, all_values, exact, step, copied))

    def apply(self, catalog: LossCatalog, wait: bool = False) -> int:
        """Move landed updates into `catalog` in recording order; `wait=True` waits for all. Returns how many."""
        applied = 0
        while self._in_flight:
            update = self._in_flight[0]
            if update.copied is not None:
                if wait:
                    update.copied.synchronize()
                elif not update.copied.query():
                    break
            self._in_flight.pop(0)
            applied += 1
            indices, values = update.indices.numpy(), update.losses.numpy()
            real = indices != PADDING_INDEX
            if not real.any():
                continue
            if update.exact:
                catalog.update_exact(indices[real], values[real], update.step)
            else:
                catalog.update_surprise(indices[real], float(np.mean(values[real])), update.step)
        return applied

    def clear(self) -> None:
        """Forget updates not yet applied (a new catalog replaces the old one)."""
        self._in_flight = []
