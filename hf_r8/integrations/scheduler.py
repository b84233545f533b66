"""`AdaptiveScheduler`: hf_r8's controller as a `torch.optim.lr_scheduler.LRScheduler`, for loops
that are not a `transformers.Trainer` (plain PyTorch, Lightning, custom).

    scheduler = AdaptiveScheduler(optimizer, R8Config.from_preset("default"))
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step_loss(loss)          # or observe(loss=..., reward=..., model=model)

It is the same controller `R8Callback` runs (per parameter group, momentum written only where the
optimizer has it), timed the same way: a step's signals are staged when the scheduler steps (a tensor
loss is copied to the host without waiting) and consumed just before the next `optimizer.step()`, by
an optimizer step pre-hook, which writes that step's LR and momentum. So the LR of step t+1 reacts to
the loss of step t, as under the Trainer, and no call forces a device sync. The LR is
`base_lr x gain`, base_lr being each group's LR when the scheduler was built.

With `total_steps` known, the default's LR range test runs first, as under the Trainer: the optimizer's
parameters and state are snapshotted before it (in CPU RAM; a model's buffers, e.g. BatchNorm running
statistics, are not among an optimizer's tensors and are not restored), the LR sweeps for
`range_test_length` steps, then parameters and state are restored and the gain the test chose becomes
the base. The step in flight when the test ends is dropped (its gradients were computed on the sweep's
weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from hf_r8.control.config import R8Config
from hf_r8.control.controller import Controller, Event, GroupSpec, Observation
from hf_r8.control.range_test import LRRangeTest, range_test_length
from hf_r8.runtime.host_copy import HostCopy
from hf_r8.runtime.param_groups import read_momentum, write_lr, write_momentum
from hf_r8.runtime.snapshot import StateSnapshot, optimizer_parameters


class AdaptiveScheduler(LRScheduler):
    """Adapts each parameter group's LR (and momentum) from the loss, gradient norm and reward it is given.

    Args:
        optimizer: any torch optimizer.
        config: an `R8Config` (default: the `default` preset).
        total_steps: planned optimizer steps (sizes the statistics window); None if unknown.
        warmup_steps: steps during which signals are only gathered.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: R8Config | None = None,
                 total_steps: int | None = None, warmup_steps: int = 0, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer={type(optimizer).__name__}: must be a torch.optim.Optimizer")
        self.config = config if config is not None else R8Config.from_preset("default")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.controller = self._controller(optimizer, [1.0] * len(optimizer.param_groups), warmup_steps)
        self.events: list[Event] = []
        self._metrics: tuple[Any, Any, Any] | None = None
        self._staged: tuple[int, HostCopy] | None = None
        self._updates = 0
        self._range_test: LRRangeTest | None = None
        self._snapshot: StateSnapshot | None = None
        length = range_test_length(self.config.range_test, total_steps) if last_epoch == -1 else None
        if length is not None:
            self._range_test = LRRangeTest(self.config.range_test, length)
            self._snapshot = StateSnapshot()
            self._snapshot.capture(_OptimizerParameters(optimizer), optimizer, step=0)
        super().__init__(optimizer, last_epoch)
        self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step)

    def _controller(self, optimizer: torch.optim.Optimizer, initial_gains: list[float],
                    warmup_steps: int) -> Controller:
        specs = [GroupSpec(float(group.get("initial_lr", group["lr"])), read_momentum(group), initial_gain=gain)
                 for group, gain in zip(optimizer.param_groups, initial_gains, strict=True)]
        return Controller(self.config, specs, total_steps=self.total_steps, warmup_steps=warmup_steps)

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
                grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self.step_loss(loss, reward, grad_norm)

    def step(self, epoch: int | None = None) -> None:
        """Close this step: stage the signals given since the previous `step()` for the next optimizer step."""
        self.last_epoch += 1
        if self._metrics is not None:
            self._staged = (self.last_epoch, HostCopy(_packed(self._metrics)))
            self._metrics = None
        self._last_lr = [float(group["lr"]) for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        return [self.controller.compose_lr(index, base_lr) for index, base_lr in enumerate(self.base_lrs)]

    # ------------------------------------------------------------------------- applied in the hook
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        observation = None
        if self._staged is not None:
            step, copy = self._staged
            flat = copy.result().tolist()  # a copy started one step ago: landed by now
            loss, reward, grad_norm = (value if present else None for value, present in zip(flat[::2], flat[1::2],
                                                                                          strict=True))
            observation = Observation(step=step, loss=loss, grad_norm=grad_norm, reward=reward)
            self._staged = None
        if self._range_test is not None:
            if observation is not None:  # the loss of update `step`, computed on the weights after step - 1
                self._range_test.observe(observation.step - 1, observation.loss)
            if self._range_test.finished:
                self._finish_range_test(optimizer)
            else:
                for index, group in enumerate(optimizer.param_groups):
                    write_lr(group, self.base_lrs[index] * self._range_test.gain(self._updates))
        elif observation is not None:
            self.events += self.controller.observe(observation)
        if self._range_test is None:
            for index, group in enumerate(optimizer.param_groups):
                write_lr(group, self.controller.compose_lr(index, self.base_lrs[index]))
                momentum = self.controller.momentum(index)
                if momentum is not None:
                    write_momentum(group, momentum)
        self._updates += 1
        self._last_lr = [float(group["lr"]) for group in optimizer.param_groups]

    def _finish_range_test(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore parameters and optimizer state from before the test, drop the step in flight, and rebase the
        controller on the chosen gain."""
        test = self._range_test
        self._snapshot.restore(_OptimizerParameters(optimizer), optimizer)
        for param in optimizer_parameters(optimizer):
            param.grad = None
        gain = test.chosen_gain()
        self._range_test = self._snapshot = None
        self.controller = self._controller(optimizer, [gain] * len(optimizer.param_groups),
                                           max(self.warmup_steps, self._updates + 1))
        self.events.append(Event(self._updates + 1, -1, "range_test", "rebase", 1.0, gain,
                                 test.summary(self._updates + 1, "parameters and optimizer state restored")))

    # ---------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        staged = None
        if self._staged is not None:
            step, copy = self._staged
            staged = {"step": step, "values": copy.result().tolist()}
        # The snapshot from before a running range test lives in RAM only: a state saved during the test resumes
        # without it (at gain 1), as R8Callback does.
        return {"last_epoch": self.last_epoch, "base_lrs": self.base_lrs, "_last_lr": self._last_lr,
                "controller": self.controller.state_dict(), "staged": staged, "updates": self._updates,
                "initial_gains": [spec.initial_gain for spec in self.controller.specs]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch, self.base_lrs = state_dict["last_epoch"], list(state_dict["base_lrs"])
        self._last_lr = list(state_dict["_last_lr"])
        self._updates = state_dict.get("updates", self.last_epoch)
        self._range_test = self._snapshot = None
        gains = state_dict.get("initial_gains", [1.0] * len(self.optimizer.param_groups))
        self.controller = self._controller(self.optimizer, gains, self.warmup_steps)
        self.controller.load_state_dict(state_dict["controller"])
        staged = state_dict.get("staged")
        self._staged = None if staged is None else (staged["step"], HostCopy(torch.tensor(staged["values"])))


class _OptimizerParameters(torch.nn.Module):
    """An optimizer's parameters as a module's (the same tensors), for `StateSnapshot`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__()
        for index, param in enumerate(optimizer_parameters(optimizer)):
            self.register_parameter(f"p{index}", param if isinstance(param, torch.nn.Parameter) else
                                    torch.nn.Parameter(param, requires_grad=param.requires_grad))


def _packed(signals: tuple[Any, Any, Any]) -> torch.Tensor:
    """[loss, has loss, reward, has reward, grad norm, has grad norm] as one float tensor, on the device of
    the tensor signals (a NaN loss stays a NaN loss; a missing one is flagged)."""
    device_values = [value for value in signals if torch.is_tensor(value)]
    device = device_values[0].device if device_values else torch.device("cpu")
    parts = []
    for value in signals:
        if torch.is_tensor(value):
            parts += [value.detach().reshape(()).to(device, torch.float32), torch.ones((), device=device)]
        else:
            parts += [torch.tensor(0.0 if value is None else float(value), device=device),
                      torch.tensor(0.0 if value is None else 1.0, device=device)]
    return torch.stack(parts)


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
