"""Host reads per steady-state step, stock Trainer vs R8Callback's default: what R8 makes the device wait for.

A host read of a device value stalls a GPU's queue until that value exists. It is counted here on CPU by
every route to a host value: the dispatcher's `aten._local_scalar_dense` (`item()`, `bool()`, `float()` of a
tensor) and `tolist()` / `numpy()`. A read of what `HostCopy` copied is not counted: on a GPU that copy went to
pinned host memory without waiting, and reading it later waits for the copy only.

What R8's default adds is one read per step: the guard and rollback judge a step's loss and gradient norm
before it is applied (`rollback_manager.before_step`), which the fused and the non-fused optimizer alike need.
The stock Trainer's own NaN filter has already waited for the loss by then, so the read waits for the gradient
norm's reduction only. `bench/gpu.py` reports the profiler's sync count where a GPU is lent.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Trainer, TrainerCallback

from hf_r8 import R8Callback
from hf_r8.runtime import host_copy
from tests.trainer_setup import training_args

pytestmark = pytest.mark.integration
WINDOW = range(20, 40)  # steps past warmup, between two logging steps


class HostReads(TorchDispatchMode):
    """Counts host reads of tensors while `counting`; a `HostCopy` result is already on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = False
        self.reads = 0
        self.copied: list[torch.Tensor] = []
        """What `HostCopy.result()` returned (kept alive: an identity is never reused)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))

    def read_by_method(self, tensor: torch.Tensor) -> None:
        if self.counting and not any(tensor is copied for copied in self.copied):
            self.reads += 1


class CountInWindow(TrainerCallback):
    def __init__(self, reads: HostReads) -> None:
        self.reads = reads

    def on_step_begin(self, args, state, control, **kwargs):
        self.reads.counting = state.global_step in WINDOW

    def on_train_end(self, args, state, control, **kwargs):
        self.reads.counting = False


@pytest.fixture
def host_reads(monkeypatch):
    reads = HostReads()
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(tensor, *args, _original=original, **kwargs):
            reads.read_by_method(tensor)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_result = host_copy.HostCopy.result

    def result(copy):
        landed = original_result(copy)
        reads.copied.append(landed)
        return landed

    monkeypatch.setattr(host_copy.HostCopy, "result", result)
    return reads


def reads_per_step(host_reads: HostReads, model_factory, dataset, output_dir, optim: str, r8: bool) -> float:
    host_reads.reads = 0
    callbacks = [CountInWindow(host_reads), *([R8Callback()] if r8 else [])]
    args = training_args(output_dir, max_steps=50, per_device_train_batch_size=8, optim=optim, logging_steps=50)
    with host_reads:
        Trainer(model=model_factory(), args=args, train_dataset=dataset, callbacks=callbacks).train()
    return host_reads.reads / len(WINDOW)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_the_default_adds_one_host_read_per_step_the_guards(optim, host_reads, tokenizer, lm_dataset, tmp_path):
    from hf_r8.demo.offline import tiny_gpt2

    def model_factory():
        return tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)

    stock = reads_per_step(host_reads, model_factory, lm_dataset, tmp_path / "stock", optim, r8=False)
    with_r8 = reads_per_step(host_reads, model_factory, lm_dataset, tmp_path / "r8", optim, r8=True)
    print(f"{optim}: stock {stock:.2f}, R8Callback() {with_r8:.2f} host reads per steady-state step")
    assert stock > 0  # the counter sees the stock Trainer's own reads (its NaN filter): else it proves nothing
    assert with_r8 - stock == pytest.approx(1.0)
