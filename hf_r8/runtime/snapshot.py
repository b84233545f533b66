"""Model tensors and optimizer state in CPU RAM, captured into reused buffers and restored in place.

The buffers are allocated at the first capture (pinned when the model lives on CUDA) and reused by
every later one; a tensor whose shape or dtype changed gets a new buffer. Copies are issued
non-blocking on the current stream, so capture does not stall the device, and stream order keeps
them ahead of the next in-place update. Restoring copies the saved values back into the live
tensors (same objects: DDP wrappers, optimizer references and hooks stay valid). Each parameter
group's settings come back too (Prodigy's `d`, schedule-free's `weight_sum` live there), except the
LR, which the schedule keeps driving.

`extras` carries what the caller wants back with the weights (controller state, RNG, grad scaler).

Sharded models (FSDP2's `fully_shard`: parameters and optimizer state are `DTensor`s): each process
captures and restores its own shard (`to_local()`), so a snapshot costs every process its shard's
bytes and restoring needs no communication.

Engines that keep tensors of their own (DeepSpeed ZeRO: fp32 master partitions held by the optimizer, and at
stage 3 each parameter's partition in place of the parameter) name them through `engine_tensors`: each
process captures and restores its own partitions with the model's tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch.distributed.tensor import DTensor

OptimizerKey = tuple[int, str]  # (position of the parameter in the optimizer's groups, state key)
# (partitions that stand in for the model's parameters of the same name, further tensors by name)
EngineTensors = Callable[[torch.nn.Module, torch.optim.Optimizer],
                         tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]
_LIVE_KEYS = ("params", "lr")  # group entries a restore leaves as they are


def model_tensors(model: torch.nn.Module, parameter_names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Parameters (all, or those named in `parameter_names`) and every buffer, by name; tied weights once."""
    tensors = {name: param for name, param in model.named_parameters()
               if parameter_names is None or name in parameter_names}
    tensors.update({f"buffer:{name}": buffer for name, buffer in model.named_buffers()})
    return tensors


def trainable_parameter_names(model: torch.nn.Module) -> frozenset[str]:
    """The parameters that require a gradient now (with PEFT, the adapters): the ones training can change."""
    return frozenset(name for name, param in model.named_parameters() if param.requires_grad)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a `DTensor`; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [param for group in optimizer.param_groups for param in group["params"]]


def held_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, parameter_names: Collection[str] | None,
                 engine_tensors: EngineTensors | None) -> dict[str, torch.Tensor]:
    """The tensors a snapshot holds besides the optimizer state: `model_tensors`, with an engine's partitions in
    place of the parameters they stand for, and the engine's further tensors."""
    tensors = model_tensors(model, parameter_names)
    if engine_tensors is not None:
        partitions, further = engine_tensors(model, optimizer)
        tensors.update({name: partition for name, partition in partitions.items() if name in tensors})
        tensors.update(further)
    return tensors


def snapshot_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   parameter_names: Collection[str] | None = None, engine_tensors: EngineTensors | None = None) -> int:
    """Host bytes one snapshot of these parameters takes with the optimizer state as it is now."""
    held = held_tensors(model, optimizer, parameter_names, engine_tensors).values()
    total = sum(local_part(t).numel() * t.element_size() for t in held)
    for param in optimizer_parameters(optimizer):
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value):
                total += local_part(value).numel() * value.element_size()
    return total


def _copy_into(buffers: dict[Any, torch.Tensor], key: Any, tensor: torch.Tensor) -> None:
    tensor = local_part(tensor)
    buffer = buffers.get(key)
    if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
        buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda")
        buffers[key] = buffer
    buffer.copy_(tensor.detach(), non_blocking=True)


