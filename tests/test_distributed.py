"""Two real processes (torchrun, gloo on CPU): every rank sees the same averaged signals and decides the same."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).parent / "scripts"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_ranks(script: str, output_dir: Path) -> None:
    # The repository root on the path: a script may share test helpers (`tests.…`).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SCRIPTS.parent.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(SCRIPTS / script), str(output_dir)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_two_ranks_average_signals_and_decide_the_same(tmp_path):
    run_two_ranks("two_rank_training.py", tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["world_size"] == 2
    assert rank0["controller"] == rank1["controller"]
    assert rank0["learning_rates"] == rank1["learning_rates"]
    assert rank0["local_losses"] != rank1["local_losses"], "ranks should see different data"
    # The controller saw the mean over ranks (its rolling window holds the last steps but the pending one).
    window = len(rank0["controller"]["loss"]["rolling"])
    averaged = [(a + b) / 2 for a, b in zip(rank0["local_losses"], rank1["local_losses"], strict=True)]
    assert rank0["controller"]["loss"]["rolling"] == pytest.approx(averaged[-1 - window:-1], rel=1e-6)


def test_two_ranks_hold_identical_catalogs_and_split_the_cataloging_epoch(tmp_path):
    from hf_r8.data.catalog import LossCatalog

    run_two_ranks("two_rank_r8trainer.py", tmp_path)
    catalogs = [LossCatalog.load(tmp_path / f"rank{rank}") for rank in (0, 1)]
    assert catalogs[0].equals(catalogs[1])
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text())["seen_indices"] for rank in (0, 1)]
    # 64 examples, 4 per rank per step: the first 8 steps are the cataloging epoch
    epoch_one = [index for rank in (0, 1) for batch in seen[rank][:8] for index in batch]
    assert sorted(epoch_one) == list(range(64))
    assert catalogs[0].usage.sum() == 12 * 8 and catalogs[0].seen.all()


def test_a_fault_on_one_rank_gets_the_same_action_on_every_rank(tmp_path):
    from hf_r8.data.catalog import LossCatalog

    run_two_ranks("two_rank_rollback.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # rank 1's NaN: both skip step 30; its first garbage batch: both skip step 40; its second: both roll back
    assert ranks[0]["skipped_steps"] == ranks[1]["skipped_steps"] == 2
    assert ranks[0]["rollback_steps"] == ranks[1]["rollback_steps"] == [41]
    assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"] and ranks[0]["weights_finite"]
    assert LossCatalog.load(tmp_path / "rank0").equals(LossCatalog.load(tmp_path / "rank1"))
    # The low-loss batches served after the rollback come from one plan, split disjointly between ranks.
    for first, second in zip(ranks[0]["seen_indices"], ranks[1]["seen_indices"], strict=True):
        assert not set(first) & set(second)


def accelerate_launch_two(script: str, output_dir: Path, *arguments: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(free_port()),
               str(SCRIPTS / script), str(output_dir), *arguments]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_accelerate_launch_keeps_every_rank_in_lockstep(tmp_path):
    ranks = accelerate_launch_two("accelerate_lockstep.py", tmp_path)
    assert ranks[0]["world_size"] == ranks[0]["accelerate_processes"] == 2  # a real 2-process run, not 2 alone
    assert ranks[0]["steps"] == ranks[1]["steps"] == 30
    for first, second in zip(ranks[0]["seen_indices"], ranks[1]["seen_indices"], strict=True):
        assert not set(first) & set(second)  # each process trains on its own share
    assert ranks[0]["disagreements"] == ranks[1]["disagreements"] == []  # same LRs and catalog after every step
    assert ranks[0]["decisions"] == ranks[1]["decisions"] > 0  # the controller acted, identically
    # the LR range test swept on both ranks before the first step, on the same losses, and chose the same gain
    (test_end, _), = ranks[0]["range_test"]
    assert ranks[0]["range_test"] == ranks[1]["range_test"] and test_end == 0


def test_a_moe_model_on_two_processes_keeps_routers_apart_and_ranks_in_lockstep(tmp_path):
    ranks = accelerate_launch_two("accelerate_lockstep.py", tmp_path, "moe")
    assert ranks[0]["world_size"] == ranks[0]["accelerate_processes"] == 2
    assert ranks[0]["steps"] == ranks[1]["steps"] == 30
    assert ranks[0]["disagreements"] == ranks[1]["disagreements"] == []  # same LRs (routers too) after every step
    assert ranks[0]["routers"] == [False, False, True]
    (low, high, gain), = ranks[0]["router_gains"]
    assert (low, high) == (0.1, 2.0) and low <= gain <= high
    # The router aux loss was averaged over both processes: every rank's controller holds the same value.
    assert ranks[0]["aux_loss_ema"] is not None and ranks[0]["aux_loss_ema"] == ranks[1]["aux_loss_ema"]


def test_fsdp2_sharded_snapshots_restore_each_process_shard_exactly(tmp_path):
    run_two_ranks("two_rank_fsdp_snapshot.py", tmp_path)
    for rank in (0, 1):
        checks = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert checks["parameters_are_dtensors"] and checks["moved_after_capture"]
        assert checks["restored_exactly"] and checks["replay_matches"]  # weights and AdamW state, bit for bit
        assert checks["rebuilt_is_dtensor"] and checks["rebuilt_matches"]  # lazily dropped state comes back sharded
        # Each process holds its half: parameters + exp_avg + exp_avg_sq unsharded would be 3x the full bytes.
        assert checks["snapshot_bytes"] == checks["estimated_bytes"] < 0.55 * 3 * checks["full_parameter_bytes"]
