"""What the hypergradient rule reads: the update alignment at LRs below, at and above each task's best.

For each quick task, cosine at 100x, 10x below its best LR, at it and 10x above (seed 0, 150 steps), the rule
runs without ever acting (significance 1e9) and the mean of its window of alignments (the cosine of each
step's gradient with the optimizer's last update) is read every 25 steps. Prints a table and writes
results/update_alignment.md.

    python bench/update_alignment.py
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))

from lr_sweep import _task, run_one  # noqa: E402
from methods import METHODS  # noqa: E402

from hf_r8 import R8Callback, R8Config  # noqa: E402

BEST_LR = {"causal_lm": 3e-3, "finetune": 1e-2, "digits": 1e-2, "tabular": 3e-2}
"""Cosine's best LR on each quick task (results/lr_sweep_quick.md)."""
EVERY = 25


class WindowMeans(TrainerCallback):
    """The hypergradient rule's window mean, every `EVERY` steps."""

    def __init__(self, r8: R8Callback) -> None:
        self.r8 = r8
        self.means: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        alignments = self.r8.controller.group_rules[0]["hypergradient"].alignments
        if state.global_step % EVERY == 0 and alignments:
            self.means.append(statistics.fmean(alignments))


def main() -> int:
    rows = []
    for task_name, best in BEST_LR.items():
        task = _task(task_name, True)
        for factor in (0.01, 0.1, 1.0, 10.0):
            config = R8Config.from_dict({"rules": ["hypergradient"], "hypergradient": {"significance": 1e9},
                                         "range_test": {"enabled": False}, "anneal": {"enabled": False}})
            r8 = R8Callback(config)
            probe = WindowMeans(r8)
            method = dataclasses.replace(METHODS["cosine"], make_callbacks=lambda r8=r8, probe=probe: [r8, probe])
            with tempfile.TemporaryDirectory() as output_dir:
                run = run_one(task, method, best * factor, 0, Path(output_dir))
            rows.append(f"| {task_name} | {factor:g}x ({best * factor:g}) | {run.final_eval_loss:.4f} | "
                        + " | ".join(f"{mean:+.3f}" for mean in probe.means) + " |")
            print(rows[-1], flush=True)
    steps = " | ".join(f"step {EVERY * (index + 1)}" for index in range(6))
    table = "\n".join([f"| task | LR (x cosine's best) | final loss | {steps} |", "|---|---|---|" + "---|" * 6, *rows])
    text = ("# Update alignment (mean of the hypergradient rule's window of 20), cosine schedule, seed 0, 150 steps\n\n"
            + table + "\n")
    (Path(__file__).parent / "results" / "update_alignment.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
