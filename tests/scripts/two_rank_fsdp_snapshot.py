"""Run under `torchrun --nproc_per_node 2`: rollback snapshots of an FSDP2-sharded model (gloo on CPU).

Each process captures and restores only its own shards; writes OUTPUT_DIR/rank<k>.json with what it checked.
"""

from __future__ import annotations

import faulthandler
import sys

import torch
import torch.distributed as dist
from rank_result import write_rank_result
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hf_r8.demo.offline import tiny_gpt2
from hf_r8.runtime.snapshot import StateSnapshot, local_part, snapshot_bytes, trainable_parameter_names


def local_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [local_part(param).detach().clone() for param in model.parameters()]
    for param in model.parameters():
        tensors += [local_part(value).clone() for value in optimizer.state[param].values() if torch.is_tensor(value)]
    return tensors


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    torch.manual_seed(1)  # the same dropout masks whenever these batches are trained again
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = tiny_gpt2(512, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    full_bytes = sum(param.numel() * param.element_size() for param in model.parameters())
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 512, (4, 16), generator=generator) for _ in range(6)]
    train(model, optimizer, batches[:3])

    snapshot = StateSnapshot(trainable_parameter_names(model))
    snapshot.capture(model, optimizer, step=3)
    captured = local_state(model, optimizer)
    first = next(model.parameters())
    captured_exp_avg = local_part(optimizer.state[first]["exp_avg"]).clone()
    train(model, optimizer, batches[3:])
    after_first_pass = local_state(model, optimizer)
    snapshot.restore(model, optimizer)
    restored = local_state(model, optimizer)
    train(model, optimizer, batches[3:])  # the same steps again from the restored state
    replayed = local_state(model, optimizer)

    # Optimizer state dropped since the capture (lazy state) comes back as DTensors with the saved shards.
    optimizer.state.pop(first)
    snapshot.restore(model, optimizer)
    rebuilt = optimizer.state[first]["exp_avg"]

    result = {
        "parameters_are_dtensors": all(isinstance(param, DTensor) for param in model.parameters()),
        "moved_after_capture": any(not torch.equal(a, b) for a, b in zip(captured, after_first_pass, strict=True)),
        "restored_exactly": all(torch.equal(a, b) for a, b in zip(captured, restored, strict=True)),
        "replay_matches": all(torch.equal(a, b) for a, b in zip(after_first_pass, replayed, strict=True)),
        "rebuilt_is_dtensor": isinstance(rebuilt, DTensor) and rebuilt.shape == first.shape,
        "rebuilt_matches": torch.equal(local_part(rebuilt), captured_exp_avg),
        "snapshot_bytes": snapshot.nbytes,
        "estimated_bytes": snapshot_bytes(model, optimizer, trainable_parameter_names(model)),
        "full_parameter_bytes": full_bytes,
    }
    write_rank_result(output_dir, result)


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)
    main(sys.argv[1])
