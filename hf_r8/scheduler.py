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
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from hf_r8.config import R8Config
from hf_r8.controller import Controller, Event, GroupSpec, Observation
from hf_r8.host_copy import HostCopy
from hf_r8.param_groups import read_momentum, write_lr, write_momentum


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
        self.controller = Controller(
            self.config, [GroupSpec(float(group.get("initial_lr", group["lr"])), read_momentum(group))
                          for group in optimizer.param_groups], total_steps=total_steps, warmup_steps=warmup_steps)
        self.events: list[Event] = []
        self._metrics: tuple[Any, Any, Any] | None = None
        self._staged: tuple[int, HostCopy] | None = None
        super().__init__(optimizer, last_epoch)
        self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step)

    # ------------------------------------------------------------------------------ signals in
    def set_metrics(self, loss: Any = None, reward: Any = None, grad_norm: Any = None) -> None:
        """This step's signals (tensors or floats, any may be None), used when `step()` is called."""
        self._metrics = (loss, reward, grad_norm)

    def step_loss(self, loss: Any, reward: Any = None, grad_norm: Any = None) -> None:
        """`set_metrics(loss, reward, grad_norm)` then `step()`."""
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
        if self._staged is not None:
            step, copy = self._staged
            flat = copy.result().tolist()  # a copy started one step ago: landed by now
            loss, reward, grad_norm = (value if present else None for value, present in zip(flat[::2], flat[1::2],
                                                                                          strict=True))
            self.events += self.controller.observe(Observation(step=step, loss=loss, grad_norm=grad_norm,
                                                               reward=reward))
            self._staged = None
        for index, group in enumerate(optimizer.param_groups):
            write_lr(group, self.controller.compose_lr(index, self.base_lrs[index]))
            momentum = self.controller.momentum(index)
            if momentum is not None:
                write_momentum(group, momentum)
        self._last_lr = [float(group["lr"]) for group in optimizer.param_groups]

    # ---------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        staged = None
        if self._staged is not None:
            step, copy = self._staged
            staged = {"step": step, "values": copy.result().tolist()}
        return {"last_epoch": self.last_epoch, "base_lrs": self.base_lrs, "_last_lr": self._last_lr,
                "controller": self.controller.state_dict(), "staged": staged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch, self.base_lrs = state_dict["last_epoch"], list(state_dict["base_lrs"])
        self._last_lr = list(state_dict["_last_lr"])
        self.controller.load_state_dict(state_dict["controller"])
        staged = state_dict.get("staged")
        self._staged = None if staged is None else (staged["step"], HostCopy(torch.tensor(staged["values"])))


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
