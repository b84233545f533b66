"""Balanced loss-quartile sampling: every batch mixes easy and hard examples in fixed proportions.

* Epoch 0 is the **cataloging epoch**: a seeded permutation that visits every example once.
* Later epochs: each batch of `batch_size` takes `counts[q]` examples from quartile q (Q1 lowest
  loss ... Q4 highest; examples never seen count as Q4, the least known), with counts from
  `proportions` by largest remainder. Within a quartile the least-used examples come first, ties
  broken by a seeded random key; a quartile asked for more than it holds cycles through its order.
* `stabilize(n)` (after a rollback): from the next batch boundary the sampler reaches, `n` batches come
  from Q1 only, inside the epoch under way (a prefetching DataLoader delivers them a few batches
  later) and into the next one if this one ends first.
* mode "infobatch" (InfoBatch, Qin et al. 2024): each epoch, examples whose EMA loss is below the mean
  are left out with probability `prune_ratio`; the kept ones get loss weight 1/(1 - prune_ratio)
  (`loss_weights`), so the expected gradient is unchanged; the last `full_data_fraction` of the
  epochs use all data. The plan keeps the dataset's length by cycling through the kept examples.
* mode "uniform": a seeded permutation every epoch (a baseline that keeps the catalog).

The plan depends only on (seed, epoch, catalog), so every process computes the same global order
and Accelerate's per-process split of batches stays disjoint and complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from hf_r8.data.catalog import UNSEEN, LossCatalog

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
                 before_plan: Callable[[], None] | None = None, mode: str = "balanced", prune_ratio: float = 0.5,
                 full_data_fraction: float = 0.125, total_epochs: int = 1,
                 on_plan: Callable[[int, str], None] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.catalog = catalog
        self.batch_size = batch_size
        self.seed = seed
        self.counts = batch_counts(proportions, batch_size)
        self.epoch = 0
        self.stabilize_batches = 0
        self.mode = mode
        self.prune_ratio = prune_ratio
        self.full_data_fraction = full_data_fraction
        self.total_epochs = total_epochs
        self.loss_weights = np.ones(catalog.size, dtype=np.float32)
        """Per-example loss weight of the current epoch (not 1 only for InfoBatch's kept examples)."""
        self.before_plan = before_plan
        """Called (on every process) before an epoch's plan or a stabilization: the trainer applies every
        pending catalog update, so all processes plan from the same catalog."""
        self.on_plan = on_plan
        """Called with (epoch, what kind of plan) when a new epoch plan is made (the trainer logs it)."""
        self._stabilized_until = 0  # the end of the stretch of the plan under way already rewritten by stabilize
        self.current_epoch_plan: tuple[int, np.ndarray] | None = None
        """(epoch, plan) of the epoch under way: saved with checkpoints (with `loss_weights`), so a resumed
        epoch replays its plan."""

    def __len__(self) -> int:
        return self.catalog.size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stabilize(self, batches: int) -> None:
        """The next `batches` batches (from the next batch boundary) come from Q1 only."""
        self.stabilize_batches = batches
        self._stabilized_until = 0  # a new request starts at the next boundary, even inside a rewritten stretch

    def __iter__(self) -> Iterator[int]:
        if self.before_plan is not None:
            self.before_plan()
        saved = self.current_epoch_plan
        if saved is None or saved[0] != self.epoch:
            self.current_epoch_plan = (self.epoch, self.plan().astype(np.int64))
            if self.on_plan is not None:
                self.on_plan(self.epoch, self.describe_plan())
        plan = self.current_epoch_plan[1]
        self._stabilized_until = 0
        for position in range(len(plan)):
            if self.stabilize_batches and position % self.batch_size == 0 and position >= self._stabilized_until:
                self._stabilized_until = self._stabilize_from(plan, position)
            yield int(plan[position])

    def describe_plan(self) -> str:
        """What the current epoch's plan is, in words."""
        if self.epoch == 0:
            return "cataloging epoch, every example once in a seeded order"
        if self.mode == "infobatch" and self.epoch >= self.total_epochs * (1.0 - self.full_data_fraction):
            return "InfoBatch's full-data epochs, a seeded permutation"
        return {"balanced": f"balanced quartiles, {self.counts.tolist()} examples of Q1..Q4 per batch",
                "infobatch": f"InfoBatch, below-mean examples left out with probability {self.prune_ratio}",
                "uniform": "uniform shuffle"}[self.mode]

    def _stabilize_from(self, plan: np.ndarray, position: int) -> int:
        """Overwrite the plan from `position` on with Q1 examples (deterministic: same on every process); returns
        where the overwritten stretch ends. What does not fit before the epoch's end is left for the next epoch.

        The examples it displaces are not visited this epoch (in the cataloging epoch too)."""
        if self.before_plan is not None:
            self.before_plan()  # every catalog update in: all processes draw from the same catalog
        rng = np.random.default_rng([self.seed, self.epoch, position])
        quartiles = self.catalog.quartiles()
        quartiles[quartiles == UNSEEN] = 3
        usage = np.minimum(self.catalog.usage, np.iinfo(np.int16).max).astype(np.int16)
        room = len(plan) - position
        wanted = min(room, self.stabilize_batches * self.batch_size)
        if self.catalog.seen.any():  # before anything is cataloged there is no low-loss quartile
            plan[position:position + wanted] = self._draw(0, quartiles, usage, rng, wanted)
        self.stabilize_batches -= -(-wanted // self.batch_size)
        return position + wanted

    def plan(self) -> np.ndarray:
        """The epoch's order of indices (length = dataset size)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        size = self.catalog.size
        self.loss_weights[:] = 1.0
        if self.epoch == 0 or self.mode == "uniform":
            return rng.permutation(size)
        if self.mode == "infobatch":
            return self._infobatch_plan(rng)
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
        # shuffle inside each batch so quartiles are not in fixed positions
        return rng.permuted(plan, axis=1).reshape(-1)[:size]

    def _infobatch_plan(self, rng: np.random.Generator) -> np.ndarray:
        size, catalog = self.catalog.size, self.catalog
        full_data_from = self.total_epochs * (1.0 - self.full_data_fraction)
        if self.epoch >= full_data_from or not catalog.seen.any():
            return rng.permutation(size)
        well_learned = catalog.seen & (catalog.ema_loss < catalog.ema_loss[catalog.seen].mean())
        pruned = well_learned & (rng.random(size) < self.prune_ratio)
        self.loss_weights[well_learned & ~pruned] = 1.0 / (1.0 - self.prune_ratio)
        return np.resize(rng.permutation(np.flatnonzero(~pruned)), size)

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
