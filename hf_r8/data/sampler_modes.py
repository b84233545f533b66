"""Sampler modes by name: how `BalancedQuartileSampler` orders an epoch after the cataloging epoch.

A mode is a small class with two methods: `plan` (the epoch's order of example indices, and any loss weights)
and `describe` (that plan in words, for the log). Both read a `PlanContext`, what the sampler knows of the epoch,
and return; the sampler applies the plan. The built-ins:

* "balanced": each batch takes `counts[q]` examples from loss quartile q (Q1 lowest loss ... Q4 highest;
  examples never seen count as Q4, the least known), the least-used first (`draw_least_used`);
* "infobatch" (InfoBatch, Qin et al. 2024): examples whose EMA loss is below the mean are left out with
  probability `prune_ratio`, the kept ones get loss weight 1/(1 - prune_ratio) so the expected gradient is
  unchanged; the last `full_data_fraction` of the epochs use all data;
* "uniform": a seeded permutation (a baseline that keeps the catalog).

`register_sampler_mode("my_mode", MyMode)` adds one; `R8Config.sampler.mode` and the sampler's `mode` name
it. A plan may depend only on the sampler's seeded generator and the catalog, so every process computes
the same global order. Numpy only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from hf_r8.control.registry import Registry
from hf_r8.data.catalog import UNSEEN, LossCatalog


@dataclass(frozen=True)
class PlanContext:
    """What a mode may read to plan an epoch (the catalog is the sampler's: read it, never write it)."""

    catalog: LossCatalog
    batch_size: int
    counts: np.ndarray
    """Examples per loss quartile in one batch (from `sampler.proportions`)."""
    epoch: int
    total_epochs: int
    prune_ratio: float
    full_data_fraction: float


@dataclass(frozen=True)
class EpochPlan:
    """An epoch's order of example indices (as many as the dataset has) and, where not all 1, each example's
    loss weight for the epoch."""

    order: np.ndarray
    loss_weights: np.ndarray | None = None


class SamplerMode(ABC):
    """One way of ordering an epoch: subclass it, implement `plan` and `describe`, register it by name.

    One instance serves one sampler, and reads what it needs from the `PlanContext` it is handed.
    """

    @abstractmethod
    def plan(self, context: PlanContext, rng: np.random.Generator) -> EpochPlan:
        """The epoch's plan, drawn with `rng` (seeded by seed and epoch)."""

    @abstractmethod
    def describe(self, context: PlanContext) -> str:
        """What this epoch's plan is, in words."""


def quartiles_and_usage(catalog: LossCatalog) -> tuple[np.ndarray, np.ndarray]:
    """Each example's loss quartile (never seen: Q4) and its usage count, ready for `draw_least_used`.

    int16 usage lets numpy's stable sort run as a radix sort: a 10M-example plan stays fast.
    """
    quartiles = catalog.quartiles()
    quartiles[quartiles == UNSEEN] = 3
    return quartiles, np.minimum(catalog.usage, np.iinfo(np.int16).max).astype(np.int16)


def draw_least_used(quartile: int, quartiles: np.ndarray, usage: np.ndarray, rng: np.random.Generator,
                    needed: int) -> np.ndarray:
    """`needed` members of a quartile: least used first, ties in random order, cycling if short."""
    members = np.flatnonzero(quartiles == quartile)
    if members.size == 0:  # an empty quartile lends its share to the nearest non-empty one
        populated = np.unique(quartiles)
        members = np.flatnonzero(quartiles == populated[np.argmin(np.abs(populated - quartile))])
    shuffled = rng.permutation(members)
    order = shuffled[np.argsort(usage[shuffled], kind="stable")]
    return np.resize(order, needed)


class BalancedMode(SamplerMode):
    """Every batch mixes the loss quartiles in the sampler's fixed `counts`; within a quartile the least used come
    first, ties broken at random; a quartile asked for more than it holds cycles through its order."""

    def plan(self, context: PlanContext, rng: np.random.Generator) -> EpochPlan:
        size = context.catalog.size
        quartiles, usage = quartiles_and_usage(context.catalog)
        batches = -(-size // context.batch_size)
        columns = []
        for quartile, count in enumerate(context.counts):
            if count == 0:
                continue
            columns.append(draw_least_used(quartile, quartiles, usage, rng, count * batches).reshape(batches, count))
        plan = np.concatenate(columns, axis=1)
        # shuffle inside each batch so quartiles are not in fixed positions
        return EpochPlan(rng.permuted(plan, axis=1).reshape(-1)[:size])

    def describe(self, context: PlanContext) -> str:
        return f"balanced quartiles, {context.counts.tolist()} examples of Q1..Q4 per batch"


class InfoBatchMode(SamplerMode):
    """InfoBatch: prune well-learned examples at random and rescale the kept ones' loss; full data at the end.

    The plan keeps the dataset's length by cycling through the kept examples.
    """

    def plan(self, context: PlanContext, rng: np.random.Generator) -> EpochPlan:
        size, catalog = context.catalog.size, context.catalog
        if self._full_data(context) or not catalog.seen.any():
            return EpochPlan(rng.permutation(size))
        well_learned = catalog.seen & (catalog.ema_loss < catalog.ema_loss[catalog.seen].mean())
        pruned = well_learned & (rng.random(size) < context.prune_ratio)
        loss_weights = np.ones(size, dtype=np.float32)
        loss_weights[well_learned & ~pruned] = 1.0 / (1.0 - context.prune_ratio)
        return EpochPlan(np.resize(rng.permutation(np.flatnonzero(~pruned)), size), loss_weights)

    def describe(self, context: PlanContext) -> str:
        if self._full_data(context):
            return "InfoBatch's full-data epochs, a seeded permutation"
        return f"InfoBatch, below-mean examples left out with probability {context.prune_ratio}"

    @staticmethod
    def _full_data(context: PlanContext) -> bool:
        """Whether the epoch is one of the last `full_data_fraction` of the planned epochs."""
        return context.epoch >= context.total_epochs * (1.0 - context.full_data_fraction)


class UniformMode(SamplerMode):
    """A fresh seeded permutation every epoch."""

    def plan(self, context: PlanContext, rng: np.random.Generator) -> EpochPlan:
        return EpochPlan(rng.permutation(context.catalog.size))

    def describe(self, context: PlanContext) -> str:
        return "uniform shuffle"


SAMPLER_MODES: Registry[SamplerMode] = Registry(
    "sampler.mode",
    SamplerMode,
    {"balanced": BalancedMode, "infobatch": InfoBatchMode, "uniform": UniformMode},
    register_with="hf_r8.data.sampler_modes.register_sampler_mode",
)


def register_sampler_mode(name: str, mode: type[SamplerMode]) -> None:
    """Make `mode` (a subclass of `SamplerMode`) available as `name` for `sampler.mode`.

    A built-in name is refused; a name registered again is replaced (a notebook cell may run twice).
    """
    SAMPLER_MODES.register(name, mode)


def registered_sampler_modes() -> tuple[str, ...]:
    """The names `sampler.mode` may take: the built-ins, then the user's in the order they were registered."""
    return SAMPLER_MODES.names()
