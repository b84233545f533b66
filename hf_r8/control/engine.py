"""The engine: one run's decisions and all the state they need, the same under every adapter.

hf_r8 runs in four hosts: a `Trainer` (`R8Callback`, `R8Trainer`), a torch scheduler slot (`AdaptiveScheduler`)
and a loop that asks for its batches (`R8Loop`). Each adapter owns what only it can reach (tensors, the optimizer,
the snapshots of the weights, its host's events) and hands the engine numbers; the engine owns what decides:

* the controller (each parameter group's LR gain and momentum), rebuilt on the gain an LR range test chose;
* the rollback policy (the non-finite guard, spikes, when to snapshot, how hard to back off), with one
  semantics for hosts that check a step before applying it and for those that apply it first;
* the LR range test, while it runs;
* the end-of-run anneal (`anneal.py`), for a schedule that will not decay by itself;
* the data plan's part in a rollback: the next batches from the lowest-loss quartile (`plan`, a sampler);
* the event log (bounded), each event also handed to `listener` (a Trainer run's dashboard and run files).

One step, in the engine's calls (each adapter makes them at its host's moments, see `docs/architecture.md`):

    engine.lr(group, schedule_lr, step_index)   the LR to write: the range test's sweep, or schedule x gain
    engine.rollback.guard / .observe(step, loss) what the step's loss and gradient norm say (skip, roll back)
    engine.roll_back(action, ...) / skip_step    what follows: the controller's brake, low-loss batches, events
    engine.observe(observation)                 the controller learns from the finished step

`state_dict()` holds the decisions' state as plain, JSON-safe data: the controller, the rollback policy, whether
a range test was under way (a resumed run does without it: its weights to return to were in RAM), the events.
Not in it: the snapshots of the weights (the adapter's, in RAM) and the data plan's arrays (one row per example:
R8Trainer writes them into each checkpoint as `.npz`, R8Loop into its own `state_dict()`). Pure Python: no
torch, no transformers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any, Protocol

from hf_r8.control.anneal import EndAnneal, ScheduleAhead
from hf_r8.control.config import R8Config
from hf_r8.control.controller import Controller, GroupSpec, Observation
from hf_r8.control.events import Event, event_log
from hf_r8.control.range_test import LRRangeTest, no_range_test_reason, range_test_length
from hf_r8.control.rollback import RollbackAction, RollbackPolicy


class DataPlan(Protocol):
    """The order of the coming batches (R8's sampler): after a rollback its next batches come from the
    lowest-loss quartile."""

    def stabilize(self, batches: int) -> None: ...


class Engine:
    """One run's controller, rollback policy, range test, data plan and event log (see the module docstring).

    Args:
        config: a validated `R8Config`.
        specs: what the controller needs of each parameter group (base LR, momentum, router or not).
        total_steps: the run's planned optimizer steps; None if unknown.
        warmup_steps: steps during which the controller only gathers signals.
        applied_before_check: the host applies a step before its loss is seen (`R8Loop`, DeepSpeed): a first
            spike is recorded, not skipped (see `RollbackPolicy`).
        plan: the sampler to ask for low-loss batches after a rollback, if the run has one.
        batches_per_step: the plan's batches one optimizer step takes (processes x accumulation).
        events: the log to record into (an `R8Callback` keeps one across its runs); a new bounded one by default.
        listener: called with each event once it is recorded.
        schedule_ahead: the schedule's LR over its peak at any step index, when the host can evaluate it ahead
            (a `LambdaLR`): the anneal leaves a schedule that decays before the end alone.
    """

    def __init__(self, config: R8Config, specs: list[GroupSpec], total_steps: int | None, warmup_steps: int = 0,
                 *, applied_before_check: bool = False, plan: DataPlan | None = None, batches_per_step: int = 1,
                 events: deque[Event] | None = None, listener: Callable[[Event], None] | None = None,
                 schedule_ahead: ScheduleAhead | None = None) -> None:
        self.config, self.specs = config, specs
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.controller = Controller(config, specs, total_steps, warmup_steps)
        self.rollback = RollbackPolicy(config.rollback, applied_before_check=applied_before_check)
        self.range_test: LRRangeTest | None = None
        self.anneal = EndAnneal(config, total_steps, schedule_ahead)
        self.plan, self.batches_per_step = plan, batches_per_step
        self.events = event_log() if events is None else events
        self.listener = listener

    def record(self, event: Event) -> None:
        self.events.append(event)
        if self.listener is not None:
            self.listener(event)

    # ------------------------------------------------------------------------------ each step
    def lr(self, index: int, schedule_lr: float, step_index: int) -> float:
        """The LR of group `index` at optimizer step `step_index + 1`: during the range test, the schedule's LR
        times the sweep's gain; after it, the controller's `schedule_lr x gain` within bounds, annealed at the
        end of a run whose schedule stays high (decided, and recorded, when the anneal would start)."""
        if self.range_test is not None:
            return schedule_lr * self.range_test.gain(step_index)
        if index == 0:
            base_lr = self.specs[0].base_lr
            started = self.anneal.decide(step_index, schedule_lr / base_lr if base_lr > 0 else 1.0)
            if started is not None:
                self.record(started)
        return self.controller.compose_lr(index, schedule_lr, self.anneal.factor(step_index))

    def momentum(self, index: int) -> float | None:
        """The momentum to write into group `index`; None: leave it (the rule is off, or a range test runs)."""
        return None if self.range_test is not None else self.controller.momentum(index)

    def observe(self, observation: Observation) -> None:
        """A finished step's signals, for the controller (whose decisions are recorded)."""
        for event in self.controller.observe(observation):
            self.record(event)

    # ------------------------------------------------------------------------------- rollback
    def skip_step(self, step: int, why: str) -> None:
        """The guard's verdict carried out: step `step` was not applied (`why` says what was non-finite, and who
        skipped it)."""
        self.rollback.record_skip(step)
        self.record(Event(step, -1, "guard", "skip_step", 1.0, 0.0, why, quantity="step_applied"))

    def spike_handled(self, action: RollbackAction) -> None:
        """A first spike: its step skipped ("skip"), or, already applied, recorded ("record")."""
        applied = action.kind == "record"
        self.record(Event(action.step, -1, "rollback", "spike" if applied else "skip_step", 1.0,
                          1.0 if applied else 0.0, action.reason, quantity="step_applied"))

    def snapshot_state(self) -> dict[str, Any]:
        """What a snapshot of the weights carries of the engine: the controller, and the spike detector's level
        (restored weights are judged against the loss level they had, not the level reached since)."""
        return {"controller": self.controller.state_dict(), "spike_detector": self.rollback.detector.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        """Back to a `snapshot_state()`, with the weights it was taken with."""
        self.controller.load_state_dict(state["controller"])
        self.rollback.detector.load_state_dict(state["spike_detector"])

    def roll_back(self, action: RollbackAction, restored_step: int | None, weights_step: int) -> str:
        """After the weights went back to those of `restored_step` (None: there was no snapshot; the weights, of
        `weights_step` updates, are kept): count the lost steps, restart the LR lower and bring it back, ask the
        plan for low-loss batches. Returns the reason, as recorded."""
        if restored_step is not None:
            self.rollback.wasted_steps += weights_step - restored_step
            origin = f"restored the snapshot of step {restored_step}"
        else:
            origin = "no healthy snapshot yet, weights kept"
        reason = (f"{action.reason}: {origin} (rollback {action.attempt} in a row), "
                  f"LR x{action.recovery_lr_factor:.3g} back to x1 over {action.stabilize_steps} steps")
        if action.lasting_lr_factor < 1.0:
            reason += f", gain x{action.lasting_lr_factor:.3g} for good"
        if self.plan is not None and action.stabilize_steps:
            self.plan.stabilize(action.stabilize_steps * self.batches_per_step)
            reason += f", the next {action.stabilize_steps} steps' batches from the lowest-loss quartile"
        for event in self.controller.rollback_brake(action.lasting_lr_factor, action.recovery_lr_factor,
                                                    action.stabilize_steps, action.step, reason):
            self.record(event)
        return reason

    def stop(self, step: int, reason: str, lost_steps: int = 0) -> None:
        """Rollbacks did not help (or there is nothing to roll back to): training stops, the last `lost_steps`
        undone. A run resumed from the state saved now starts a fresh series of rollbacks."""
        self.rollback.wasted_steps += lost_steps
        self.rollback.attempt = 0
        self.record(Event(step, -1, "rollback", "stop", 1.0, 0.0, reason, quantity="training"))

    # ----------------------------------------------------------------------------- range test
    def range_test_length(self) -> int | None:
        """The steps of the range test this run has room for; None when it has none (see `range_test_length`)."""
        return range_test_length(self.config.range_test, self.total_steps)

    def no_range_test_reason(self) -> str | None:
        """Why this run gets no range test (see `range_test.no_range_test_reason`); None when it gets one."""
        return no_range_test_reason(self.config.range_test, self.total_steps)

    def skip_range_test(self, reason: str) -> None:
        """The test is on but this run gets none (`reason`): recorded once, at its start."""
        self.record(Event(0, -1, "range_test", "skip", 1.0, 1.0, reason))

    def reuse_range_test(self, gains: list[float]) -> str:
        """Start from `gains`, which an earlier run's test chose, instead of testing again; returns what was done."""
        self._build_controller(list(gains), self.warmup_steps)
        reason = (f"reused: gain x{gains[0]:.3g}, which the previous train() of this R8Callback found (a sweep on "
                  "the trained model would read its low, flat loss as a reason to cut the LR)")
        self.record(Event(0, -1, "range_test", "reuse", 1.0, gains[0], reason))
        return reason

    def start_range_test(self, steps: int) -> None:
        self.range_test = LRRangeTest(self.config.range_test, steps)

    def range_test_loss(self, step_index: int, loss: float | None) -> bool:
        """The loss of the weights after `step_index` updates of the test; False when it is a fault whose update
        must not be applied (`LRRangeTest.observe`). `range_test.finished` says when the test has seen enough."""
        return self.range_test.observe(step_index, loss)

    def finish_range_test(self, step: int, restored: str) -> float:
        """The weights from before the test are back (`restored` says how): the controller starts over from the
        chosen gain, gathering signals until `step`. Returns the gain."""
        test = self.range_test
        gain = test.chosen_gain()
        self.range_test = None
        self._build_controller([gain] * len(self.specs), max(self.warmup_steps, step))
        self.record(Event(step, -1, "range_test", "rebase", 1.0, gain, test.summary(restored)))
        return gain

    def snapshot_taken(self, step: int) -> dict[str, Any]:
        """A snapshot of the weights after `step` updates is now the one to roll back to; returns what it carries
        of the engine (a range test's snapshot becomes rollback's once the test is over)."""
        self.rollback.snapshot_taken(step)
        return self.snapshot_state()

    def _build_controller(self, initial_gains: list[float], warmup_steps: int) -> None:
        self.specs = [replace(spec, initial_gain=gain) for spec, gain in zip(self.specs, initial_gains, strict=True)]
        self.controller = Controller(self.config, self.specs, self.total_steps, warmup_steps)

    # ---------------------------------------------------------------------------- checkpointing
    def metrics(self) -> dict[str, float]:
        """The controller's and rollback's scalars, for loggers."""
        return {**self.controller.metrics(), **self.rollback.metrics()}

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "initial_gains": [spec.initial_gain for spec in self.specs],
                "range_test_running": self.range_test is not None, "rollback": self.rollback.state_dict(),
                "anneal": self.anneal.state_dict(),
                "events": [asdict(event) for event in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output. A state saved during a range test resumes at gain 1 without it (its
        weights to return to were in RAM only); parts an older state lacks start fresh."""
        self.range_test = None
        if "events" in state:
            self.events.clear()
            self.events.extend(Event(**event) for event in state["events"])
        if state.get("range_test_running"):
            return
        gains = state.get("initial_gains") or [spec.initial_gain for spec in self.specs]
        self._build_controller(gains, self.warmup_steps)
        self.controller.load_state_dict(state["controller"])
        self.anneal.load_state_dict(state.get("anneal", state["controller"]))  # older: the controller's "annealing"
        if state.get("rollback") is not None:
            self.rollback.load_state_dict(state["rollback"])