class StateSnapshot:
    """One restorable copy of a model's tensors and its optimizer's state.

    Args:
        parameter_names: the parameters to keep (None: all of them), plus all buffers. The set is
            fixed for the snapshot's life, so a parameter whose `requires_grad` changes between
            capture and restore (R8's freezer, its probe steps) is restored all the same. With
            `rollback.scope='trainable'` R8Callback passes those trainable when training starts
            (frozen ones cannot change; with PEFT, the adapters).
        engine_tensors: an engine's own tensors (see the module docstring; None: the model's and the
            optimizer state are all there is).
    """

    def __init__(self, parameter_names: Collection[str] | None = None,
                 engine_tensors: EngineTensors | None = None) -> None:
        self.parameter_names = frozenset(parameter_names) if parameter_names is not None else None
        self.engine_tensors = engine_tensors
        self.step = -1
        self.extras: dict[str, Any] = {}
        self._model: dict[str, torch.Tensor] = {}
        self._optimizer: dict[OptimizerKey, torch.Tensor] = {}
        self._optimizer_devices: dict[OptimizerKey, torch.device] = {}
        self._optimizer_layouts: dict[OptimizerKey, tuple[Any, ...]] = {}  # a DTensor's mesh, placements, shape
        self._optimizer_values: dict[OptimizerKey, Any] = {}
        self._group_settings: list[dict[str, Any]] = []

    @property
    def nbytes(self) -> int:
        buffers = (*self._model.values(), *self._optimizer.values())
        return sum(buffer.numel() * buffer.element_size() for buffer in buffers)

    def capture(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                extras: dict[str, Any] | None = None) -> None:
        live = held_tensors(model, optimizer, self.parameter_names, self.engine_tensors)
        for name, tensor in live.items():
            _copy_into(self._model, name, tensor)
        for name in set(self._model) - set(live):
            del self._model[name]
        seen: set[OptimizerKey] = set()
        self._optimizer_values = {}
        for index, param in enumerate(optimizer_parameters(optimizer)):
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value):
                    _copy_into(self._optimizer, (index, key), value)
                    self._optimizer_devices[(index, key)] = value.device
                    if isinstance(value, DTensor):
                        self._optimizer_layouts[(index, key)] = (value.device_mesh, value.placements, value.shape,
                                                                 value.stride())
                    seen.add((index, key))
                else:
                    self._optimizer_values[(index, key)] = copy.deepcopy(value)
        for stale in set(self._optimizer) - seen:
            del self._optimizer[stale], self._optimizer_devices[stale]
            self._optimizer_layouts.pop(stale, None)
        self._group_settings = [{key: copy.deepcopy(value) for key, value in group.items() if key not in _LIVE_KEYS}
                                for group in optimizer.param_groups]
        self.step = step
        self.extras = copy.deepcopy(extras or {})

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write the captured values back into `model` and `optimizer`, bit for bit."""
        if self.step < 0:
            raise RuntimeError("restore() before any capture()")
        live = held_tensors(model, optimizer, self.parameter_names, self.engine_tensors)
        with torch.no_grad():
            for name, buffer in self._model.items():
                local_part(live[name]).copy_(buffer, non_blocking=True)
        for group, settings in zip(optimizer.param_groups, self._group_settings, strict=True):
            group.update(copy.deepcopy(settings))
        saved_keys = set(self._optimizer) | set(self._optimizer_values)
        for index, param in enumerate(optimizer_parameters(optimizer)):
            keys = {key for position, key in saved_keys if position == index}
            if not keys:
                optimizer.state.pop(param, None)
                continue
            state = optimizer.state[param]
            for key in set(state) - keys:
                del state[key]
            for key in keys:
                if (index, key) in self._optimizer_values:
                    state[key] = copy.deepcopy(self._optimizer_values[(index, key)])
                    continue
                buffer, current = self._optimizer[(index, key)], state.get(key)
                local = local_part(current) if torch.is_tensor(current) else None
                if local is not None and local.shape == buffer.shape and local.dtype == buffer.dtype:
                    local.copy_(buffer, non_blocking=True)
                    continue
                value = buffer.to(self._optimizer_devices[(index, key)], copy=True)
                layout = self._optimizer_layouts.get((index, key))
                if layout is not None:
                    mesh, placements, shape, stride = layout
                    value = DTensor.from_local(value, mesh, placements, run_check=False, shape=shape, stride=stride)
                state[key] = value
