"""Ablation of exploration dither and reversible freezing on the benchmark tasks.

    python bench/dither_freezing.py            # ~10 min on 2 CPU cores (runs one after another)
    python bench/dither_freezing.py --seeds 0  # quicker

Each variant is hf_r8's `default` preset on cosine with warmup, plus: nothing (`none`), dither
(`exploration.enabled`, sigma law from 1e-3), freezing with its defaults, freezing with a loose
threshold (tensors below 30% of the median gradient norm for 30 steps: it freezes whatever is
quieter than most), and dither + freezing. Reported per task, medians over seeds: final held-out loss,
steps to reach the `none` variant's final held-out loss, wall-clock per optimizer step (forward,
backward, optimizer and callbacks; evaluation excluded) and the mean frozen fraction of the trainable
parameters. Runs one at a time on one thread, so step times compare.

Writes bench/results/dither_freezing.md and .json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_r8 import R8Callback, R8Config

sys.path.insert(0, str(Path(__file__).parent))
from tasks import TASKS, Task  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LEARNING_RATE = {"causal_lm": 3e-3, "digits": 3e-3}


def _dither(config: R8Config) -> None:
    config.exploration.enabled = True


def _freezing(config: R8Config) -> None:
    config.freezing.enabled = True


def _loose_freezing(config: R8Config) -> None:
    config.freezing.enabled = True
    config.freezing.threshold, config.freezing.revive_threshold, config.freezing.patience_steps = 0.3, 0.6, 30


def _both(config: R8Config) -> None:
    _dither(config)
    _freezing(config)


VARIANTS: dict[str, Callable[[R8Config], None]] = {
    "none": lambda config: None, "dither": _dither, "freezing": _freezing, "freezing_loose": _loose_freezing,
    "dither+freezing": _both,
}


class StepTimer(TrainerCallback):
    """Wall-clock from each step's begin to its end (what evaluation does not include)."""

    def __init__(self) -> None:
        self.started, self.total = 0.0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.total += time.perf_counter() - self.started


def run(task: Task, variant: str, seed: int, output_dir: Path) -> dict:
    config = R8Config.from_preset("default")
    config.dashboard = config.run_files = config.report = False
    VARIANTS[variant](config)
    steps, timer = task.steps, StepTimer()
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=task.batch_size,
        per_device_eval_batch_size=256, learning_rate=LEARNING_RATE[task.name], lr_scheduler_type="cosine",
        warmup_steps=steps // 10, eval_strategy="steps", eval_steps=steps // 15, logging_steps=steps // 30,
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=seed, data_seed=seed,
        log_level="error")
    r8 = R8Callback(config)
    trainer = Trainer(model=task.make_model(seed), args=args, train_dataset=task.train, eval_dataset=task.eval,
                      callbacks=[r8, timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    history = trainer.state.log_history
    evaluations = [(int(entry["step"]), float(entry["eval_loss"])) for entry in history if "eval_loss" in entry]
    frozen = [entry["r8/frozen_fraction"] for entry in history if "r8/frozen_fraction" in entry]
    return {"task": task.name, "variant": variant, "seed": seed, "evaluations": evaluations,
            "final_eval_loss": evaluations[-1][1], "seconds_per_step": timer.total / steps,
            "mean_frozen_fraction": statistics.fmean(frozen) if frozen else 0.0,
            "frozen_tensors": sorted({event.reason.split(":")[0] for event in r8.events if event.action == "freeze"})}


def steps_to(target: float, evaluations: list[list[float]]) -> float:
    return next((step for step, loss in evaluations if loss <= target), math.inf)


def table(runs: list[dict], task_name: str) -> list[str]:
    mine = [run for run in runs if run["task"] == task_name]
    target = statistics.median(run["final_eval_loss"] for run in mine if run["variant"] == "none")
    lines = [f"### {task_name} (target: `none`'s median final loss {target:.4f})", "",
             "| variant | final eval loss | steps to target | ms per step | vs none | mean frozen fraction |",
             "|---|---|---|---|---|---|"]
    base_time = statistics.median(run["seconds_per_step"] for run in mine if run["variant"] == "none")
    for variant in VARIANTS:
        chosen = [run for run in mine if run["variant"] == variant]
        step_time = statistics.median(run["seconds_per_step"] for run in chosen)
        reached = statistics.median(steps_to(target, run["evaluations"]) for run in chosen)
        lines.append(f"| {variant} | {statistics.median(run['final_eval_loss'] for run in chosen):.4f} | "
                     f"{reached if math.isfinite(reached) else 'not reached'} | {1000 * step_time:.2f} | "
                     f"{step_time / base_time:.3f} | "
                     f"{statistics.median(run['mean_frozen_fraction'] for run in chosen):.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["causal_lm", "digits"], choices=["causal_lm", "digits"])
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_r8").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    started, runs = time.perf_counter(), []
    for task_name in options.tasks:
        task = TASKS[task_name](False)
        for seed in options.seeds:
            for variant in VARIANTS:  # interleaved: machine noise spreads over every variant alike
                result = run(task, variant, seed, RESULTS / "tmp" / "dither_freezing")
                runs.append(result)
                print(f"{task_name:10s} {variant:16s} seed={seed} eval_loss={result['final_eval_loss']:.4f} "
                      f"{1000 * result['seconds_per_step']:.2f} ms/step frozen={result['mean_frozen_fraction']:.3f}",
                      flush=True)
    lines = ["# Dither and freezing ablation (`bench/dither_freezing.py`)", "",
             f"Machine: {platform.machine()}, one torch thread, torch {torch.__version__}; seeds {options.seeds}; "
             f"hf_r8 `default` on cosine with 10% warmup, lr {LEARNING_RATE}; medians over seeds; "
             f"{(time.perf_counter() - started) / 60:.1f} min.", ""]
    for task_name in options.tasks:
        lines += [*table(runs, task_name), ""]
        frozen = sorted({name for run in runs if run["task"] == task_name for name in run["frozen_tensors"]})
        lines += [f"Tensors frozen at least once: {', '.join(f'`{name}`' for name in frozen) or 'none'}.", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dither_freezing.md").write_text("\n".join(lines), encoding="utf-8")
    (RESULTS / "dither_freezing.json").write_text(json.dumps(runs), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
