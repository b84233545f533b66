"""A small device tensor on its way to the host: the copy starts without waiting for the device, and
reading it later waits for that copy only (pinned memory and a CUDA event; on CPU a plain copy)."""

from __future__ import annotations

import torch


class HostCopy:
    """`HostCopy(tensor)` starts the copy; `result()` returns the host tensor once it has landed."""

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self._landed: torch.cuda.Event | None = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._landed = torch.cuda.Event()
            self._landed.record()
        else:
            self._host = tensor.cpu()

    def result(self) -> torch.Tensor:
        if self._landed is not None:
            self._landed.synchronize()
        return self._host
