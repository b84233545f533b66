"""Balanced loss-quartile sampling: every batch mixes easy and hard examples in fixed proportions.

* Epoch 0 is the **cataloging epoch**: a seeded permutation that visits every example once.
* Later epochs: each batch of `batch_size` takes `counts[q]` examples from quartile q (Q1 lowest
  loss ... Q4 highest; examples never seen count as Q4, the least known), with counts from
  `proportions` by largest remainder. Within a quartile the least-used examples come first, ties
  broken by a seeded random key; a quartile asked for more than it holds cycles through its order.
* `stabilize(n)`: the next `n` batches come from Q1 only (used after a rollback).

The plan depends only on (seed, epoch, catalog), so every process computes the same global order
and Accelerate's per-process split of batches stays disjoint and complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from hf_r8.catalog import UNSEEN, LossCatalog

PLAN_FILE_NAME = "r8_epoch_plan.npz"


def batch_counts(proportions: Sequence[float], batch_size: int) -> np.ndarray:
    """Examples per quartile in one batch: proportions scaled to batch_size, largest remainder rounding."""
    weights = np.asarray(proportions, dtype=np.float64)
    if weights.shape != (4,) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"proportions={list(proportions)}: must be 4 non-negative numbers with a positive sum")
    exact = weights / weights.sum() * batch_size
    counts = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: batch_size - counts.sum()]] += 1
    return counts


class BalancedQuartileSampler(Sampler[int]):
    """Yields example indices; consecutive runs of `batch_size` form the quartile-balanced batches."""

    def __init__(self, catalog: LossCatalog, batch_size: int, seed: int = 0,
                 proportions: Sequence[float] = (0.25, 0.25, 0.25, 0.25),
                 before_plan: Callable[[], None] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.catalog = catalog
        self.batch_size = batch_size
        self.seed = seed
        self.counts = batch_counts(proportions, batch_size)
        self.epoch = 0
        self.stabilize_batches = 0
        self.before_plan = before_plan
        """Called (on every process) before an epoch's plan: the trainer applies its pending catalog updates."""
        self.current_epoch_plan: tuple[int, np.ndarray] | None = None
        """(epoch, plan) of the epoch under way: saved with checkpoints, so a resumed epoch replays its plan."""

    def __len__(self) -> int:
        return self.catalog.size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stabilize(self, batches: int) -> None:
        """The next `batches` batches of the plan come from Q1 only."""
        self.stabilize_batches = batches

    def __iter__(self) -> Iterator[int]:
        if self.before_plan is not None:
            self.before_plan()
        saved = self.current_epoch_plan
        if saved is None or saved[0] != self.epoch or self.stabilize_batches:
            self.current_epoch_plan = (self.epoch, self.plan().astype(np.int64))
        return iter(self.current_epoch_plan[1].tolist())

    def plan(self) -> np.ndarray:
        """The epoch's order of indices (length = dataset size)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        size = self.catalog.size
        if self.epoch == 0 and self.stabilize_batches == 0:
            return rng.permutation(size)
        quartiles = self.catalog.quartiles()
        quartiles[quartiles == UNSEEN] = 3
        # int16 usage lets numpy's stable sort run as a radix sort: the 10M-example plan stays fast
        usage = np.minimum(self.catalog.usage, np.iinfo(np.int16).max).astype(np.int16)
        batches = -(-size // self.batch_size)
        columns = []
        for quartile, count in enumerate(self.counts):
            if count == 0:
                continue
            columns.append(self._draw(quartile, quartiles, usage, rng, count * batches).reshape(batches, count))
        plan = np.concatenate(columns, axis=1)
        if self.stabilize_batches:
            easy = self._draw(0, quartiles, usage, rng, self.stabilize_batches * self.batch_size)
            plan[: self.stabilize_batches] = easy.reshape(-1, self.batch_size)[: len(plan)]
            self.stabilize_batches = max(0, self.stabilize_batches - len(plan))
        # shuffle inside each batch so quartiles are not in fixed positions
        return rng.permuted(plan, axis=1).reshape(-1)[:size]

    @staticmethod
    def _draw(quartile: int, quartiles: np.ndarray, usage: np.ndarray, rng: np.random.Generator,
              needed: int) -> np.ndarray:
        """`needed` members of a quartile: least used first, ties in random order, cycling if short."""
        members = np.flatnonzero(quartiles == quartile)
        if members.size == 0:  # an empty quartile lends its share to the nearest non-empty one
            populated = np.unique(quartiles)
            members = np.flatnonzero(quartiles == populated[np.argmin(np.abs(populated - quartile))])
        shuffled = rng.permutation(members)
        order = shuffled[np.argsort(usage[shuffled], kind="stable")]
        return np.resize(order, needed)
