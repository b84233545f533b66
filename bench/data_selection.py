"""Which examples to train on: uniform shuffling, R8's balanced quartiles, InfoBatch, small-loss mixing.

    python bench/data_selection.py [--seeds 5] [--settings ...]   # writes bench/results/data_selection.md, .png

Every run is an R8Trainer with the LR controller off (rules: []), so only the order and weighting of
examples differ; same model init, seeds and budget of forward+backward passes (steps x batch). Tasks:
a `make_classification` set (10,000 held-out) and digits with 20% and 40% of the training labels
replaced by random ones (held-out labels clean), and the causal LM. Passes-to-target: the first
evaluation at which the median held-out accuracy (or LM loss) over seeds reaches the uniform
baseline's final median. "small_loss" is the `noisy_labels` preset's sampler.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import PrinterCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tasks import causal_lm, digits, synthetic_classes  # noqa: E402

from hf_r8 import R8Config, R8Trainer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = {  # name -> R8Config.sampler
    "uniform": {"mode": "uniform"},
    "balanced": {"mode": "balanced"},
    "infobatch": {"mode": "infobatch"},
    "small_loss": R8Config.from_preset("noisy_labels").to_dict()["sampler"],
}
SETTINGS = {  # name -> (task builder, label noise, steps, lr, metric)
    "synthetic_noise20": ("synthetic", 0.2, 2400, 5e-3, "accuracy"),
    "synthetic_noise40": ("synthetic", 0.4, 2400, 5e-3, "accuracy"),
    "digits_noise20": ("digits", 0.2, 600, 2e-3, "accuracy"),
    "digits_noise40": ("digits", 0.4, 600, 1e-3, "accuracy"),
    "causal_lm": ("causal_lm", 0.0, 400, 3e-3, "loss"),
}


@functools.cache
def _task(name: str, noise: float):
    task = {"digits": digits, "synthetic": synthetic_classes, "causal_lm": causal_lm}[name](quick=True)
    if noise:
        rng = np.random.default_rng(1)
        labels = np.array(task.train["labels"])
        flipped = rng.random(len(labels)) < noise
        labels[flipped] = rng.integers(0, 10, flipped.sum())
        task.train = task.train.remove_columns("labels").add_column("labels", labels.tolist())
    return task


def _accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def run(setting: str, mode: str, seed: int) -> dict:
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    task_name, noise, steps, lr, metric = SETTINGS[setting]
    task = _task(task_name, noise)
    eval_every = steps // 20
    args = TrainingArguments(
        output_dir=str(RESULTS / "tmp" / str(os.getpid())), max_steps=steps,
        per_device_train_batch_size=task.batch_size, per_device_eval_batch_size=256, learning_rate=lr,
        lr_scheduler_type="constant", eval_strategy="steps", eval_steps=eval_every, logging_steps=eval_every,
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=seed, log_level="error",
        weight_decay=0.0)
    config = R8Config.from_dict({"rules": [], "sampler": MODES[mode]})
    trainer = R8Trainer(model=task.make_model(seed), args=args, train_dataset=task.train, eval_dataset=task.eval,
                        r8=config, compute_metrics=_accuracy if metric == "accuracy" else None)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    values = [entry[f"eval_{metric}"] for entry in history]
    passes = [int(entry["step"]) * task.batch_size for entry in history]
    return {"setting": setting, "mode": mode, "seed": seed, "passes": passes, "values": values}


def _median_curve(runs: list[dict]) -> list[float]:
    return [statistics.median(run["values"][i] for run in runs) for i in range(len(runs[0]["values"]))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    options = parser.parse_args(argv)
    started = time.perf_counter()
    jobs = [(setting, mode, seed) for setting in options.settings for mode in MODES for seed in range(options.seeds)]
    with ProcessPoolExecutor(options.workers) as pool:
        runs = list(pool.map(run, *zip(*jobs, strict=True)))
    elapsed = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_selection.json").write_text(json.dumps(runs))
    lines = ["# Data selection: uniform, balanced quartiles, InfoBatch-style pruning, small-loss mixing", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, one torch thread per run; {len(runs)} runs in "
             f"{elapsed / 60:.1f} min; seeds {list(range(options.seeds))}; medians over seeds. LR controller off "
             "(rules: []), constant LR; passes = optimizer steps x batch size (forward+backward of one example).", "",
             "| setting | metric | mode | final (median) | passes to uniform's final | fewer than the full budget |",
             "|---|---|---|---|---|---|"]
    figure, axes = plt.subplots(1, len(options.settings), figsize=(5 * len(options.settings), 4), squeeze=False)
    for axis, setting in zip(axes[0], options.settings, strict=True):
        metric = SETTINGS[setting][4]
        better = (lambda a, b: a >= b) if metric == "accuracy" else (lambda a, b: a <= b)
        curves = {mode: _median_curve([r for r in runs if r["setting"] == setting and r["mode"] == mode])
                  for mode in MODES}
        passes = next(r["passes"] for r in runs if r["setting"] == setting)
        target = curves["uniform"][-1]
        for mode in MODES:
            reached = next((p for p, v in zip(passes, curves[mode], strict=True) if better(v, target)), None)
            saved = "—" if reached is None else f"{1 - reached / passes[-1]:.0%}"
            lines.append(f"| {setting} | held-out {metric} | {mode} | {curves[mode][-1]:.4f} | "
                         f"{'never' if reached is None else reached} | {saved} |")
            axis.plot(passes, curves[mode], label=mode)
        axis.axhline(target, color="gray", linewidth=0.8)
        axis.set(title=setting, xlabel="forward+backward passes", ylabel=f"held-out {metric}")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "data_selection.png", dpi=110)
    lines += ["", "![data selection](data_selection.png)", ""]
    (RESULTS / "data_selection.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
