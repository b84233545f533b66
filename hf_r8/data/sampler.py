"""The train sampler: a cataloging epoch, then epochs planned by its mode (by default, balanced loss quartiles:
every batch mixes easy and hard examples in fixed proportions).

* Epoch 0 is the **cataloging epoch**: a seeded permutation that visits every example once.
* Later epochs follow the sampler's mode, a class looked up by name (sampler_modes.py): "balanced"
  (the default) takes `counts[q]` examples from loss quartile q in each batch of `batch_size`, with
  counts from `proportions` by largest remainder; "infobatch" prunes well-learned examples and
  reweights the kept ones (`loss_weights`); "uniform" shuffles; `register_sampler_mode` adds others.
* `stabilize(n)` (after a rollback): from the next batch boundary the sampler reaches, `n` batches come
  from Q1 only, inside the epoch under way (a prefetching DataLoader delivers them a few batches
  later) and into the next one if this one ends first.

The plan depends only on (seed, epoch, catalog), so every process computes the same global order
and Accelerate's per-process split of batches stays disjoint and complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from hf_r8.control import state_versions
from hf_r8.data.catalog import LossCatalog
from hf_r8.data.sampler_modes import SAMPLER_MODES, PlanContext, draw_least_used, quartiles_and_usage

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
    """Yields example indices; consecutive runs of `batch_size` form the batches of the epoch's plan.

    `mode` names a registered sampler mode; an unknown name raises a ValueError listing the registered ones.
    """

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
        self.planner = SAMPLER_MODES.get(mode)()
        """The mode's instance, which plans every epoch after the cataloging one."""
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
        self._resume_position = 0  # where the next iteration starts in the epoch's plan (see resume_at)
        self._position = 0  # the next position of the epoch's plan to yield
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

    def resume_at(self, position: int) -> None:
        """The next iteration replays the epoch's plan from `position`: the examples before it were taken before
        the run was saved (a stabilization under way goes on where it was)."""
        self._resume_position = position

    def __iter__(self) -> Iterator[int]:
        if self.before_plan is not None:
            self.before_plan()
        saved = self.current_epoch_plan
        if saved is None or saved[0] != self.epoch:
            self.current_epoch_plan = (self.epoch, self.plan().astype(np.int64))
            self._stabilized_until = 0
            if self.on_plan is not None:
                self.on_plan(self.epoch, self.describe_plan())
        plan = self.current_epoch_plan[1]
        start, self._resume_position = self._resume_position, 0
        # A pass over the same plan again (a resumed run's replay, the range test's pass) leaves the stretch
        # already rewritten as it is: a stabilization still to come starts past it.
        for position in range(start, len(plan)):
            if self.stabilize_batches and position % self.batch_size == 0 and position >= self._stabilized_until:
                self._stabilized_until = self._stabilize_from(plan, position)
            self._position = position + 1
            yield int(plan[position])

    def state_dict(self) -> dict[str, Any]:
        """The epoch, its plan (as rewritten by stabilizations so far), its loss weights, how far into it the
        sampler has yielded and any stabilization still to come: a resumed run takes the same batches, whether it
        starts at its position (`resume_at`) or replays the plan from its start (Accelerate's skipped batches)."""
        plan_epoch, plan = self.current_epoch_plan if self.current_epoch_plan is not None else (-1, None)
        return {"version": state_versions.SAMPLER, "epoch": self.epoch, "plan_epoch": plan_epoch,
                "plan": None if plan is None else plan.copy(), "loss_weights": self.loss_weights.copy(),
                "stabilize_batches": self.stabilize_batches, "stabilized_until": self._stabilized_until,
                "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from `state_dict()`'s output (or an unversioned plan file's: epoch, plan and loss weights). A
        stabilization still to come starts where the saved sampler had got to, as it would have gone on."""
        state_versions.saved_version("sampler plan", state, state_versions.SAMPLER)
        self.epoch = int(state["epoch"])
        plan = state.get("plan")
        plan_epoch = int(state.get("plan_epoch", self.epoch))
        self.current_epoch_plan = None if plan is None else (plan_epoch, np.array(plan, dtype=np.int64))
        self.loss_weights[:] = state["loss_weights"]
        self.stabilize_batches = int(state.get("stabilize_batches", 0))
        self._position = int(state.get("position", 0))
        self._stabilized_until = max(int(state.get("stabilized_until", 0)), self._position)

    def describe_plan(self) -> str:
        """What the current epoch's plan is, in words."""
        if self.epoch == 0:
            return "cataloging epoch, every example once in a seeded order"
        return self.planner.describe(self.plan_context())

    def _stabilize_from(self, plan: np.ndarray, position: int) -> int:
        """Overwrite the plan from `position` on with Q1 examples (deterministic: same on every process); returns
        where the overwritten stretch ends. What does not fit before the epoch's end is left for the next epoch.

        The examples it displaces are not visited this epoch (in the cataloging epoch too)."""
        if self.before_plan is not None:
            self.before_plan()  # every catalog update in: all processes draw from the same catalog
        rng = np.random.default_rng([self.seed, self.epoch, position])
        quartiles, usage = quartiles_and_usage(self.catalog)
        room = len(plan) - position
        wanted = min(room, self.stabilize_batches * self.batch_size)
        if self.catalog.seen.any():  # before anything is cataloged there is no low-loss quartile
            plan[position:position + wanted] = draw_least_used(0, quartiles, usage, rng, wanted)
        self.stabilize_batches -= -(-wanted // self.batch_size)
        return position + wanted

    def plan(self) -> np.ndarray:
        """The epoch's order of indices (length = dataset size): a seeded permutation in the cataloging epoch,
        then the mode's plan."""
        rng = np.random.default_rng([self.seed, self.epoch])
        self.loss_weights[:] = 1.0
        if self.epoch == 0:
            return rng.permutation(self.catalog.size)
        planned = self.planner.plan(self.plan_context(), rng)
        if len(planned.order) != self.catalog.size:
            raise ValueError(f"sampler mode {self.mode!r} planned {len(planned.order)} indices for "
                             f"{self.catalog.size} examples: a plan orders every example once (or cycles to that "
                             "length)")
        if planned.loss_weights is not None:
            self.loss_weights[:] = planned.loss_weights
        return planned.order

    def plan_context(self) -> PlanContext:
        """What the mode reads to plan (and describe) the epoch under way."""
        return PlanContext(self.catalog, self.batch_size, self.counts, self.epoch, self.total_epochs,
                           self.prune_ratio, self.full_data_fraction)
