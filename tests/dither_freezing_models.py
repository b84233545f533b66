"""A tiny GPT-2 whose first MLP's gradients can be silenced and revived, for the freezing tests."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from hf_r8.demo.offline import tiny_gpt2

QUIET_PREFIX = "transformer.h.0.mlp."


def model_with_a_silenceable_block(vocab_size: int) -> tuple[torch.nn.Module, list[float]]:
    """The model and the factor its `QUIET_PREFIX` gradients are multiplied by (change [0] to revive)."""
    model = tiny_gpt2(vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    scale = [1e-6]
    for name, parameter in model.named_parameters():
        if name.startswith(QUIET_PREFIX):
            parameter.register_hook(lambda grad: grad * scale[0])
    return model, scale


class ReviveAt(TrainerCallback):
    """Sets the gradient factor back to 1 at `step`; records the quiet block's weights after every step."""

    def __init__(self, model: torch.nn.Module, scale: list[float], step: int) -> None:
        self.scale, self.step = scale, step
        self.quiet = {name: p for name, p in model.named_parameters() if name.startswith(QUIET_PREFIX)}
        self.weights: list[dict[str, torch.Tensor]] = []
        self.requires_grad: list[bool] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.scale[0] = 1.0

    def on_step_end(self, args, state, control, **kwargs):
        self.weights.append({name: p.detach().clone() for name, p in self.quiet.items()})
        self.requires_grad.append(all(p.requires_grad for p in self.quiet.values()))
