"""`AdaptiveScheduler`: hf_r8's controller as a `torch.optim.lr_scheduler.LRScheduler`, for loops
that are not a `transformers.Trainer` (plain PyTorch, Lightning, custom).

    with AdaptiveScheduler(optimizer, R8Config.from_preset("default")) as scheduler:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step_loss(loss)      # or observe(loss=..., reward=..., model=model)

It is the same engine `R8Callback` runs (`control/engine.py`: the controller per parameter group, momentum
written only where the optimizer has it), timed the same way: a step's signals are staged when the scheduler
steps (a tensor loss is copied to the host without waiting) and consumed just before the next `optimizer.step()`, by
an optimizer step pre-hook, which writes that step's LR and momentum. So the LR of step t+1 reacts to
the loss of step t, as under the Trainer, and no call forces a device sync. The LR is
`schedule x gain`, the schedule being the group's LR without the gain: the LR the hook first finds
(`base_lrs` after a restart), as scaled since by the other schedulers of a `ChainedScheduler`.

That timing is the one place the `LRScheduler` contract bends: `step()` goes through `get_lr()` as
torch's base does, but learns nothing there that the LR could answer yet (its signals are still on their
way to the host), so `get_lr()` leaves the LR as it is and the hook writes the new one; after
`optimizer.step()`, `get_last_lr()` is the LR that step used. `close()` (or leaving the `with` block)
removes the hook.

With `total_steps` known, the default's LR range test runs first, as under the Trainer: the optimizer's
parameters and state are snapshotted before its first step (in CPU RAM; a model's buffers, e.g. BatchNorm
running statistics, are not among an optimizer's tensors and are not restored), the LR sweeps for
`range_test_length` steps, then parameters and state are restored and the gain the test chose becomes
the base. The step in flight when the test ends is dropped (its gradients were computed on the sweep's
weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.hooks import RemovableHandle

from hf_r8.control import state_versions
from hf_r8.control.controller import Controller
from hf_r8.control.engine import Engine
from hf_r8.control.hypergradient import measures_update_alignment
from hf_r8.control.resolve import ConfigLike, resolve_config
from hf_r8.integrations.compat import load_scheduler_fields, scheduler_fields, scheduler_steps, set_logged_lr
from hf_r8.runtime.param_groups import group_specs, write_lrs
from hf_r8.runtime.signal_packing import pack_signals
from hf_r8.runtime.signal_stage import VERSION_1_LAYOUT, SignalStage
from hf_r8.runtime.snapshot import StateSnapshot, optimizer_parameters
from hf_r8.runtime.update_alignment import AlignmentProbe


class AdaptiveScheduler(LRScheduler):
    """Adapts each parameter group's LR (and momentum) from the loss, gradient norm and reward it is given.

    The hook sets the LR once per step of this scheduler: an optimizer step with no scheduler step since the
    previous one (a second one in a row, or one after this scheduler's phase of a SequentialLR) keeps the LR.

    With other schedulers the gain multiplies the schedule they set; give the signals with `set_metrics()`
    and step the container, not this scheduler:

    - `ChainedScheduler([AdaptiveScheduler(...), ExponentialLR(...)])` (either order): the hook reads the
      factor the others scaled the group's LR by since it last wrote it (the LR now over the LR it wrote)
      and puts the gain on that schedule. Exact for schedulers that multiply the LR (LinearLR, ConstantLR,
      ExponentialLR, MultiplicativeLR, StepLR, MultiStepLR, PolynomialLR); one whose step adds to it
      (CosineAnnealingLR with eta_min > 0) scales an LR that carries the gain.
    - `SequentialLR([LinearLR(...), AdaptiveScheduler(...)], milestones=[w])`: before its milestone its
      `last_epoch` is -1 and the hook leaves the LR to the scheduler in charge; the milestone restarts it at
      `base_lrs` and it drives the LR from there (`total_steps` then counts its own steps; a range test
      snapshots the weights of the milestone). After its phase (`SequentialLR([AdaptiveScheduler(...), ...])`)
      it is not stepped any more, and leaves the LR to the next scheduler.

    `step(epoch)`, deprecated in torch, warns as torch's schedulers do and restarts the schedule at
    `base_lrs` (`_get_closed_form_lr`), as SequentialLR does at a milestone; the gain is kept, and the
    controller counts the optimizer steps it saw, whatever `last_epoch` says.

    Args:
        optimizer: any torch optimizer.
        config: an `R8Config`, its dict form, a preset name or a YAML path (default: the `default` preset).
        total_steps: planned optimizer steps (sizes the statistics window); None if unknown.
        warmup_steps: steps during which signals are only gathered.
        last_epoch: torch's resume index (-1: a new run; anything else needs the groups' `initial_lr`).

    Attributes:
        engine: the run's `Engine` (controller, range test, events).
        controller: the engine's `Controller` (its `lr_gain(group)`, `metrics()`).
        events: the decisions made so far (the last 10,000), oldest first.

    Raises:
        TypeError: `optimizer` is not a `torch.optim.Optimizer`.
        RuntimeError: `step()` after `close()`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: ConfigLike = None,
                 total_steps: int | None = None, warmup_steps: int = 0, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer={type(optimizer).__name__}: must be a torch.optim.Optimizer")
        self.config = resolve_config(config)
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.engine = Engine(self.config, group_specs(optimizer), total_steps, warmup_steps)
        self.events = self.engine.events
        self._metrics: tuple[Any, Any, Any] | None = None
        self._alignment: torch.Tensor | None = None
        """The update alignment measured before the last optimizer step (the hypergradient rule's signal)."""
        self._alignment_probe = AlignmentProbe() if measures_update_alignment(self.config) else None
        self._stage = SignalStage()
        self._updates = 0
        self._schedule_lrs: list[float] | None = None
        """Each group's LR without the gain at the hook's last write; None: the group's LR as the hook finds it."""
        self._written_lrs: list[float] = []
        self._applied_at: tuple[int, int] | None = None
        """(last_epoch, steps) when the hook last wrote: a step of this scheduler since changes one."""
        self._closed = False
        length = self.engine.range_test_length() if last_epoch == -1 else None
        if length is not None:
            self.engine.start_range_test(length, skips_faults=False)  # the loss is read after the update
        self._snapshot: StateSnapshot | None = None
        """The optimizer's parameters and state before the range test, taken at its first step."""
        super().__init__(optimizer, last_epoch)
        self._hook: RemovableHandle = optimizer.register_step_pre_hook(self._before_optimizer_step)

    @property
    def controller(self) -> Controller:
        """The engine's controller: rebuilt when a range test ends, so read it from here, not once."""
        return self.engine.controller

    # ------------------------------------------------------------------------------ signals in
    def set_metrics(self, loss: Any = None, reward: Any = None, grad_norm: Any = None) -> None:
        """This step's signals (tensors or floats, any may be None), used when `step()` is called. A loss or
        reward tensor of several values (one per example) stands for their mean, taken on its device; the
        gradient norm is one value."""
        self._metrics = (one_value("loss", loss), one_value("reward", reward), one_value("grad_norm", grad_norm))

    def step_loss(self, loss: Any, reward: Any = None, grad_norm: Any = None) -> None:
        """`set_metrics(loss, reward, grad_norm)` then `step()`; `loss` may be the batch's loss or the tensor of
        its per-example losses (their mean is the step's loss)."""
        self.set_metrics(loss, reward, grad_norm)
        self.step()

    def observe(self, loss: Any = None, reward: Any = None, model: torch.nn.Module | None = None) -> None:
        """Like `step_loss`, with keyword signals (a reward-only run passes just `reward`); with `model`,
        the total norm of its current gradients is the gradient-norm signal (computed on the device: call
        `observe` before `optimizer.zero_grad()`)."""
        grad_norm = None
        if model is not None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads:
                grad_norm = torch.nn.utils.get_total_norm(grads)
        self.step_loss(loss, reward, grad_norm)

    def step(self, epoch: int | None = None) -> None:
        """Close this step: torch's `step()` (its warnings, `last_epoch`, `get_lr()`, or `_get_closed_form_lr()`
        for a deprecated `epoch`), then stage the signals given since the previous step for the next optimizer
        step, stamped with the count of optimizer steps the controller saw."""
        if self._closed:
            raise RuntimeError("AdaptiveScheduler.step(): the scheduler is closed and its optimizer hook removed, "
                               "so no signal would reach the LR; build a new one (load_state_dict() to continue)")
        if epoch is not None:
            self._schedule_lrs = None  # a restart: the hook takes the LR the closed form writes as the schedule
        super().step(epoch)
        if self._metrics is not None:
            loss, reward, grad_norm = self._metrics
            self._stage.stage(self._updates, pack_signals(None, loss=loss, grad_norm=grad_norm, reward=reward,
                                                          update_alignment=self._alignment))
            self._metrics = None
        self._alignment = None

    def get_lr(self) -> list[float]:
        """Each group's LR as it is: at `step()` the signals just staged are still on their way to the host, so
        the LR that answers them is the hook's to write, just before the next `optimizer.step()`."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        """The schedule restarted at `base_lrs` (`step(epoch)`, SequentialLR's milestone): an LR that follows
        the signals has no closed form in the epoch, so the gain is kept and the hook applies it."""
        return [float(base_lr) for base_lr in self.base_lrs]

    def close(self) -> None:
        """Remove the optimizer hook: the LR stays as it is, signals staged by the last `step()` are not
        applied, and `step()` is refused. Closing twice is harmless."""
        self._hook.remove()
        self._closed = True

    def __enter__(self) -> AdaptiveScheduler:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------- applied in the hook
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        applied_at = (self.last_epoch, scheduler_steps(self))
        if self.last_epoch < 0 or applied_at == self._applied_at:
            return  # not started (SequentialLR before its milestone) or not stepped since: not its LR to set
        self._applied_at = applied_at
        schedule = self._schedule(optimizer)
        observation = self._stage.take()  # staged by the last step(), a copy started one step ago: landed by now
        engine = self.engine
        if engine.range_test is not None:
            if self._snapshot is None:  # the test's first step: what its end restores
                self._snapshot = StateSnapshot()
                self._snapshot.capture(_OptimizerParameters(optimizer), optimizer, step=self._updates)
            if observation is not None:  # the loss of update `step`, computed on the weights after step - 1
                engine.range_test_loss(observation.step - 1, observation.loss)
            if engine.range_test.finished:
                self._finish_range_test(optimizer)
        elif observation is not None:
            engine.observe(observation)
        if self._alignment_probe is not None:  # this step's gradient against the update before it
            self._alignment = self._alignment_probe.measure(optimizer)
        updates = self._updates
        write_lrs(optimizer, schedule, lambda index, lr: engine.lr(index, lr, updates), engine.momentum)
        self._updates += 1
        self._schedule_lrs = schedule
        # As the groups hold them (a tensor LR may round): an LR that differs later was moved by another scheduler.
        self._written_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        set_logged_lr(self, list(self._written_lrs))

    def _schedule(self, optimizer: torch.optim.Optimizer) -> list[float]:
        """Each group's LR without the gain: the last schedule, scaled as other schedulers scaled the LR since."""
        lrs = [float(group["lr"]) for group in optimizer.param_groups]
        if self._schedule_lrs is None:
            return lrs
        return [_followed(schedule, lr, written)
                for schedule, lr, written in zip(self._schedule_lrs, lrs, self._written_lrs, strict=True)]

    def _finish_range_test(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore parameters and optimizer state from before the test, drop the step in flight, and rebase the
        engine on the chosen gain."""
        self._snapshot.restore(_OptimizerParameters(optimizer), optimizer)
        for param in optimizer_parameters(optimizer):
            param.grad = None
        self._snapshot = None
        self.engine.finish_range_test(self._updates + 1, "parameters and optimizer state restored")

    # ---------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer, as plain data: torch's fields, the controller's state, the staged
        signals, the schedule, the events. Not in it: the construction arguments, signals given but not yet
        stepped, and a range test under way, whose snapshot of the optimizer's parameters lives in RAM only: a
        state saved during the test resumes without it (at gain 1), as R8Callback does."""
        return {**scheduler_fields(self), "version": state_versions.SCHEDULER, "engine": self.engine.state_dict(),
                "staged": self._stage.state_dict(),
                "updates": self._updates, "schedule_lrs": self._schedule_lrs, "written_lrs": self._written_lrs,
                "applied_at": self._applied_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`; one from before the schedule was kept resumes on `base_lrs`, its schedule then."""
        load_scheduler_fields(self, state_dict)
        self._updates = state_dict.get("updates", self.last_epoch)
        self._snapshot = None
        self.engine.specs = group_specs(self.optimizer)  # as the optimizer holds them now (its state may be loaded)
        # Unversioned: the engine's state flattened into the scheduler's.
        self.engine.load_state_dict(state_dict["engine"] if state_versions.saved_version(
            "AdaptiveScheduler", state_dict, state_versions.SCHEDULER) else state_dict)
        staged = state_dict.get("staged")
        # Unversioned: hf_r8 <= 0.1 packed (loss, reward, gradient norm), later ones the four of version 1.
        old_layout = ("loss", "reward", "grad_norm") if staged is not None and len(staged["values"]) == 6 else \
            VERSION_1_LAYOUT
        self._stage.load_state_dict(staged, unversioned_layout=old_layout)
        self._schedule_lrs = state_dict.get("schedule_lrs", [float(base_lr) for base_lr in self.base_lrs])
        self._written_lrs = list(state_dict.get("written_lrs", state_dict["_last_lr"]))
        applied_at = state_dict.get("applied_at")
        self._applied_at = None if applied_at is None else tuple(applied_at)


def _followed(schedule: float, lr: float, written: float) -> float:
    """The schedule after another scheduler moved the group's LR from `written` (the hook's) to `lr`: scaled by
    the same factor; from a zero LR, which carries no factor, `lr` itself."""
    if lr == written:
        return schedule
    return lr if written == 0 else schedule * lr / written


class _OptimizerParameters(torch.nn.Module):
    """An optimizer's parameters as a module's (the same tensors), for `StateSnapshot`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__()
        for index, param in enumerate(optimizer_parameters(optimizer)):
            self.register_parameter(f"p{index}", param if isinstance(param, torch.nn.Parameter) else
                                    torch.nn.Parameter(param, requires_grad=param.requires_grad))


def one_value(name: str, value: Any) -> Any:
    """A signal as one value: a loss or reward tensor of several values (one per example) becomes their mean, on
    its device (NaN if any is NaN); an empty tensor, or a gradient norm of several values, is an error."""
    if not torch.is_tensor(value) or value.numel() == 1:
        return value
    if value.numel() == 0:
        raise ValueError(f"{name}=tensor of 0 values: must be a number, a tensor of one or more values (their mean) "
                         "or None")
    if name == "grad_norm":
        raise ValueError(f"grad_norm=tensor of {value.numel()} values: must be one value, the total gradient norm "
                         "(observe(model=...) computes it)")
    return value.detach().to(torch.float32).mean()
