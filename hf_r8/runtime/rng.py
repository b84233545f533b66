"""The random number generators a training step draws from (Python's, NumPy's, torch's on the CPU and CUDA),
captured and put back together: a rollback restores them with the weights, and the LR range test's sweep leaves
them as it found them, so the run after it draws the same dropout masks and data order as one without it."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    """Every generator's state, under the keys `restore_rng_states` reads."""
    return {
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what `rng_states` captured (CUDA's only where it was captured)."""
    random.setstate(states["python_rng"])
    np.random.set_state(states["numpy_rng"])
    torch.set_rng_state(states["torch_rng"])
    if states.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(states["cuda_rng"])
