"""Mixture-of-experts models: detect them and give their routers parameter groups of their own.

A router (gate) is a parameter whose module path has a segment equal to one of `patterns`
(`...mlp.gate.weight` in Mixtral, Qwen-MoE, OLMoE); segment equality keeps dense MLP projections
such as `gate_proj` and fused experts' `gate_up_proj` out. Router groups get the controller's MoE
profile (tighter gain bounds, gentler factors), so an expert-heavy model does not destabilize its
routing when the LR moves.
"""

from __future__ import annotations

from typing import Any

import torch

EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def is_moe_model(model: torch.nn.Module) -> bool:
    """Whether the model's config declares more than one expert."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(isinstance(getattr(text_config, name, None), int) and getattr(text_config, name) > 1
               for name in EXPERT_COUNT_FIELDS)


def is_router_parameter(name: str, patterns: list[str]) -> bool:
    """A module path segment (not the parameter's own name) equals one of `patterns`."""
    return any(segment in patterns for segment in name.split(".")[:-1])


def split_router_groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module, patterns: list[str]) -> int:
    """Move router parameters out of each group into a new group with the same settings, before any step.

    Returns the number of router groups added (0 when the model has no router parameter).
    """
    if any(optimizer.state.get(param) for group in optimizer.param_groups for param in group["params"]):
        raise ValueError("split_router_groups: the optimizer has already stepped; split its groups before training")
    routers = {id(param) for name, param in model.named_parameters() if is_router_parameter(name, patterns)}
    router_groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        moved = [param for param in group["params"] if id(param) in routers]
        if moved and len(moved) < len(group["params"]):
            group["params"] = [param for param in group["params"] if id(param) not in routers]
            router_groups.append({**{key: value for key, value in group.items() if key != "params"}, "params": moved})
    for group in router_groups:
        optimizer.add_param_group(group)
    return len(router_groups)
