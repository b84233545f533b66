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


NO_SUCH_MODEL = "hf-r8-tests/no-such-model"  # a --model that cannot be loaded: the example falls back at once


@pytest.mark.parametrize(("script", "arguments", "expected"), [
    ("trainer_callback_only.py", ["--steps", "5", "--model", NO_SUCH_MODEL], "r8 step 5/5"),  # the dashboard's line
    # 2 steps an epoch: the cataloging epoch, then one planned from the catalog
    ("r8_trainer.py", ["--steps", "4", "--examples", "32", "--model", NO_SUCH_MODEL],
     "sampler/plan: epoch 1: balanced quartiles"),
    ("sft_trl.py", ["--steps", "4", "--examples", "32", "--model", NO_SUCH_MODEL],
     "sampler/plan: epoch 1: balanced quartiles"),
    ("peft_lora.py", ["--steps", "4", "--model", NO_SUCH_MODEL], "4 parameter tensors, LoRA adapters only"),
    ("moe_tiny.py", ["--steps", "4", "--model", NO_SUCH_MODEL], "LR gain within bounds at every step: True"),
    ("trl_grpo.py", ["--steps", "3", "--model", NO_SUCH_MODEL], "final LR gain"),
    ("trl_rloo.py", ["--steps", "3", "--beta", "0"], "final LR gain"),
])
def test_example_runs_offline(tmp_path, script, arguments, expected):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    completed = subprocess.run([sys.executable, str(EXAMPLES / script), *arguments, "--output-dir", str(run_dir)],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert expected in completed.stdout
    assert "model: offline:" in completed.stdout  # the offline tiny model (GPT-2, or Mixtral for moe_tiny.py)
    assert (run_dir / "r8" / "r8_report" / "summary.md").is_file()


@pytest.mark.parametrize(("script", "arguments", "expected"), [
    ("plain_torch_loop.py", ["--steps", "60"], "after 60 steps"),
    ("ask_for_batches.py", ["--epochs", "2", "--examples", "128"], "every example cataloged: True"),
])
def test_examples_outside_the_trainer_run_offline(tmp_path, script, arguments, expected):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(EXAMPLES / script), *arguments, "--model", NO_SUCH_MODEL],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "model: offline:" in completed.stdout and expected in completed.stdout
    assert "decision/increase" in completed.stdout  # the controller acted on the losses it was handed


def test_accelerate_example_runs_two_processes_with_one_dashboard(tmp_path):
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the `accelerate` of this Python
    # Its own port: another 2-process job on the default one would join this one's rendezvous.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": path, "PORT": str(free_port())}
    completed = subprocess.run(["bash", str(EXAMPLES / "accelerate_ddp.sh"), "--steps", "5"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("r8 step 5/5") == 1  # two processes, the dashboard on the main one only
