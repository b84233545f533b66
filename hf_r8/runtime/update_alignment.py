"""How a step's gradient lines up with the optimizer's previous update, measured on the device.

The hypergradient rule (`control/hypergradient.py`) reads cos(g_t, u_{t-1}): the gradient about to be applied
against the direction of the update before it. That direction is read from the optimizer's state just
before it steps, so no copy of the last update is kept: AdamW's and Adam's m / (sqrt(v) + eps) (the bias
corrections scale it, and a cosine does not see a scale), SGD's momentum buffer. Parameters without such
state (plain SGD, the first step, other optimizers) are left out; when none has it there is no measurement.

The sums stay on the device and the cosine travels with the step's other signals (`signal_packing.py`): no
host read of its own. Each process measures the parameters it holds (a `DTensor`'s shard); replicas agree,
and shards average their own cosines across processes.
"""

from __future__ import annotations

import logging

import torch

from hf_r8.runtime.snapshot import local_part

logger = logging.getLogger(__name__)


def last_update_direction(state: dict, eps: float) -> torch.Tensor | None:
    """The direction of the optimizer's last update of one parameter, from its state; None without one."""
    if "exp_avg" in state and "exp_avg_sq" in state:
        exp_avg, exp_avg_sq = local_part(state["exp_avg"]), local_part(state["exp_avg_sq"])
        return exp_avg.float() / (exp_avg_sq.float().sqrt() + eps)
    buffer = state.get("momentum_buffer")
    return None if buffer is None else local_part(buffer).float()


def update_alignment(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """cos(g_t, u_{t-1}) over every parameter with a gradient and a last update, as a device scalar (call it
    before `optimizer.step()`); None when no parameter has both."""
    terms = []
    for group in optimizer.param_groups:
        eps = float(group.get("eps", 0.0))
        for param in group["params"]:
            state = optimizer.state.get(param)
            if param.grad is None or not state:
                continue
            direction = last_update_direction(state, eps)
            if direction is None:
                continue
            grad, direction = local_part(param.grad).float().reshape(-1), direction.reshape(-1)
            terms.append(torch.stack([torch.dot(grad, direction), torch.dot(grad, grad),
                                      torch.dot(direction, direction)]))
    if not terms:
        return None
    dot, grad_square, direction_square = torch.stack(terms).sum(dim=0).unbind()
    return dot / (grad_square * direction_square).sqrt().clamp_min(torch.finfo(torch.float32).tiny)


class AlignmentProbe:
    """Measures each step's update alignment for an adapter, and says once when the optimizer keeps nothing to
    measure it against (the hypergradient rule then holds the gain)."""

    def __init__(self) -> None:
        self.measured_steps = 0
        self.said_unmeasurable = False

    def measure(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        alignment = update_alignment(optimizer)
        self.measured_steps += 1
        if alignment is None and self.measured_steps > 1 and not self.said_unmeasurable:
            self.said_unmeasurable = True
            logger.warning("hf_r8: the hypergradient rule holds the gain: %s keeps no Adam moments or momentum "
                           "buffer to measure the update alignment against", type(optimizer).__name__)
        return alignment
