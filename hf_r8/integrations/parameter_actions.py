"""What R8 does to the parameters themselves in a Trainer run: dither noise and reversible freezing.

Both are off by default (`exploration`, `freezing`). Dither adds noise scaled by the controller's sigma
after each optimizer step past warmup (`runtime/dither.py`); the freezer turns `requires_grad` off for
tensors whose gradients went quiet and back on to probe them (`runtime/freezing.py`). Neither runs under
DeepSpeed or FSDP, whose sharded parameters they cannot see whole.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from hf_r8.control.config import R8Config
from hf_r8.control.events import Event
from hf_r8.integrations.compat_deepspeed import uses_deepspeed
from hf_r8.runtime.dither import Dither
from hf_r8.runtime.freezing import ParameterFreezer, trainable_parameters

logger = logging.getLogger(__name__)


class ParameterActions:
    """The dither and the freezer of one run (either may be None)."""

    def __init__(self, dither: Dither | None, freezer: ParameterFreezer | None,
                 trainable: list[torch.Tensor]) -> None:
        self.dither = dither
        self.freezer = freezer
        self._trainable = trainable

    @classmethod
    def for_run(cls, config: R8Config, trainer: Any, optimizer: torch.optim.Optimizer) -> ParameterActions | None:
        """The actions this run asked for and its parallelism allows; None when there are none."""
        if not (config.exploration.enabled or config.freezing.enabled):
            return None
        if uses_deepspeed(trainer) or any(isinstance(param, DTensor) for param in trainer.model.parameters()):
            logger.warning("R8: dither and freezing are off with DeepSpeed and FSDP (sharded parameters).")
            return None
        named = trainable_parameters(trainer.model, optimizer)
        dither = Dither(config.exploration) if config.exploration.enabled else None
        freezer = None
        if config.freezing.enabled:
            freezer = ParameterFreezer(config.freezing, named, several_processes=trainer.args.world_size > 1)
        return cls(dither, freezer, [parameter for _, parameter in named])

    def before_step(self, step: int) -> None:
        if self.freezer is not None:
            self.freezer.before_step(step)

    def after_backward(self, step: int) -> list[Event]:
        """The freezer's decisions once this step's gradients exist (also on a skipped step: ends its probe)."""
        return self.freezer.after_backward(step) if self.freezer is not None else []

    def after_optimizer_step(self, step: int, sigma: float) -> None:
        if self.dither is not None:
            parameters = self.freezer.active_parameters() if self.freezer is not None else self._trainable
            self.dither.apply(parameters, sigma, step)

    def metrics(self) -> dict[str, float]:
        return {"frozen_fraction": self.freezer.frozen_fraction} if self.freezer is not None else {}

    def release(self) -> None:
        """Every frozen tensor trains again (the end of a run, also one that raised)."""
        if self.freezer is not None:
            self.freezer.release()
