"""Rollback in a Trainer run: the guard before each optimizer step, the CPU-RAM snapshots, the restore.

The engine judges each step from numbers (`Engine.check`: apply, drop, roll back, stop, with its reason) and
carries out what is not tensors (the controller's brake, low-loss batches, events); this module carries the
verdict out on the Trainer's model and optimizer. In `on_pre_optimizer_step` the step's loss and gradient norm are read
on the host (one sync; the stock Trainer's NaN filter already syncs on the loss). A non-finite value skips the step (its
gradients dropped); a spike, or non-finite weights, restore the last healthy snapshot (weights, optimizer
state, controller, RNG, grad scaler, frozen set), cut the LR gain, drop the step in flight and ask
R8Trainer's sampler for low-loss batches. Snapshots are taken every `rollback.every_steps` healthy steps
into reused CPU buffers, once the step's loss, computed on the weights about to be saved, has passed the
check: a snapshot is never of a damaged model.

Under DeepSpeed the engine has already applied the step when `on_pre_optimizer_step` comes (it steps inside
backward), so nothing can be dropped before it: a step with a non-finite gradient norm is skipped by the
engine itself (ZeRO's overflow check, at every stage, fp32 included), and R8 records that skip; if the engine
applied it anyway, the weights are checked and a snapshot restored. A spike's step is already applied, so it
is only recorded; a second spike in a row restores the last snapshot. Snapshots hold each process's own
ZeRO partitions (fp32 masters, optimizer state, and at stage 3 the parameter partitions, `deepspeed_tensors`)
and the weights after the checked step, whose loss and gradient norm passed the check.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import psutil
import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerControl, TrainingArguments

from hf_r8.control.config import RollbackConfig
from hf_r8.control.engine import Engine
from hf_r8.control.rollback import RollbackAction
from hf_r8.integrations.compat import grad_scaler, uses_fsdp
from hf_r8.integrations.compat_deepspeed import (
    deepspeed_step_skipped,
    deepspeed_tensors,
    regather_zero3_parameters,
    zero3_partition,
)
from hf_r8.integrations.step_signals import StepSignals
from hf_r8.runtime.distributed import sum_across_processes
from hf_r8.runtime.freezing import ParameterFreezer
from hf_r8.runtime.rng import restore_rng_states, rng_states
from hf_r8.runtime.snapshot import StateSnapshot, local_part, snapshot_bytes, trainable_parameter_names

logger = logging.getLogger(__name__)


def supported_scope(config: RollbackConfig, trainer: Any) -> tuple[bool, bool]:
    """(check steps, take snapshots) for this run: what the parallelism in use allows."""
    checks = config.enabled or config.guard_nonfinite
    sharded = any(isinstance(param, DTensor) for param in trainer.model.parameters())
    if config.enabled and uses_fsdp(trainer) and not sharded:
        # FSDP1 flattens parameters into its own FlatParameters; FSDP2 keeps each as a DTensor whose
        # local shard a snapshot can hold (each process its own, see snapshot.py).
        logger.warning("R8: rollback snapshots are off under FSDP1 (flattened parameters); use FSDP2 "
                       "(fsdp_version: 2) for sharded snapshots. The non-finite guard stays on.")
        return checks, False
    return checks, config.enabled


class RollbackManager:
    """One run's guard, snapshots and restores (see the module docstring)."""

    def __init__(self, config: RollbackConfig, trainer: Any, optimizer: torch.optim.Optimizer, engine: Engine) -> None:
        self.config, self.engine = config, engine
        self.applied_before_check = engine.rollback.applied_before_check
        """DeepSpeed: the engine applied the step before R8 sees its signals (see the module docstring)."""
        self.trainer, self.model, self.optimizer = trainer, trainer.model, optimizer
        self.checks_steps, self.snapshots_allowed = supported_scope(config, trainer)
        self.engine_tensors = deepspeed_tensors if self.applied_before_check else None
        # Fixed before the freezer (or a resumed freezer state) turns any requires_grad off.
        self.snapshot_parameters = trainable_parameter_names(self.model) if config.scope == "trainable" else None
        self.snapshots: list[StateSnapshot] = []
        self.freezer: ParameterFreezer | None = None
        """Set once the run's parameter actions exist: its frozen set is part of each snapshot."""

    def counts(self) -> dict[str, int]:
        policy = self.engine.rollback
        return {"skipped_steps": policy.skipped_steps, "rollbacks": policy.rollbacks,
                "wasted_steps": policy.wasted_steps}

    def turn_off(self) -> None:
        """Nothing can be checked before an optimizer step (a Trainer with its own update loop)."""
        self.checks_steps = self.snapshots_allowed = False

    def before_step(self, step: int, signals: StepSignals, args: TrainingArguments, control: TrainerControl) -> None:
        """Read step `step`'s loss and gradient norm (all processes) before it is applied (one sync), and carry out
        the engine's verdict: apply it (taking a due snapshot), drop it, roll back or stop."""
        observed = signals.read_now(step)
        verdict = self.engine.check(
            step, observed.loss, observed.grad_norm, weights_finite=lambda: self._weights_finite(args.device),
            skipped_by=lambda: "the DeepSpeed engine" if deepspeed_step_skipped(self.trainer) else None,
            scaler_owns_overflow=grad_scaler(self.trainer) is not None)
        signals.dropped = not verdict.observed  # a step not applied is not evidence about the LR
        if verdict.kind == "drop":
            self.optimizer.zero_grad(set_to_none=True)
        elif verdict.kind in ("roll_back", "stop"):
            self.optimizer.zero_grad(set_to_none=True)  # the step in flight: damaged weights, or a spike's batch
            self._roll_back(verdict.action, step, args, control)
        # A snapshot taken now is of the weights after step - 1, on which this step's loss has just passed the
        # check: never of a damaged model. Under DeepSpeed they are those after this step, checked likewise.
        elif verdict.snapshot and self.snapshots_allowed and self.take_snapshot(self.weights_step(step), args.device):
            self.engine.snapshot_taken(step)

    def weights_step(self, step: int) -> int:
        """The updates the weights hold when step `step` is checked."""
        return step if self.applied_before_check else step - 1

    def _weights_finite(self, device: torch.device) -> bool:
        """Whether every trainable parameter is finite on every process (read only after a non-finite loss)."""
        params = [self._own_part(param) for param in self.model.parameters() if param.requires_grad]
        bad = torch.stack([~torch.isfinite(param).all() for param in params]).sum().float().to(device)
        return sum_across_processes(bad).item() == 0

    @staticmethod
    def _own_part(param: torch.Tensor) -> torch.Tensor:
        """The part of `param` this process holds: its FSDP2 shard or ZeRO-3 partition, else all of it."""
        partition = zero3_partition(param)
        return partition if partition is not None else local_part(param)

    def _roll_back(self, action: RollbackAction, step: int, args: TrainingArguments, control: TrainerControl) -> None:
        """Restore a snapshot (the n-th rollback in a row goes n snapshots back, as far as `rollback.keep` allows),
        then restart the LR lower and stabilize the data, or stop."""
        kept = self.snapshots
        snapshot = kept[-min(max(action.attempt, 1), len(kept))] if kept else None
        if snapshot is not None:
            self.restore(snapshot)
        if action.kind == "stop":
            self._stop(action, step, snapshot, args, control)
            return
        reason = self.engine.roll_back(action, snapshot.step if snapshot is not None else None,
                                       self.weights_step(step))
        logger.warning("R8 rollback at step %d: %s", step, reason)

    def _stop(self, action: RollbackAction, step: int, snapshot: StateSnapshot | None, args: TrainingArguments,
              control: TrainerControl) -> None:
        """Rollbacks did not help: stop training, saving the healthiest state there is."""
        control.should_training_stop = True
        if snapshot is not None or self._weights_finite(args.device):
            control.should_save = True
            where = f"the snapshot of step {snapshot.step}" if snapshot is not None else "the current weights"
            reason = f"{action.reason}; {where} is saved as the step-{step} checkpoint"
        else:
            reason = f"{action.reason}; no healthy state to save (no snapshot, non-finite weights)"
        logger.error("R8 rollback: %s", reason)
        lost = self.weights_step(step) - snapshot.step if snapshot is not None else 0
        self.engine.stop(step, reason, lost_steps=lost)

    def restore(self, snapshot: StateSnapshot) -> None:
        snapshot.restore(self.model, self.optimizer)
        if self.applied_before_check:
            regather_zero3_parameters(self.trainer)
        extras = snapshot.extras
        self.engine.restore(extras["engine"])
        restore_rng_states(extras)
        scaler = grad_scaler(self.trainer)
        if scaler is not None and extras.get("scaler") is not None:
            scaler.load_state_dict(extras["scaler"])
        if self.freezer is not None and extras.get("freezing") is not None:
            # Tensors frozen since were frozen on the discarded trajectory: back to the snapshot's frozen set.
            self.freezer.load_state_dict(extras["freezing"])

    def take_snapshot(self, step: int, device: torch.device) -> bool:
        """Capture the weights after `step` updates; False when snapshots turned out not to fit in RAM."""
        if not self.snapshots and not self._snapshots_fit(device):
            self.snapshots_allowed = False
            return False
        reused = self.snapshots.pop(0) if len(self.snapshots) >= self.config.keep else None
        snapshot = reused if reused is not None else StateSnapshot(self.snapshot_parameters, self.engine_tensors)
        scaler = grad_scaler(self.trainer)
        extras = {
            "engine": self.engine.snapshot_state(),
            **rng_states(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "freezing": self.freezer.policy.state_dict() if self.freezer is not None else None,
        }
        snapshot.capture(self.model, self.optimizer, step, extras)
        self.snapshots.append(snapshot)
        return True

    def _snapshots_fit(self, device: torch.device) -> bool:
        """Whether `keep` snapshots of every process on this machine fit in its free RAM, agreed by all processes."""
        config = self.config
        # Pinned host blocks are rounded up to a power of two: count the worst case, twice the bytes.
        per_process = (config.keep * snapshot_bytes(self.model, self.optimizer, self.snapshot_parameters,
                                                   self.engine_tensors)
                       * (2 if device.type != "cpu" else 1))
        processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        available = psutil.virtual_memory().available
        fits = per_process * processes_here <= config.max_ram_fraction * available
        refusals = sum_across_processes(torch.tensor([0.0 if fits else 1.0], device=device)).item()
        if refusals:
            logger.warning("R8 rollback is off: %d process(es) x %d snapshot(s) need %.2f GiB, more than "
                           "rollback.max_ram_fraction=%s of the %.2f GiB of host RAM available on some machine "
                           "(set rollback.scope='trainable' or keep=1).", processes_here, config.keep,
                           per_process * processes_here / 2**30, config.max_ram_fraction, available / 2**30)
        return refusals == 0
