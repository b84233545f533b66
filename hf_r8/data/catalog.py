"""Per-example loss catalog: one row per training example in flat numpy arrays (21 bytes a row).

| array         | dtype   | meaning                                             |
|---------------|---------|-----------------------------------------------------|
| `ema_loss`    | float32 | smoothed loss estimate of the example               |
| `last_loss`   | float32 | the last exact loss seen (NaN when only estimated)  |
| `usage`       | int32   | how many times the example was trained on           |
| `last_step`   | int64   | optimizer step of its last use (-1: never)          |
| `seen`        | bool    | whether `ema_loss` holds any estimate yet           |

Two update paths:

* **exact**: the example's own loss is known: ema <- loss the first time, then ema + alpha * (loss - ema);
* **surprise**: only the batch loss is known: expected = mean EMA of the batch's seen examples, and
  every example of the batch moves by alpha * (batch_loss - expected); unseen ones start at the batch loss.

Quartiles (0 = Q1, lowest loss ... 3 = Q4, highest; -1 = unseen) come from the seen examples' EMA.
Non-finite losses are ignored (counted in `nonfinite_updates`). No torch here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hf_r8.control import state_versions

UNSEEN = -1
FILE_NAME = "r8_catalog.npz"


class LossCatalog:
    """Flat per-example loss table for a dataset of `size` examples."""

    def __init__(self, size: int, alpha: float = 0.3) -> None:
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"catalog size={size!r}: must be an integer >= 1 (an empty dataset cannot be cataloged)")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"catalog alpha={alpha!r}: must be in (0, 1]")
        self.size = int(size)
        self.alpha = float(alpha)
        self.ema_loss = np.zeros(self.size, dtype=np.float32)
        self.last_loss = np.full(self.size, np.nan, dtype=np.float32)
        self.usage = np.zeros(self.size, dtype=np.int32)
        self.last_step = np.full(self.size, -1, dtype=np.int64)
        self.seen = np.zeros(self.size, dtype=bool)
        self.nonfinite_updates = 0

    @property
    def bytes_per_example(self) -> float:
        arrays = (self.ema_loss, self.last_loss, self.usage, self.last_step, self.seen)
        return sum(array.nbytes for array in arrays) / self.size

    # ----------------------------------------------------------------------------------- updates
    def update_exact(self, indices: np.ndarray, losses: np.ndarray, step: int) -> None:
        """Each example's own loss. Repeated indices in one call are applied in order."""
        indices, losses = self._checked(indices), np.asarray(losses, dtype=np.float64)
        finite = np.isfinite(losses)
        self.nonfinite_updates += int((~finite).sum())
        indices, losses = indices[finite], losses[finite]
        if len(np.unique(indices)) == len(indices):
            self._blend(indices, losses)
        else:
            for index, loss in zip(indices, losses, strict=True):
                self._blend(np.array([index]), np.array([loss]))
        self.last_loss[indices] = losses
        self._count_use(indices, step)

    def update_surprise(self, indices: np.ndarray, batch_loss: float, step: int) -> None:
        """Only the batch's mean loss is known: move every example by alpha * (batch_loss - expected)."""
        indices = self._checked(indices)
        if not math.isfinite(batch_loss):
            self.nonfinite_updates += 1
            return
        known = self.seen[indices]
        expected = float(self.ema_loss[indices[known]].mean()) if known.any() else batch_loss
        surprise = self.alpha * (batch_loss - expected)
        self.ema_loss[indices[known]] += np.float32(surprise)
        self.ema_loss[indices[~known]] = batch_loss
        self.seen[indices] = True
        self._count_use(indices, step)

    def _blend(self, indices: np.ndarray, losses: np.ndarray) -> None:
        known = self.seen[indices]
        previous = self.ema_loss[indices].astype(np.float64)
        self.ema_loss[indices] = np.where(known, previous + self.alpha * (losses - previous), losses)
        self.seen[indices] = True

    def _count_use(self, indices: np.ndarray, step: int) -> None:
        np.add.at(self.usage, indices, 1)
        self.last_step[indices] = step

    def _checked(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.size):
            raise IndexError(f"catalog indices must be in [0, {self.size}); got {indices.min()}..{indices.max()}")
        return indices

    # ------------------------------------------------------------------------------------ queries
    def quartile_edges(self) -> np.ndarray | None:
        """The 25/50/75% points of the seen examples' EMA loss; None before anything was seen."""
        if not self.seen.any():
            return None
        return np.quantile(self.ema_loss[self.seen], [0.25, 0.5, 0.75])

    def quartiles(self) -> np.ndarray:
        """int8 per example: 0..3 for Q1..Q4 by EMA loss, -1 (UNSEEN) for examples never seen."""
        result = np.full(self.size, UNSEEN, dtype=np.int8)
        edges = self.quartile_edges()
        if edges is not None:
            result[self.seen] = np.searchsorted(edges, self.ema_loss[self.seen], side="right").astype(np.int8)
        return result

    def statistics(self) -> dict[str, float]:
        """Mean EMA loss per quartile, coverage and usage spread, for the logs."""
        quartiles = self.quartiles()
        stats = {"seen_fraction": float(self.seen.mean()), "usage_min": float(self.usage.min()),
                 "usage_max": float(self.usage.max()), "usage_std": float(self.usage.std())}
        for quartile in range(4):
            members = quartiles == quartile
            if members.any():
                stats[f"q{quartile + 1}_loss"] = float(self.ema_loss[members].mean())
        return stats

    # ------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of every array, with the version, `alpha` and the non-finite updates as 0-d arrays: what
        `r8_catalog.npz` holds."""
        return {"version": np.array(state_versions.CATALOG), "ema_loss": self.ema_loss.copy(),
                "last_loss": self.last_loss.copy(), "usage": self.usage.copy(), "last_step": self.last_step.copy(),
                "seen": self.seen.copy(), "alpha": np.array(self.alpha),
                "nonfinite_updates": np.array(self.nonfinite_updates)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """The saved arrays, into this catalog of the same size (its `alpha` stays this one's)."""
        version = state_versions.saved_version("loss catalog", state, state_versions.CATALOG)
        if len(state["ema_loss"]) != self.size:
            raise ValueError(f"the saved catalog holds {len(state['ema_loss'])} examples, this one {self.size}")
        for name in ("ema_loss", "last_loss", "usage", "last_step", "seen"):
            getattr(self, name)[:] = state[name]
        # Unversioned: (alpha, non-finite updates) as one positional `meta` array.
        self.nonfinite_updates = int(state["nonfinite_updates"] if version else state["meta"][1])

    def save(self, folder: str | Path) -> Path:
        """Write `r8_catalog.npz` (no pickle) into `folder`."""
        path = Path(folder) / FILE_NAME
        np.savez(path, **self.state_dict())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> LossCatalog:
        with np.load(Path(folder) / FILE_NAME, allow_pickle=False) as data:
            catalog = cls(len(data["ema_loss"]), alpha=float(data["alpha"] if "alpha" in data else data["meta"][0]))
            catalog.load_state_dict(dict(data))
        return catalog

    def equals(self, other: LossCatalog) -> bool:
        """Byte-identical arrays (what every rank must hold)."""
        names = ("ema_loss", "last_loss", "usage", "last_step", "seen")
        return self.size == other.size and all(
            getattr(self, name).tobytes() == getattr(other, name).tobytes() for name in names)
