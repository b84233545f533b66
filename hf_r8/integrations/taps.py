"""Taps into a running `transformers.Trainer`: the per-step loss, the gradient norm, and its logs.

No callback event carries the per-step loss or the gradient norm the Trainer computes, and keys a
user callback adds in `on_log` reach neither the reporters (they run first) nor `log_history`.
So `TrainerTaps` wraps three methods *on the one Trainer instance* (the class is untouched) and
removes the wrappers when training ends:

* `training_step`: its return value (the micro-batch loss, already scaled for gradient accumulation
  and token averaging) is summed on device, giving exactly the loss the Trainer would log for the
  step, NaN included (the Trainer's own NaN filter runs after). An exception raised there (an
  out-of-memory error, a bad batch, a notebook's interrupt: where training spends its time) is
  reported to `on_error` before it propagates, since no callback event follows a `train()` that raised;
* `_get_grad_norm`: its return value is the pre-clip global gradient norm (a device tensor);
* `log`: training logs get the callback's `r8/*` metrics before reporters and history see them.

A forward hook on the model also keeps the router load-balancing loss (`aux_loss`) that MoE models
return when `output_router_logits` is on, averaged over the step's training forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer

from hf_r8.integrations.compat import check_trainer, unwrap_methods, wrap_method

_TAPPED_METHODS = ("training_step", "_get_grad_norm", "log")


class TrainerTaps:
    """Instance-level wrappers on one Trainer (see the module docstring)."""

    def __init__(self, trainer: Trainer, add_log_metrics: Callable[[dict[str, float]], None],
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.trainer = trainer
        self.add_log_metrics = add_log_metrics
        self.on_error = on_error
        self.step_loss: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | float | None = None
        self.aux_loss_sum: torch.Tensor | None = None
        self.aux_loss_count = 0
        self._aux_hook: torch.utils.hooks.RemovableHandle | None = None

    def install(self) -> None:
        # A run that crashed never reached on_train_end: unwrap its taps so nothing is counted twice.
        self.remove()
        missing = check_trainer(self.trainer)  # a missing method is warned about, never silently untapped
        taps = {"training_step": self._tap_training_step, "log": self._tap_log, "_get_grad_norm": self._tap_grad_norm}
        for name, make_wrapper in taps.items():
            if name not in missing:
                wrap_method(self.trainer, name, make_wrapper)
        if isinstance(self.trainer.model, torch.nn.Module):
            self._aux_hook = self.trainer.model.register_forward_hook(self._keep_aux_loss)

    def remove(self) -> None:
        """Put back exactly what each tapped name was before (an instance attribute or the class method)."""
        if self._aux_hook is not None:
            self._aux_hook.remove()
            self._aux_hook = None
        unwrap_methods(self.trainer, _TAPPED_METHODS)

    def start_step(self) -> None:
        self.step_loss = None
        self.grad_norm = None
        self.aux_loss_sum, self.aux_loss_count = None, 0

    def step_aux_loss(self) -> torch.Tensor | None:
        """The mean router aux loss of this step's training forwards (a device tensor), or None."""
        return None if self.aux_loss_sum is None else self.aux_loss_sum / self.aux_loss_count

    def _keep_aux_loss(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        aux_loss = getattr(output, "aux_loss", None)
        if not module.training or not torch.is_grad_enabled() or not torch.is_tensor(aux_loss):
            return
        value = aux_loss.detach().float().reshape(-1).mean()
        self.aux_loss_sum = value if self.aux_loss_sum is None else self.aux_loss_sum + value
        self.aux_loss_count += 1

    def _tap_training_step(self, original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            try:
                loss = original(*args, **kwargs)
            except BaseException as error:  # KeyboardInterrupt too: a notebook's interrupt ends training here
                if self.on_error is not None:
                    self.on_error(error)
                raise
            if torch.is_tensor(loss):
                micro = loss.detach().float().reshape(-1).mean()
                self.step_loss = micro if self.step_loss is None else self.step_loss + micro
            return loss

        return training_step

    def _tap_grad_norm(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def get_grad_norm(*args: Any, **kwargs: Any) -> torch.Tensor | float | None:
            self.grad_norm = original(*args, **kwargs)
            return self.grad_norm

        return get_grad_norm

    def _tap_log(self, original: Callable[..., None]) -> Callable[..., None]:
        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "learning_rate" in logs or "lr" in logs:  # training logs (TRL's PPO says lr), not evaluations
                self.add_log_metrics(logs)
            return original(logs, *args, **kwargs)

        return log
