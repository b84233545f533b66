"""Every use hf_r8 makes of DeepSpeed's internals (through transformers' Trainer), in one place, each failing loudly.

Under DeepSpeed the engine takes the real optimizer step inside `accelerator.backward`, so R8 reads what it did
from the engine: `uses_deepspeed`, `deepspeed_step_skipped` (ZeRO's overflow flag), `deepspeed_peak_lrs` (its
own schedulers' peaks), and what a rollback snapshot must hold and restore (`deepspeed_tensors`,
`zero3_partition`, `regather_zero3_parameters`); `skip_deepspeed_shm_op` spares a CPU test the compilation of
DeepSpeed's shared-memory comm op. `compat.py` is the same door for transformers and torch; `tests/test_compat.py`
and `tests/test_deepspeed.py` pin both.
"""

from __future__ import annotations

import importlib
from typing import Any

import transformers


def uses_deepspeed(trainer: Any) -> bool:
    """Whether `trainer` runs under DeepSpeed: its engine then takes the real optimizer step inside
    `accelerator.backward`, before `on_pre_optimizer_step` (the Trainer's own `optimizer.step()` is a no-op)."""
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def _deepspeed_engine(trainer: Any) -> Any:
    engine = getattr(trainer, "deepspeed", None)
    if engine is None:
        raise RuntimeError("R8: the Trainer runs under DeepSpeed but has no `deepspeed` engine attribute "
                           f"(transformers {transformers.__version__}): R8 cannot tell whether a step was skipped")
    return engine


def deepspeed_step_skipped(trainer: Any) -> bool:
    """Whether the DeepSpeed engine skipped its last optimizer step (ZeRO's `overflow`: a non-finite gradient
    norm, or an fp16 overflow); then neither the weights nor its LR scheduler moved. An engine without a ZeRO
    optimizer (stage 0, fp32) has no such flag and never skips."""
    return bool(getattr(_deepspeed_engine(trainer).optimizer, "overflow", False))


def deepspeed_peak_lrs(trainer: Any) -> list[float] | None:
    """Each group's peak LR under DeepSpeed's own scheduler (WarmupLR, WarmupDecayLR: `max_lrs`), which, unlike a
    torch scheduler, records no `initial_lr` and starts the groups at `warmup_min_lr`; None for other schedulers."""
    peaks = getattr(_deepspeed_engine(trainer).lr_scheduler, "max_lrs", None)
    return [float(lr) for lr in peaks] if peaks is not None else None


def zero3_partition(parameter: Any) -> Any:
    """This process's partition of a ZeRO-3 parameter (`ds_tensor`), or None for any other tensor."""
    return getattr(parameter, "ds_tensor", None)


def deepspeed_tensors(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a rollback snapshot must hold under DeepSpeed besides the optimizer state (`snapshot.EngineTensors`):
    at ZeRO-3 each parameter's partition in its place (the parameter itself is empty between steps), and at every
    stage the optimizer's own parameters, the fp32 master partitions ZeRO steps and copies into the model."""
    partitions = {name: partition for name, param in model.named_parameters()
                  if (partition := zero3_partition(param)) is not None}
    masters = {f"optimizer_param:{index}": param
               for index, param in enumerate(param for group in optimizer.param_groups for param in group["params"])}
    return partitions, masters


def regather_zero3_parameters(trainer: Any) -> None:
    """After ZeRO-3 partitions were written in place: gather the persistent (small, always gathered) parameters
    again from them, as the engine does after loading a checkpoint (release the gathered copies, which leaves
    the partitions as they are, then gather). A collective: every process calls it. No-op before stage 3."""
    persistent = getattr(_deepspeed_engine(trainer).optimizer, "persistent_parameters", None)
    if persistent:
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory comm op (minutes from an empty cache) when it sets up
    its process group on CPU; gloo's all-reduce is used instead. Call before the Trainer is built. The module is
    fetched by its name: `import deepspeed.comm.torch as m` binds the `torch` package, not DeepSpeed's module."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
