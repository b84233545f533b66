"""Reversible freezing of parameter tensors whose gradients went quiet.

Every `check_every` steps the gradient norm of each trainable tensor is read (public `vector_norm`s,
stacked: one host read) into a per-tensor EMA. A tensor whose EMA stays below `threshold` x
the median EMA of the unfrozen tensors for `patience_steps` is frozen; every `probe_every` steps the
frozen tensors get a gradient for one step, which is measured and dropped, and a tensor whose gradient
exceeds `revive_threshold` x the median is unfrozen.

What "frozen" saves depends on the run:

* one process: `requires_grad` is turned off, so autograd computes no weight gradient for the tensor
  (and stops early when a whole prefix of the network is frozen) and the optimizer, finding no
  gradient, skips its update (weight decay included);
* several processes (DDP): the parameter set DDP reduces must not change, so the gradients are still
  computed and reduced and only dropped before the optimizer step: no update, no compute saved. The
  decisions come from the reduced gradients, so every process freezes the same tensors.

Only tensors that were trainable at the start are ever touched (PEFT's frozen base stays frozen).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_r8.control.config import FreezingConfig
from hf_r8.control.events import Event
from hf_r8.control.signals import ema_step


@dataclass
class TensorState:
    ema: float | None = None
    quiet_steps: int = 0
    frozen: bool = False


@dataclass
class FreezePolicy:
    """Which tensors to freeze or unfreeze, from their gradient norms: plain numbers, no torch."""

    config: FreezingConfig
    names: list[str]
    sizes: list[int]
    tensors: list[TensorState] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.tensors:
            self.tensors = [TensorState() for _ in self.names]

    @property
    def frozen_fraction(self) -> float:
        total = sum(self.sizes)
        return sum(size for size, state in zip(self.sizes, self.tensors, strict=True) if state.frozen) / total \
            if total else 0.0

    def observe(self, step: int, norms: list[float | None]) -> list[Event]:
        """One check's gradient norms (None where a frozen tensor was not probed, all None on a step the
        guard skipped); returns the changes. A non-finite norm (an fp16 overflow the grad scaler skips)
        counts as not measured."""
        beta, events = self.config.ema_beta, []
        norms = [norm if norm is not None and math.isfinite(norm) else None for norm in norms]
        if all(norm is None for norm in norms):
            return events
        for state, norm in zip(self.tensors, norms, strict=True):
            if norm is not None and not state.frozen:
                state.ema = ema_step(state.ema, norm, beta)
        active = [state.ema for state in self.tensors if not state.frozen and state.ema is not None]
        if not active:
            return events
        median = statistics.median(active)
        for index, (state, norm) in enumerate(zip(self.tensors, norms, strict=True)):
            if state.frozen:
                if norm is not None and norm > self.config.revive_threshold * median:
                    events.append(self._change(step, index, False, f"{self.names[index]}: probed gradient norm "
                                               f"{norm:.3g} > {self.config.revive_threshold} x median {median:.3g}"))
                    state.ema, state.quiet_steps = norm, 0
                continue
            quiet = state.ema is not None and state.ema < self.config.threshold * median
            state.quiet_steps = state.quiet_steps + self.config.check_every if quiet else 0
            if state.quiet_steps >= self.config.patience_steps and self._room_for(index):
                events.append(self._change(step, index, True, f"{self.names[index]}: gradient-norm EMA "
                                           f"{state.ema:.3g} < {self.config.threshold} x median {median:.3g} for "
                                           f"{state.quiet_steps} steps"))
        return events

    def _room_for(self, index: int) -> bool:
        return self.frozen_fraction + self.sizes[index] / sum(self.sizes) <= self.config.max_frozen_fraction

    def _change(self, step: int, index: int, frozen: bool, reason: str) -> Event:
        before = self.frozen_fraction
        self.tensors[index].frozen = frozen
        action = "freeze" if frozen else "unfreeze"
        return Event(step, -1, "freezing", action, before, self.frozen_fraction, reason, quantity="frozen_fraction")

    def state_dict(self) -> dict[str, Any]:
        return {name: vars(state).copy() for name, state in zip(self.names, self.tensors, strict=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, tensor in zip(self.names, self.tensors, strict=True):
            if name in state:
                vars(tensor).update(state[name])


def trainable_parameters(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the model's parameters that require a gradient and that the optimizer updates."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) in in_optimizer]


class ParameterFreezer:
    """Applies a `FreezePolicy` to the trainable parameters of a model's optimizer."""

    def __init__(self, config: FreezingConfig, named: list[tuple[str, torch.Tensor]], several_processes: bool) -> None:
        self.config = config
        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        self.policy = FreezePolicy(config, self.names, [p.numel() for p in self.parameters])
        self.drop_gradients_only = several_processes
        self._frozen: list[torch.Tensor] = []
        self._active: list[torch.Tensor] = list(self.parameters)

    @property
    def frozen_fraction(self) -> float:
        return self.policy.frozen_fraction

    def active_parameters(self) -> list[torch.Tensor]:
        return self._active

    def before_step(self, step: int) -> None:
        """Before the step's first forward: at a probe step, frozen tensors compute a gradient again."""
        if not self.drop_gradients_only and step % self.config.probe_every == 0:
            self._set_requires_grad(True)

    def after_backward(self, step: int) -> list[Event]:
        """Before the optimizer step: check (every `check_every` steps), then drop the frozen tensors' gradients."""
        events = []
        if step % self.config.check_every == 0:
            events = self.policy.observe(step, self._gradient_norms())
            if events:
                self._split()
        for parameter in self._frozen:
            parameter.grad = None
        if not self.drop_gradients_only:
            self._set_requires_grad(False)
        return events

    def release(self) -> None:
        """At the end of training: every tensor trainable again, as the user's model had it (the frozen set
        stays in the state saved with checkpoints, and comes back on resume)."""
        for parameter in self.parameters:
            parameter.requires_grad_(True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state)
        self._split()
        for parameter, tensor in zip(self.parameters, self.policy.tensors, strict=True):
            parameter.requires_grad_(not (tensor.frozen and not self.drop_gradients_only))

    def _split(self) -> None:
        """The frozen and the active tensors, kept as lists: the per-step work is over the frozen ones only."""
        states = self.policy.tensors
        self._frozen = [p for p, state in zip(self.parameters, states, strict=True) if state.frozen]
        self._active = [p for p, state in zip(self.parameters, states, strict=True) if not state.frozen]

    def _set_requires_grad(self, probing: bool) -> None:
        for parameter in self._frozen:
            parameter.requires_grad_(probing)

    @torch.no_grad()
    def _gradient_norms(self) -> list[float | None]:
        with_grad = [index for index, p in enumerate(self.parameters) if p.grad is not None]
        norms: list[float | None] = [None] * len(self.parameters)
        if with_grad:
            values = [torch.linalg.vector_norm(self.parameters[index].grad, dtype=torch.float32) for index in with_grad]
            for index, value in zip(with_grad, torch.stack(values).tolist(), strict=True):
                norms[index] = value
        return norms
