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
    engine.check(step, loss, grad_norm)        the step's verdict: apply (snapshot?), drop, pass, roll back, stop
    engine.roll_back(action, ...) / stop        after a rollback: the controller's brake, low-loss batches, events
    engine.observe(observation)                 the controller learns from the finished step

`state_dict()` holds the decisions' state as plain, JSON-safe data, versioned (`state_versions.py`): the
controller, the rollback policy, whether a range test was under way (a resumed run does without it: its weights
to return to were in RAM), the events. Not in it: the snapshots of the weights (the adapter's, in RAM) and the
data plan's arrays (one row per example: R8Trainer writes them into each checkpoint as `.npz`, R8Loop into its
own `state_dict()`). Pure Python: no torch, no transformers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any, Protocol

from hf_r8.control import state_versions
from hf_r8.control.anneal import EndAnneal, ScheduleAhead
from hf_r8.control.config import R8Config
from hf_r8.control.controller import Controller, GroupSpec, Observation
from hf_r8.control.events import Event, event_log
from hf_r8.control.range_test import LRRangeTest, no_range_test_reason, range_test_length
from hf_r8.control.recovery import RollbackRecovery
from hf_r8.control.rollback import RollbackAction, RollbackPolicy, Verdict


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
        self.recovery = RollbackRecovery()
        self.plan, self.batches_per_step = plan, batches_per_step
        self.events = event_log() if events is None else events
        self.listener = listener

    def record(self, event: Event) -> None:
        self.events.append(event)
        if self.listener is not None:
            self.listener(event)

    # ------------------------------------------------------------------------------ each step
    def lr(self, index: int, schedule_lr: float, step_index: int) -> float:
        """The LR of group `index` at optimizer step `step_index + 1`: during the range test, the group's base LR
        (the LR the user set) times the sweep's gain, whatever the schedule says (a warmup's first values would
        shift the sweep); after it, the controller's `schedule_lr x gain` within bounds, annealed at the end of a
        run whose schedule stays high (decided, and recorded, when the anneal would start)."""
        if self.range_test is not None:
            return self.specs[index].base_lr * self.range_test.gain(step_index)
        if index == 0:
            base_lr = self.specs[0].base_lr
            started = self.anneal.decide(step_index, schedule_lr / base_lr if base_lr > 0 else 1.0)
            if started is not None:
                self.record(started)
        return self.controller.compose_lr(index, schedule_lr, self.lr_factor(step_index))

    def lr_factor(self, step_index: int) -> float:
        """What multiplies schedule x gain at step `step_index + 1`: the recovery after a rollback (in the steps the
        controller has seen) and the end-of-run anneal. A read."""
        return self.recovery.factor(self.controller.step) * self.anneal.factor(step_index)

    def momentum(self, index: int) -> float | None:
        """The momentum to write into group `index`; None: leave it (the rule is off, or a range test runs)."""
        return None if self.range_test is not None else self.controller.momentum(index)

    def observe(self, observation: Observation) -> None:
        """A finished step's signals, for the controller (whose decisions are recorded)."""
        for event in self.controller.observe(observation):
            self.record(event)
        self.recovery.end_if_done(self.controller.step)

    # ------------------------------------------------------------------------------- rollback
    def check(self, step: int, loss: float | None, grad_norm: float | None = None, *,
              weights_finite: Callable[[], bool] | None = None, skipped_by: Callable[[], str | None] | None = None,
              scaler_owns_overflow: bool = False) -> Verdict:
        """Judge step `step` from its loss and gradient norm (all processes'): before it is applied, or right after
        on a host that applies it first (`applied_before_check`). The adapter carries the verdict out.

        Args:
            weights_finite: whether every weight is finite, asked only after a non-finite loss; None: the host
                cannot tell, and an applied non-finite step is taken as damage when rollback is on.
            skipped_by: on a host that applies a step before its check, who skipped a non-finite one itself
                ("the DeepSpeed engine"), or None when it was applied; asked only after a non-finite value.
            scaler_owns_overflow: an fp16 grad scaler will skip a step with non-finite gradients (and lower its
                scale): with a finite loss that is its overflow handling, not a fault.
        """
        config = self.config.rollback
        if not (config.enabled or config.guard_nonfinite):
            return Verdict("apply")  # nothing is checked, as the stock Trainer checks nothing
        fault = self.rollback.guard(loss, grad_norm)
        if fault is not None:
            return self._non_finite(step, loss, fault, weights_finite, skipped_by, scaler_owns_overflow)
        action = self.rollback.observe(step, loss)
        if action is None:
            return Verdict("apply", snapshot=self.rollback.should_snapshot(step))
        if action.kind in ("skip", "record"):  # a first spike: skipped, or already applied and recorded
            applied = action.kind == "record"
            self.record(Event(step, -1, "rollback", "spike" if applied else "skip_step", 1.0,
                              1.0 if applied else 0.0, action.reason, quantity="step_applied"))
            return Verdict("pass" if applied else "drop", action.reason, action)
        return Verdict("stop" if action.kind == "stop" else "roll_back", action.reason, action)

    def _non_finite(self, step: int, loss: float | None, fault: str, weights_finite: Callable[[], bool] | None,
                    skipped_by: Callable[[], str | None] | None, scaler_owns_overflow: bool) -> Verdict:
        """The guard's verdict on a step with a non-finite loss or gradient norm (`fault` says which)."""
        loss_finite = loss is not None and math.isfinite(loss)
        if scaler_owns_overflow and loss_finite:
            return Verdict("pass", f"{fault}: the grad scaler skips the step")
        if not self.rollback.applied_before_check:
            self._skipped(step, f"{fault}: optimizer step skipped")
            if not loss_finite and weights_finite is not None and not weights_finite():
                return self._damage(step, "non-finite weights")
            return Verdict("drop", fault)
        who = skipped_by() if skipped_by is not None else None
        if who is not None:
            self._skipped(step, f"{fault}: {who} skipped the step")
            if not loss_finite and weights_finite is not None and not weights_finite():
                return self._damage(step, "non-finite weights")  # a skip cannot mend weights already damaged
            return Verdict("pass", fault)
        self.rollback.last_anomaly_step = step
        if weights_finite is not None:
            if not weights_finite():
                return self._damage(step, f"{fault} applied: non-finite weights")
            why = "its step was applied and left the weights finite"
        elif self.config.rollback.enabled:
            return self._damage(step, f"{fault} applied")
        else:
            why = "its step was already applied (rollback is off: no state to go back to)"
        self.record(Event(step, -1, "guard", "nonfinite_loss", 1.0, 1.0, f"{fault}: kept from the controller; {why}",
                          quantity="step_applied"))
        return Verdict("pass", fault)

    def _skipped(self, step: int, why: str) -> None:
        self.rollback.record_skip(step)
        self.record(Event(step, -1, "guard", "skip_step", 1.0, 0.0, why, quantity="step_applied"))

    def _damage(self, step: int, reason: str) -> Verdict:
        action = self.rollback.damage(step, reason)
        return Verdict("stop" if action.kind == "stop" else "roll_back", action.reason, action)

    def snapshot_state(self) -> dict[str, Any]:
        """What a snapshot of the weights carries of the engine: the controller, and the spike detector's level
        (restored weights are judged against the loss level they had, not the level reached since)."""
        return {"controller": self.controller.state_dict(), "spike_detector": self.rollback.detector.state_dict(),
                "recovery": self.recovery.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        """Back to a `snapshot_state()`, with the weights it was taken with."""
        self.controller.load_state_dict(state["controller"])
        self.rollback.detector.load_state_dict(state["spike_detector"])
        self.recovery.load_state_dict(state["recovery"])

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
        for event in self.controller.rollback_brake(action.lasting_lr_factor, action.recovery_lr_factor, action.step,
                                                    reason):
            self.record(event)
        self.recovery.begin(action.step, action.stabilize_steps, action.recovery_lr_factor)
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

    def start_range_test(self, steps: int, skips_faults: bool = True) -> None:
        """A test of `steps` steps starts; `skips_faults` says whether the host leaves out the update of a step
        `range_test_loss` calls a fault (the Trainer's sweep does; a loop that reads the loss after its update
        cannot)."""
        self.range_test = LRRangeTest(self.config.range_test, steps, skips_faults)

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
        return {"version": state_versions.ENGINE, "controller": self.controller.state_dict(),
                "initial_gains": [spec.initial_gain for spec in self.specs],
                "range_test_running": self.range_test is not None, "rollback": self.rollback.state_dict(),
                "anneal": self.anneal.state_dict(), "recovery": self.recovery.state_dict(),
                "events": [asdict(event) for event in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output. A state saved during a range test resumes at gain 1 without it (its
        weights to return to were in RAM only); parts an older state lacks start fresh."""
        state_versions.saved_version("engine", state, state_versions.ENGINE)
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
        self.recovery.load_state_dict(state.get("recovery", state["controller"].get("recovery")))  # older: its too
        if state.get("rollback") is not None:
            self.rollback.load_state_dict(state["rollback"])
