"""The README's code blocks work as written: each Python block runs (its placeholders — `model`,
`args`, `ds`, ... — bound to tiny real objects, and the trainer it builds trained for a few steps);
each shell command runs (`make` targets as a dry run: they install and run everything)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_r8.demo.offline import english_paragraphs, tiny_gpt2

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parent.parent
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.DOTALL)


def readme_blocks(language: str) -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return [code for found, code in BLOCK.findall(readme) if found == language]


def placeholders(tmp_path: Path, tokenizer: Any, lm_dataset: Dataset) -> dict[str, Any]:
    """What the README's snippets leave to the reader, as tiny real objects."""
    from trl import GRPOConfig

    model = tiny_gpt2(len(tokenizer))
    model_dir = str(tmp_path / "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = {"output_dir": str(tmp_path / "run"), "max_steps": 3, "report_to": [], "save_strategy": "no",
              "per_device_train_batch_size": 4, "use_cpu": True}
    return {
        "Trainer": Trainer, "MyTrainer": type("MyTrainer", (Trainer,), {}),
        "model": model, "ds": lm_dataset.select(range(64)),
        "args": TrainingArguments(learning_rate=1e-3, **common),
        "model_dir": model_dir,
        "grpo_args": GRPOConfig(num_generations=4, max_completion_length=8, beta=0.0, learning_rate=1e-3, **common),
        "prompts": Dataset.from_dict({"prompt": [text[:30] for text in english_paragraphs()[:16]]}),
        "my_reward": lambda completions, **kwargs: [completion.count("e") / max(1, len(completion))
                                                    for completion in completions],
    }


@pytest.mark.parametrize("index", range(len(readme_blocks("python"))))
def test_readme_python_block_runs(index, tmp_path, tokenizer, lm_dataset):
    code = readme_blocks("python")[index]
    namespace = placeholders(tmp_path, tokenizer, lm_dataset)
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    if "scheduler" in namespace:  # the plain PyTorch loop: self-contained, it ran as written
        assert namespace["scheduler"].last_epoch == 200 and namespace["scheduler"].events
        return
    trainer = namespace["trainer"]
    if ".train()" not in code:
        trainer.train()
    assert trainer.state.global_step == 3
    assert any(callback.__class__.__name__ == "R8Callback" for callback in trainer.callback_handler.callbacks)


def test_readme_shell_commands_run(tmp_path):
    commands = [line.split("#")[0].strip() for block in readme_blocks("bash") for line in block.splitlines()]
    commands = [command for command in commands if command]
    assert {"make demo", "make test"} <= set(commands)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "make":  # what it would do, not a reinstall and a recursive test run
            argv, cwd = ["make", "-n", *argv[1:]], ROOT
        else:
            cwd = tmp_path
        completed = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, f"{command}: {completed.stderr[-2000:]}"


def _readme_text() -> str:
    return " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())


def test_the_readme_quotes_the_defaults_as_they_are():
    """The numbers the README gives for the default's LR search and bounds are the default config's."""
    from hf_r8 import R8Config
    from hf_r8.control.range_test import range_test_length

    config = R8Config.from_preset("default").range_test
    shortest = next(steps for steps in range(1, 10_000) if range_test_length(config, steps) is not None)
    text = _readme_text()
    assert (f"an **LR range test** of {config.budget_fraction:.0%} of `max_steps` (at least {config.min_steps} "
            f"steps, at most {config.max_steps}; runs under {shortest} steps get no test) sweeps the LR from "
            f"{config.gain_min:g}× to {config.gain_max:,.0f}× the one you set") in text
    assert f"Your LR is kept when the choice is within ×{config.keep_band:g} of it" in text
    assert f"only {config.divergence_patience} in a row are a blow-up" in text
    top = config.gain_max / config.backoff
    assert (f"the test itself chooses between {config.gain_min:g}× and {top:,.0f}× your LR (the sweep's top over its "
            f"backoff of {config.backoff:g}), so without `bounds.lr_max` a run can use up to {top * 20:,.0f}× the LR "
            "you set") in text


def test_the_readme_counts_the_tests_there_are():
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
    count = int(re.search(r"(\d+) tests? collected", collected.stdout).group(1))
    assert f"`make test` runs `ruff` and {count} tests" in _readme_text()
