"""R8 under DeepSpeed ZeRO 1, 2 and 3 on CPU (gloo), in one process and in two (torchrun).

The engine takes the real optimizer step inside backward, before `on_pre_optimizer_step`: these runs check
that R8's LR is the one every real step uses (a step pre-hook on the innermost torch optimizer), that it is the
LR logged, and that it equals the run without DeepSpeed on the same signals; that a NaN step is skipped by the
engine and a spike rolled back to a snapshot of each process's own ZeRO partitions, restored in place; and that
a run resumed from a DeepSpeed checkpoint goes on with the LRs of the uninterrupted one. Nothing compiles: no
"optimizer" block in the DeepSpeed config, and no CPU shared-memory comm op (`skip_deepspeed_shm_op`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from deepspeed_run import NAN_STEP, SPIKE_STEPS  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(output_dir: Path, *arguments: str, processes: int = 1) -> tuple[subprocess.Popen, Path]:
    """Start deepspeed_run.py (under torchrun for two processes) without waiting: the runs of a test overlap."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SCRIPTS.parent.parent)}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                     "--master_port", str(free_port())]
    command = [*launcher, str(SCRIPTS / "deepspeed_run.py"), str(output_dir), *arguments]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), output_dir


def finish(*runs: tuple[subprocess.Popen, Path], processes: int = 1) -> list[list[dict]]:
    """Wait for each run; the results of its ranks."""
    results = []
    for process, output_dir in runs:
        output, _ = process.communicate(timeout=240)
        assert process.returncode == 0, output[-4000:]
        ranks = sorted(output_dir.glob("rank*.json"))
        assert len(ranks) in (1, processes), ranks
        results.append([json.loads(path.read_text()) for path in ranks])
    return results


def applied(rank: dict) -> list[tuple[float, float]]:
    """(LR used, LR logged) of every step the engine applied (a skipped step used none)."""
    return [(used, logged) for used, logged in zip(rank["used"], rank["logged"], strict=True) if not math.isnan(used)]


def test_zero_1_2_3_use_the_lr_r8_sets_for_every_step_the_same_as_without_deepspeed(tmp_path):
    runs = {stage: start(tmp_path / stage, "--stage", stage, "--max-steps", "24") for stage in ("none", "1")}
    results = dict(zip(runs, finish(*runs.values()), strict=True))
    runs = {stage: start(tmp_path / stage, "--stage", stage, "--max-steps", "24") for stage in ("2", "3")}
    results.update(zip(runs, finish(*runs.values()), strict=True))
    without = results.pop("none")[0]
    assert max(without["gains"]) > 1.5, "this test would prove nothing if R8 left the schedule's LR as it is"
    assert len(set(without["used"])) > 20, "...or if the LR did not move between steps"
    for stage, (rank,) in results.items():
        assert rank["used"] == without["used"], f"ZeRO-{stage}: the LRs of the real steps differ (no delay)"
        assert rank["logged"] == rank["used"], f"ZeRO-{stage}: the logged learning_rate is not the LR used"


def check_faults(rank: dict, stage: str) -> None:
    """The NaN step skipped by the engine, the second spike rolled back to a snapshot restored bit for bit."""
    assert rank["engine_skipped_steps"] == 1 and math.isnan(rank["used"][NAN_STEP - 1])
    guard = [event for event in rank["events"] if event[1] == "guard"]
    assert guard == [[NAN_STEP, "guard", "skip_step", guard[0][3]]] and "DeepSpeed engine skipped" in guard[0][3]
    assert rank["weights_finite"]
    assert rank["counts"]["rollbacks"] == 1 and rank["counts"]["skipped_steps"] == 1
    snapshot_step = str(rank["snapshot_steps"][-1])
    restored_at = str(SPIKE_STEPS[1])
    assert int(snapshot_step) < SPIKE_STEPS[0]
    assert rank["digests"][snapshot_step] == rank["digests"][restored_at], f"ZeRO-{stage}: partitions not restored"
    assert rank["digests"][snapshot_step] != rank["digests"][str(SPIKE_STEPS[0])], "...or nothing had changed"
    # The forward uses the restored weights (at ZeRO-3 the gathered copies of the small tensors too).
    assert rank["probe_losses"][snapshot_step] == rank["probe_losses"][restored_at]
    assert all(used == logged for used, logged in applied(rank))


def test_one_process_zero_1_2_3_skip_a_nan_step_and_roll_back_a_spike(tmp_path):
    faults = ("--faults", "nan", "spikes", "--max-steps", "28")
    runs = {stage: start(tmp_path / stage, "--stage", stage, *faults) for stage in ("1", "2", "3")}
    for stage, (rank,) in zip(runs, finish(*runs.values()), strict=True):
        check_faults(rank, stage)


def test_two_processes_zero_2_and_3_agree_skip_a_nan_step_and_roll_back_their_own_partitions(tmp_path):
    faults = ("--faults", "nan", "spikes", "--max-steps", "28", "--real-loss")
    runs = {"2": start(tmp_path / "2", "--stage", "2", "--warmup-lr", *faults, processes=2),
            "3": start(tmp_path / "3", "--stage", "3", *faults, processes=2)}
    for stage, ranks in zip(runs, finish(*runs.values(), processes=2), strict=True):
        assert [rank["world_size"] for rank in ranks] == [2, 2]
        for rank in ranks:
            check_faults(rank, stage)
        assert max(ranks[0]["gains"]) > 1.2, "this test would prove nothing if R8 left the LR as it is"
        for key in ("used", "logged", "events", "counts", "snapshot_steps"):
            assert ranks[0][key] == ranks[1][key], key
        assert ranks[0]["digests"] != ranks[1]["digests"], "each rank holds its own partitions"


def test_a_run_resumed_from_a_deepspeed_checkpoint_goes_on_with_the_same_lrs(tmp_path):
    common = ("--max-steps", "20", "--faults", "nan", "--real-loss")
    setups = {"2": ("--stage", "2"), "3": ("--stage", "3")}
    processes = {"2": 1, "3": 2}
    uninterrupted = finish(*(start(tmp_path / f"whole{stage}", *setup, *common, "--save-steps", "8",
                                   processes=processes[stage]) for stage, setup in setups.items()), processes=2)
    resumed = finish(*(start(tmp_path / f"resumed{stage}", *setup, *common, "--resume",
                             str(tmp_path / f"whole{stage}" / "checkpoint-8"), processes=processes[stage])
                       for stage, setup in setups.items()), processes=2)
    for stage, whole_ranks, resumed_ranks in zip(setups, uninterrupted, resumed, strict=True):
        for whole, again in zip(whole_ranks, resumed_ranks, strict=True):
            assert whole["gains"][7] != 1.0, "this test would prove nothing if the gain were 1 at the checkpoint"
            assert again["used"][8:] == whole["used"][8:], f"ZeRO-{stage}: the resumed LRs differ"
            assert again["logged"][-12:] == whole["logged"][8:]
            assert again["engine_skipped_steps"] == 1 and again["weights_finite"]


def test_the_zero3_example_runs_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NPROC": "1", "PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    example = SCRIPTS.parent.parent / "examples" / "deepspeed_zero3.sh"
    completed = subprocess.run(["bash", str(example), "--steps", "10"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "R8 under DeepSpeed ZeRO-3" in completed.stdout
    step_ten = next(line for line in completed.stdout.splitlines() if line.startswith("step   10"))
    used, logged = step_ten.split("LR used ")[1].split("  logged ")
    assert float(used) == float(logged.split()[0])
