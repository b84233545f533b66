"""Exploration dither: after an optimizer step, theta += sigma * D(theta) * eta, eta standard normal.

sigma comes from the controller's exploration law (raised on plateaus, cut when the loss is unstable,
bounded); D(theta) shapes the noise per tensor: `rms` scales it by the tensor's root-mean-square (a
relative perturbation, the same for every element), `magnitude` by each element's absolute value.

The noise is drawn from a generator seeded with (seed, step), in the parameters' fixed order, so
every process adds the same noise and DDP replicas stay equal. Everything stays on the device: the
RMS is a device scalar, nothing is read on the host.
"""

from __future__ import annotations

import torch

from hf_r8.control.config import ExplorationConfig

# Steps and seeds are combined into one 63-bit generator seed.
_SEED_STRIDE = 1_000_003


class Dither:
    """Adds the shaped noise of one step to a list of parameters."""

    def __init__(self, config: ExplorationConfig) -> None:
        self.shaping = config.shaping
        self.seed = config.seed

    @torch.no_grad()
    def apply(self, parameters: list[torch.Tensor], sigma: float, step: int) -> None:
        if sigma <= 0.0:
            return
        generators: dict[torch.device, torch.Generator] = {}
        for parameter in parameters:
            generator = generators.get(parameter.device)
            if generator is None:
                generator = torch.Generator(device=parameter.device)
                generator.manual_seed(self.seed * _SEED_STRIDE + step)
                generators[parameter.device] = generator
            noise = torch.randn(parameter.shape, generator=generator, device=parameter.device, dtype=parameter.dtype)
            if self.shaping == "rms":
                rms = torch.linalg.vector_norm(parameter.float()) / parameter.numel() ** 0.5
                parameter.add_(noise.mul_((rms * sigma).to(parameter.dtype)))
            else:
                parameter.addcmul_(noise, parameter.abs(), value=sigma)
