"""`R8Loop`: hf_r8 for a loop that asks for its next batch (no Trainer, no DataLoader of ours needed).

    with R8Loop(len(dataset), batch_size=32, base_lr=1e-3, num_epochs=3, save=save, load=load) as loop:
        for epoch in loop.epochs():
            for indices, lr in loop.batches():
                set_lr(optimizer, lr)
                losses = per_example_loss(model, dataset[indices])   # or just the batch loss
                losses.mean().backward(); optimizer.step(); optimizer.zero_grad()
                loop.report(losses.mean(), per_example_losses=losses)

The same parts as `R8Trainer`, thinly wired: the loss catalog and the quartile-balanced sampler choose the
indices (the first epoch visits every index once), and the engine (`control/engine.py`, the one every adapter
runs) chooses the LR with its controller and judges each reported loss with its rollback policy. A reported
loss is staged without waiting (tensors are copied to the host asynchronously) and consumed when the next
batch is asked for, so the LR of step t+1 reacts to step t and nothing forces a device sync. Rollback goes
through the user's callables: `save()` returns a state (weights, optimizer...) taken every
`rollback.every_steps` healthy steps (or handed over with `snapshot(state)`), and `load(state)` puts it back
when a NaN or repeated spikes say the weights are damaged; then the LR restarts lower and the next batches
come from the lowest-loss quartile. Since the step of a reported loss has already been applied, a single spike
cannot be skipped: it is recorded. With `rollback.enabled` off, as under `R8Callback`, nothing is rolled back
and training goes on: a non-finite loss is recorded and kept from the controller while
`rollback.guard_nonfinite` is on (to skip its step as well, leave out `optimizer.step()` when the loss is not
finite: R8Loop sees the loss only after the step), and reaches the controller, whose brake lowers the LR, when
the guard is off too.

With save/load given, the default's LR range test runs first, as under the Trainer: the state `save()`
returns before the first batch is the one to go back to (and rollback's first snapshot), the batches of
the test come with the sweep's LRs, then `load()` puts that state back and the gain the test chose
becomes the base.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch

from hf_r8.control import state_versions
from hf_r8.control.controller import Controller, GroupSpec
from hf_r8.control.engine import Engine
from hf_r8.control.events import Event
from hf_r8.control.hypergradient import measures_update_alignment
from hf_r8.control.resolve import ConfigLike, resolve_config
from hf_r8.control.rollback import RollbackAction, RollbackPolicy
from hf_r8.data.catalog import LossCatalog
from hf_r8.data.sampler import BalancedQuartileSampler
from hf_r8.integrations.scheduler import one_value
from hf_r8.runtime.host_copy import HostCopy
from hf_r8.runtime.signal_packing import pack_signals
from hf_r8.runtime.signal_stage import SignalStage
from hf_r8.ui.dashboard import Dashboard, DashboardView, show_event


class R8Loop:
    """Indices and LR for each batch; losses back through `report`.

    Args:
        num_samples: dataset size (>= 1).
        batch_size: examples per batch (>= 1).
        config: an `R8Config`, its dict form, a preset name or a YAML path (default: the `default` preset); its
            `sampler`, `rollback` and LR rules apply.
        base_lr: the LR the gain multiplies.
        num_epochs: how many epochs `epochs()` yields (sizes the statistics window too).
        seed: the sampler's seed.
        save: returns a state to roll back to (called at snapshot time); None: rollback needs `snapshot()`.
        load: puts a state from `save`/`snapshot` back.
        dashboard: show the live dashboard (default: `config.dashboard`).
    """

    def __init__(self, num_samples: int, batch_size: int, config: ConfigLike = None, *, base_lr: float = 1e-3,
                 num_epochs: int = 1, seed: int = 0, save: Callable[[], Any] | None = None,
                 load: Callable[[Any], None] | None = None, dashboard: bool | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
        if not (isinstance(base_lr, (int, float)) and math.isfinite(base_lr) and base_lr > 0):
            raise ValueError(f"base_lr={base_lr!r}: must be a finite number > 0")
        if isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 1:
            raise ValueError(f"num_epochs={num_epochs!r}: must be an integer >= 1")
        self.config = resolve_config(config)
        if measures_update_alignment(self.config):
            raise ValueError("rules: 'hypergradient' reads the optimizer's last update, and R8Loop is given losses "
                             "only: use AdaptiveScheduler or R8Callback for it, or leave it out of rules")
        sampler_config = self.config.sampler
        self.catalog = LossCatalog(num_samples, alpha=sampler_config.catalog_alpha)
        self.sampler = BalancedQuartileSampler(self.catalog, batch_size, seed=seed,
                                               proportions=sampler_config.proportions, mode=sampler_config.mode,
                                               prune_ratio=sampler_config.prune_ratio,
                                               full_data_fraction=sampler_config.full_data_fraction,
                                               total_epochs=num_epochs)
        self.batch_size, self.base_lr, self.num_epochs = batch_size, float(base_lr), num_epochs
        self.total_steps = num_epochs * math.ceil(num_samples / batch_size)
        # report() follows the step: its loss is seen after the step was applied.
        self.engine = Engine(self.config, [GroupSpec(self.base_lr)], self.total_steps, applied_before_check=True,
                             plan=self.sampler, listener=self._show,
                             schedule_ahead=lambda step_index: 1.0)  # the loop's schedule is base_lr throughout
        self.events = self.engine.events
        """The decisions, rollbacks and the range test's choice so far (the last 10,000), oldest first."""
        length = self.engine.range_test_length() if save and load else None
        if length is not None:
            self.engine.start_range_test(length, skips_faults=False)  # report() comes after the update
        self.save, self.load = save, load
        self.step = 0
        self.stopped = False
        self._epoch = 0  # the epoch under way
        self._batches_taken = 0  # of its plan, so far
        self._batch: np.ndarray | None = None
        self._stage = SignalStage()
        self._staged_batch: tuple[np.ndarray, HostCopy | None] | None = None
        """The reported batch's indices and per-example losses (on their way to the host), with the stage."""
        self._snapshot: tuple[int, Any, dict[str, Any]] | None = None
        """(step, the state save() returned, what the engine needs with it) to roll back to."""
        self._view = DashboardView(max_steps=self.total_steps)
        show = self.config.dashboard if dashboard is None else dashboard
        self._dashboard = Dashboard() if show else None
        if self._dashboard is not None:
            self._dashboard.start(self._view)

    @property
    def controller(self) -> Controller:
        """The engine's controller (rebuilt when the range test ends)."""
        return self.engine.controller

    @property
    def rollback(self) -> RollbackPolicy:
        """The engine's rollback policy, with its counts (`rollbacks`, `skipped_steps`, `wasted_steps`)."""
        return self.engine.rollback

    # --------------------------------------------------------------------------------- iteration
    def epochs(self) -> Iterator[int]:
        """The epochs to run, from the one under way (after `load_state_dict`, the one the state was saved in)."""
        for epoch in range(self._epoch, self.num_epochs):
            if self.stopped:
                return
            if epoch != self._epoch:  # a new epoch: its plan starts at its first batch
                self._epoch, self._batches_taken = epoch, 0
            self.sampler.set_epoch(epoch)
            yield epoch
        self._epoch, self._batches_taken = self.num_epochs, 0

    def batches(self) -> Iterator[tuple[np.ndarray, float]]:
        """This epoch's batches, from the first one not taken yet: (indices, LR to use). Ends early when rollback
        says stop."""
        self.sampler.resume_at(self._batches_taken * self.batch_size)
        order = iter(self.sampler)  # planned at the first batch: after the previous epoch's last report
        while True:
            self._consume()  # before drawing: a rollback's low-loss batches start with this one
            if self.stopped:
                return
            indices = np.fromiter(islice(order, self.batch_size), dtype=np.int64)
            if len(indices) == 0:
                return
            self._batch = indices
            self._batches_taken += 1
            if self.engine.range_test is not None and self._snapshot is None:
                self.snapshot(self.save())  # before the test's first batch: the state to come back to
            yield indices, self.engine.lr(0, self.base_lr, self.step)

    def report(self, loss: Any, per_example_losses: Any = None) -> None:
        """The batch's loss (a number, a tensor, or one value per example: their mean) and, if known, each
        example's loss (same order as the indices)."""
        if self._batch is None:
            raise RuntimeError("report() without a batch: ask for one with batches() first")
        self.step += 1
        losses = None
        if per_example_losses is not None:
            losses = torch.as_tensor(per_example_losses).detach().float().reshape(-1)
            if losses.numel() != len(self._batch):
                raise ValueError(f"per_example_losses has {losses.numel()} values for a batch of {len(self._batch)}")
            losses = HostCopy(losses)
        loss = one_value("loss", loss)  # per-example losses: their mean
        self._stage.stage(self.step, pack_signals(None, loss=loss))
        self._staged_batch = (self._batch, losses)
        self._batch = None

    def snapshot(self, state: Any) -> None:
        """Hold `state` as the state to roll back to (instead of, or besides, `save`)."""
        self._consume()
        self._snapshot = (self.step, state, self.engine.snapshot_taken(self.step))

    # ------------------------------------------------------------------------------- the wiring
    def _consume(self) -> None:
        observation = self._stage.take()
        if observation is None:
            return
        step, loss = observation.step, observation.loss
        indices, losses_copy = self._staged_batch
        self._staged_batch = None
        if losses_copy is not None:
            self.catalog.update_exact(indices, losses_copy.result().numpy(), step)
        elif math.isfinite(loss):
            self.catalog.update_surprise(indices, loss, step)
        engine = self.engine
        if engine.range_test is not None:
            engine.range_test_loss(step - 1, loss)  # the loss of the weights after step - 1 updates
            if engine.range_test.finished:
                self._finish_range_test()
            return
        verdict = engine.check(step, loss)  # the step is applied: a spike is recorded, damage rolled back
        if verdict.kind in ("roll_back", "stop"):
            self._roll_back(verdict.action)
            return
        if verdict.observed:
            engine.observe(observation)
            if verdict.snapshot and self.save is not None:
                self.snapshot(self.save())
        self._update_view(loss)

    def _roll_back(self, action: RollbackAction) -> None:
        if action.kind == "stop" or self._snapshot is None or self.load is None:
            self.stopped = True
            why = "no state to roll back to (pass save/load or call snapshot())" if action.kind != "stop" else ""
            self.engine.stop(action.step, f"{action.reason}; {why or 'training stops'}")
            return
        step, state, engine_state = self._snapshot
        self.load(state)
        self.engine.restore(engine_state)
        self.engine.roll_back(action, step, action.step)

    def _finish_range_test(self) -> None:
        """Put the state from before the test back (`load`) and rebase the engine on the chosen gain."""
        _, state, _ = self._snapshot
        self.load(state)
        self.engine.finish_range_test(self.step, "state restored with load()")
        # Rollback's snapshot now stands for the weights training goes on from, at this step, with this controller.
        self._snapshot = (self.step, state, self.engine.snapshot_taken(self.step))

    def _show(self, event: Event) -> None:
        show_event(self._view, self._dashboard, event)

    def _update_view(self, loss: float) -> None:
        view = self._view
        controller = self.controller
        view.step, view.loss, view.loss_ema = self.step, loss, controller.loss.ema.value
        view.lr = controller.compose_lr(0, self.base_lr, self.engine.lr_factor(self.step))
        view.base_lr, view.gain = self.base_lr, controller.lr_gain(0)
        view.rollbacks, view.skipped_steps = self.rollback.rollbacks, self.rollback.skipped_steps
        view.losses.append(loss)
        if self._dashboard is not None:
            self._dashboard.update(view)

    # ---------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """What the loop needs to go on exactly where it is (call it after a `report()`, before the next batch; the
        last report is applied first): the engine's state (controller, rollback policy, events), the catalog, the
        sampler's plan and the position in it. Save it with your weights and optimizer: `torch.save`, and
        `torch.load` with its default `weights_only=True`, take it (numbers, strings and tensors). Not in it: the
        state `save()` returned, which your own checkpoint holds; a resumed loop rolls back to the snapshots it
        takes from then on."""
        self._consume()
        return {"version": state_versions.LOOP, "num_samples": self.catalog.size, "batch_size": self.batch_size,
                "step": self.step, "stopped": self.stopped, "epoch": self._epoch, "batches_taken": self._batches_taken,
                "engine": self.engine.state_dict(), "catalog": _as_tensors(self.catalog.state_dict()),
                "sampler": _as_tensors(self.sampler.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from `state_dict()`'s output: `epochs()` starts at the epoch under way and `batches()` at the
        batch after the last one reported (a loop of the same dataset size and batch size)."""
        state_versions.saved_version("R8Loop", state, state_versions.LOOP)
        if state["num_samples"] != self.catalog.size:
            raise ValueError(f"the state was saved by a loop over {state['num_samples']} examples; this one has "
                             f"num_samples={self.catalog.size}")
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"the state was saved with batch_size={state['batch_size']}; this loop has "
                             f"batch_size={self.batch_size}")
        self.engine.load_state_dict(state["engine"])
        self.catalog.load_state_dict(state["catalog"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.stopped = state["step"], state["stopped"]
        self._epoch, self._batches_taken = state["epoch"], state["batches_taken"]
        self._batch = self._staged_batch = self._snapshot = None
        self._stage.discard()

    # ------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Consume the last report and stop the dashboard."""
        self._consume()
        if self._dashboard is not None:
            self._dashboard.stop(self._view)
            self._dashboard = None

    def __enter__(self) -> R8Loop:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _as_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """Numpy arrays as tensors (sharing memory), which `torch.load(weights_only=True)` reads back."""
    return {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for key, value in state.items()}
