"""Every example runs offline with its smallest settings (as a user would start it, in a fresh process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_distributed import free_port

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(("script", "arguments", "expected"), [
    ("stock_trainer.py", ["--steps", "5"], "r8 step 5/5"),  # the dashboard's line: R8 ran to the end
    ("trl_grpo.py", ["--steps", "3", "--model", "hf-r8-tests/no-such-model"], "final LR gain"),
    ("trl_rloo.py", ["--steps", "3", "--beta", "0"], "final LR gain"),
])
def test_example_runs_offline(tmp_path, script, arguments, expected):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    flags = [] if script == "stock_trainer.py" else ["--output-dir", str(tmp_path / "run")]
    completed = subprocess.run([sys.executable, str(EXAMPLES / script), *arguments, *flags], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert expected in completed.stdout
    if script != "stock_trainer.py":
        assert "offline:tiny-gpt2" in completed.stdout  # a --model that cannot be loaded falls back at once
        assert (tmp_path / "run" / "r8_report" / "summary.md").is_file()


def test_accelerate_example_runs_two_processes_with_one_dashboard(tmp_path):
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the `accelerate` of this Python
    # Its own port: another 2-process job on the default one would join this one's rendezvous.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": path, "PORT": str(free_port())}
    completed = subprocess.run(["bash", str(EXAMPLES / "accelerate_ddp.sh"), "--steps", "5"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("r8 step 5/5") == 1  # two processes, the dashboard on the main one only
