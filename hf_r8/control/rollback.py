"""When to skip a step, when to snapshot, when to roll back and how hard to back off (no torch here).

The callback (`callback.py`) owns the tensors; this module only reads numbers and says what to do:

* `guard(loss, grad_norm)`: a non-finite value of the step about to be applied means "skip it".
* `observe(step, loss)`: each step's loss (reduced across processes), read before the step is
  applied. A spike, a loss far above the level of the recent healthy ones, first skips its step:
  the weights that produced it have not been touched by it, and one bad batch is the likely
  cause. A spike again at the next step means the weights themselves are damaged: roll back.
* `should_snapshot(step)`: every `every_steps`, once `healthy_steps` anomaly-free steps have
  passed and no stabilization is under way, so a snapshot is never of a model already in trouble.
* Each rollback starts the LR at `lr_cut` x and brings it back over the stabilization, which feeds
  `stabilize_steps` * 2**(n-1) low-loss batches. Rollbacks in a row (no snapshot taken long after
  the last one) back off: the n-th also cuts the gain for good by `lr_cut`**(n-1), and after
  `max_consecutive` of them the answer is "stop". A single bad batch thus costs a few steps and
  no lasting LR; a run whose LR is too high for it loses LR until it holds.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from hf_r8.control.config import RollbackConfig
from hf_r8.control.signals import ema_step, setback

_EMA_BETA = 0.9


@dataclass
class RollbackAction:
    """What to do about a spike or damage seen at `step`: "skip" the step, "rollback" or "stop"; "record" a
    spike whose step was applied before its loss was seen (nothing left to skip)."""

    kind: str
    reason: str
    step: int
    lasting_lr_factor: float = 1.0
    recovery_lr_factor: float = 1.0
    stabilize_steps: int = 0
    attempt: int = 0


@dataclass(frozen=True)
class Verdict:
    """`Engine.check`'s judgement of one step, which the adapter carries out.

    kind:
        "apply": the step is applied and the controller learns from it; with `snapshot`, the weights are
            healthy and due for a snapshot (those the step starts from, or, on a host that applies a step
            before its check, those it left).
        "drop": the step must not be applied: the adapter drops its gradients.
        "pass": nothing to carry out, and the controller does not learn from the step: the host skipped it
            (the fp16 grad scaler, DeepSpeed's overflow check) or had applied it already (recorded).
        "roll_back", "stop": restore a snapshot (`action.attempt` snapshots back) and go on from it, or stop.
    """

    kind: str
    reason: str = ""
    action: RollbackAction | None = None
    snapshot: bool = False

    @property
    def observed(self) -> bool:
        """Whether the controller learns from the step's signals (a step not applied says nothing of the LR)."""
        return self.kind == "apply"


class SpikeDetector:
    """Is a loss far above the current level of the recent healthy losses?

    The level is their EMA (it follows a falling loss, where a window mean lags above it); the
    spread is the noise around that trend, estimated from step-to-step differences (std / sqrt(2)),
    so a loss that is still falling fast does not hide a spike behind its own trend. Far above the
    noise, or far above the level, is not enough on its own: a spike must also undo a real share
    (`spike_min_setback`) of the progress since the first loss. A loss near zero is a mean over a
    few hard examples, and its ratio to the level says nothing about damage.
    """

    def __init__(self, config: RollbackConfig) -> None:
        self.config = config
        self.recent: deque[float] = deque(maxlen=config.window)
        self.ema: float | None = None
        self.first_loss: float | None = None

    def spike_reason(self, loss: float) -> str | None:
        config = self.config
        if len(self.recent) < config.min_history or self.ema is None:
            return None
        values = list(self.recent)
        steps = [after - before for before, after in zip(values, values[1:], strict=False)]
        mean_step = math.fsum(steps) / len(steps)
        noise = math.sqrt(math.fsum((step - mean_step) ** 2 for step in steps) / max(1, len(steps) - 1) / 2.0)
        spread = max(noise, 0.01 * abs(self.ema), 1e-12)  # a flat window does not make every wiggle a spike
        if setback(loss, self.ema, self.first_loss) < config.spike_min_setback:
            return None
        z = (loss - self.ema) / spread
        if z > config.spike_z:
            return f"loss {loss:.4g} is {z:.1f} noise standard deviations above its level {self.ema:.4g}"
        if self.ema > 0 and loss > config.spike_ratio * self.ema:
            return f"loss {loss:.4g} is {loss / self.ema:.1f}x its EMA {self.ema:.4g}"
        return None

    def accept(self, loss: float) -> None:
        self.recent.append(loss)
        self.ema = ema_step(self.ema, loss, _EMA_BETA)
        if self.first_loss is None:
            self.first_loss = loss

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "ema": self.ema, "first_loss": self.first_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(state["recent"], maxlen=self.config.window)
        self.ema = state["ema"]
        self.first_loss = state.get("first_loss", state["ema"])  # saved before the setback test: its level


class RollbackPolicy:
    """The decisions of the non-finite guard and of rollback, with the counts that reach the logs.

    Args:
        config: the `rollback` section.
        applied_before_check: the host applies a step before its loss is seen (R8Loop: the user steps, then
            reports; DeepSpeed: the engine steps inside backward). A first spike cannot be skipped there, only
            recorded; a second in a row still rolls back.
    """

    def __init__(self, config: RollbackConfig, applied_before_check: bool = False) -> None:
        self.config = config
        self.applied_before_check = applied_before_check
        self.detector = SpikeDetector(config)
        self.last_anomaly_step = 0
        self.last_damage_step: int | None = None
        self.last_snapshot_step: int | None = None
        self.stabilize_until = -1
        self.attempt = 0
        """Rollbacks in a row: reset by a snapshot taken 2 x every_steps after the last damage."""
        self.rollbacks = 0
        self.skipped_steps = 0
        self.wasted_steps = 0
        self.spike_skipped_at: int | None = None

    def guard(self, loss: float | None, grad_norm: float | None) -> str | None:
        """What is non-finite in the step about to be applied ("non-finite loss nan"), which must not be
        applied; None when nothing is (or the guard is off)."""
        if not self.config.guard_nonfinite:
            return None
        bad = [f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
               if value is not None and not math.isfinite(value)]
        return f"non-finite {' and '.join(bad)}" if bad else None

    def record_skip(self, step: int) -> None:
        self.skipped_steps += 1
        self.last_anomaly_step = step

    def observe(self, step: int, loss: float | None) -> RollbackAction | None:
        """The loss of the step about to be applied: a healthy one joins the window, a spike skips its
        step, and a spike right after a skipped one is damage (`damage`)."""
        if loss is None:
            return None
        if not math.isfinite(loss):
            self.last_anomaly_step = step
            if self.config.guard_nonfinite:
                return None  # its step was skipped by the guard; the weights are checked there
            return self.damage(step, f"non-finite loss {loss}")
        reason = self.detector.spike_reason(loss)
        if reason is None:
            if step > self.stabilize_until:  # the stabilization's lowest-loss batches would set a false level
                self.detector.accept(loss)
            return None
        self.last_anomaly_step = step
        if not self.config.enabled:
            return None
        if self.spike_skipped_at == step - 1:
            return self.damage(step, f"{reason}, the second spike in a row")
        self.spike_skipped_at = step
        if self.applied_before_check:
            return RollbackAction("record", f"{reason}: its step was already applied (a second spike in a row "
                                  "rolls back)", step)
        self.skipped_steps += 1
        return RollbackAction("skip", f"{reason}: optimizer step skipped (a second spike in a row rolls back)", step)

    def damage(self, step: int, reason: str) -> RollbackAction:
        """Damage seen at `step` (a spike, non-finite weights): the rollback to take, or stop."""
        self.last_anomaly_step = self.last_damage_step = step
        config = self.config
        if self.attempt >= config.max_consecutive:
            return RollbackAction("stop", f"{reason}; {self.attempt} rollbacks in a row did not help: "
                                  "training stops", step, attempt=self.attempt)
        self.attempt += 1
        self.rollbacks += 1
        stabilize = config.stabilize_steps * 2 ** (self.attempt - 1)
        self.stabilize_until = step + stabilize
        return RollbackAction("rollback", reason, step, lasting_lr_factor=config.lr_cut ** (self.attempt - 1),
                              recovery_lr_factor=config.lr_cut, stabilize_steps=stabilize, attempt=self.attempt)

    def should_snapshot(self, step: int) -> bool:
        config = self.config
        return (config.enabled and step - self.last_anomaly_step >= config.healthy_steps
                and step >= self.stabilize_until
                and (self.last_snapshot_step is None or step - self.last_snapshot_step >= config.every_steps))

    def snapshot_taken(self, step: int) -> None:
        """A snapshot of the weights after `step` updates is the one to roll back to. One of the weights before the
        first update (the LR range test's return point) does not start the cadence: the first snapshot of training
        still comes once `healthy_steps` steps have passed, not `every_steps` after step 0, so damage early in a
        run loses the steps since then, not every step since the start (bench/README.md, rollback)."""
        self.last_snapshot_step = step if step > 0 else None
        if self.last_damage_step is None or step - self.last_damage_step >= 2 * self.config.every_steps:
            self.attempt = 0

    def metrics(self) -> dict[str, float]:
        return {"rollbacks": float(self.rollbacks), "skipped_steps": float(self.skipped_steps),
                "wasted_steps": float(self.wasted_steps)}

    def state_dict(self) -> dict[str, Any]:
        """Counters and the spike window; the snapshots themselves live in RAM only."""
        return {"detector": self.detector.state_dict(), "last_anomaly_step": self.last_anomaly_step,
                "last_damage_step": self.last_damage_step, "stabilize_until": self.stabilize_until,
                "attempt": self.attempt, "rollbacks": self.rollbacks, "skipped_steps": self.skipped_steps,
                "wasted_steps": self.wasted_steps, "spike_skipped_at": self.spike_skipped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        for key in ("last_anomaly_step", "last_damage_step", "stabilize_until", "attempt", "rollbacks",
                    "skipped_steps", "wasted_steps", "spike_skipped_at"):
            setattr(self, key, state[key])
