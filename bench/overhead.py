"""Step-time overhead of R8Callback: the same run with and without it, interleaved.

    python bench/overhead.py [--pairs 6] [--steps 80]
    torchrun --nproc_per_node 2 bench/overhead.py --pairs 6     # DDP (gloo on CPU): overhead_2proc.md

Each pair trains the same model on the same data twice, stock Trainer then Trainer + R8Callback
(the order alternates between pairs so drift in machine speed cancels). A run's step time is
the 20th percentile of the wall time between consecutive `on_step_begin` events after 10 warm-up
steps (the low percentile is the least disturbed by other load on a shared machine). The result is
the median over pairs of (R8 step time / stock step time). A second, direct figure: the time spent
inside R8Callback's own event methods per step (on the main process). Writes bench/results/overhead.md,
or overhead_<N>proc.md under torchrun, where each R8 step also reduces its signals across processes
(one all-reduce of 8 numbers) and, with rollback on (the default), reads them on the host.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_r8 import R8Callback
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2

RESULTS = Path(__file__).parent / "results"
WARMUP_STEPS = 10


class StepClock(TrainerCallback):
    """Wall time between consecutive step starts."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def step_time(self) -> float:
        gaps = sorted([b - a for a, b in zip(self.starts, self.starts[1:], strict=False)][WARMUP_STEPS:])
        return gaps[len(gaps) // 5]


class TimedR8Callback(R8Callback):
    """R8Callback that adds up the wall time spent in its per-step events."""

    seconds = 0.0

    def _timed(self, event: str, *args, **kwargs):
        started = time.perf_counter()
        result = getattr(super(), event)(*args, **kwargs)
        TimedR8Callback.seconds += time.perf_counter() - started
        return result

    def on_step_begin(self, *args, **kwargs):
        return self._timed("on_step_begin", *args, **kwargs)

    def on_pre_optimizer_step(self, *args, **kwargs):
        return self._timed("on_pre_optimizer_step", *args, **kwargs)

    def on_optimizer_step(self, *args, **kwargs):
        return self._timed("on_optimizer_step", *args, **kwargs)

    def on_step_end(self, *args, **kwargs):
        return self._timed("on_step_end", *args, **kwargs)


def timed_run(dataset, vocab_size: int, steps: int, with_r8: bool) -> float:
    model = tiny_gpt2(vocab_size, n_embd=128, n_layer=2, n_head=4, n_positions=64, seed=0)
    clock = StepClock()
    callbacks = [clock, TimedR8Callback()] if with_r8 else [clock]
    args = TrainingArguments(output_dir=str(RESULTS / "tmp"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=20, report_to=[], save_strategy="no",
                             disable_tqdm=True, use_cpu=True, seed=0, log_level="error")
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return clock.step_time()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=120)
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = int(os.environ.get("RANK", "0")) == 0
    tokenizer = build_tokenizer(2048)
    dataset = language_modeling_dataset(tokenizer, seq_len=64, max_examples=2000)
    rows = []
    for pair in range(options.pairs):
        order = (False, True) if pair % 2 == 0 else (True, False)
        times = {with_r8: timed_run(dataset, len(tokenizer), options.steps, with_r8) for with_r8 in order}
        rows.append((times[False], times[True]))
        if main_process:
            print(f"pair {pair}: stock {times[False] * 1e3:.2f} ms/step, R8 {times[True] * 1e3:.2f} ms/step, "
                  f"ratio {times[True] / times[False]:.4f}", flush=True)
    ratio = statistics.median(r8 / stock for stock, r8 in rows)
    r8_step = statistics.median(r8 for _, r8 in rows)
    in_callback = TimedR8Callback.seconds / (options.pairs * options.steps)
    if not main_process:
        return 0
    setup = "1 process" if processes == 1 else f"{processes} processes (DDP, gloo), times of the main process"
    lines = [f"# Step-time overhead of R8Callback, {setup}", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, 1 torch thread per process, "
             f"torch {torch.__version__}. Model: GPT-2 2 layers x 128, "
             f"vocab {len(tokenizer)}, batch 8 x 64 tokens per process, {options.steps} steps per run, "
             f"20th-percentile step time after {WARMUP_STEPS} steps; {options.pairs} interleaved pairs.", "",
             "| pair | stock ms/step | R8 ms/step | ratio |", "|---|---|---|---|"]
    lines += [f"| {i} | {stock * 1e3:.2f} | {r8 * 1e3:.2f} | {r8 / stock:.4f} |" for i, (stock, r8) in enumerate(rows)]
    lines += ["", f"**Median ratio R8 / stock: {ratio:.4f}** (target <= 1.02).", "",
              f"Time inside R8Callback's events: {in_callback * 1e3:.3f} ms per step, "
              f"{in_callback / r8_step:.2%} of an R8 step.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "overhead.md" if processes == 1 else f"overhead_{processes}proc.md"
    (RESULTS / name).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
