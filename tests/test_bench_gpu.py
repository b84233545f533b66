"""bench/gpu.py stays working: the GPU figures' script, run on CPU at a toy size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

GPU_BENCH = Path(__file__).parent.parent / "bench" / "gpu.py"


@pytest.mark.integration
def test_the_gpu_bench_runs_both_trainers_and_writes_its_table(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", GPU_BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    output = tmp_path / "gpu.md"
    # 160 steps: long enough for the default's range test (15 steps) to run inside R8Trainer's run
    assert module.main(["--tiny", "--steps", "160", "--pairs", "1", "--output", str(output)]) == 0
    text = output.read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| stock Trainer", "| R8Trainer"))]
    assert len(rows) == 2
    step_times = [float(row.split("|")[2]) for row in rows]
    assert all(0 < step_time < 5 for step_time in step_times)
    assert "Step-time ratio R8 / stock" in text
