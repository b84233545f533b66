"""LR robustness and speed-to-target: every method, every task, an LR grid over 3 decades, several seeds.

    python bench/lr_sweep.py --quick        # < 10 min on 2 CPU cores
    python bench/lr_sweep.py                # the full sweep (bigger models, more steps and seeds)

Writes bench/results/lr_sweep[_quick].md (tables), .json (every run) and .png plots.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_r8 import R8Callback

sys.path.insert(0, str(Path(__file__).parent))
from methods import METHODS, WARMUP, Method  # noqa: E402
from report import write_report  # noqa: E402
from tasks import TASKS, Task  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# Three decades around where these small models train best (~1e-2 for AdamW): the grid brackets the optimum
# instead of ending at it, and its top point is high enough to make plain AdamW unstable.
LR_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


@dataclass
class Run:
    task: str
    method: str
    lr: float
    seed: int
    eval_steps: list[int]
    eval_losses: list[float]
    final_eval_loss: float
    diverged: bool
    train_runtime: float
    extra_forward_passes: int
    forgetting_loss: float | None = None
    """Final loss on the pre-training corpus' held-out blocks (fine-tuning tasks only)."""
    rollbacks: int = 0
    skipped_steps: int = 0


def run_one(task: Task, method: Method, lr: float, seed: int, output_dir: Path) -> Run:
    steps = task.steps
    eval_every = steps // 15
    args = {**method.args}
    if args.get("warmup_steps") == WARMUP:
        args["warmup_steps"] = max(1, int(steps * WARMUP))
    model = task.make_model(seed)
    training_args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=task.batch_size,
        per_device_eval_batch_size=256, learning_rate=lr, eval_strategy="steps", eval_steps=eval_every,
        logging_steps=eval_every, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=seed,
        data_seed=seed, dataloader_num_workers=0, log_level="error", weight_decay=0.0, **args,
    )
    optimizers = (method.make_optimizer(model, lr), None) if method.make_optimizer else (None, None)
    callbacks = method.make_callbacks()
    trainer = Trainer(model=model, args=training_args, train_dataset=task.train, eval_dataset=task.eval,
                      callbacks=callbacks, optimizers=optimizers)
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - started
    history = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    losses = [float(entry["eval_loss"]) for entry in history]
    diverged = any(not math.isfinite(loss) for loss in losses) or any(
        not math.isfinite(entry.get("loss", 0.0)) for entry in trainer.state.log_history)
    final = losses[-1] if losses else math.inf
    forgetting = None
    if task.forgetting_eval is not None:
        forgetting = float(trainer.evaluate(task.forgetting_eval, metric_key_prefix="forgetting")["forgetting_loss"])
    counts = next((callback.rollback_counts for callback in callbacks if isinstance(callback, R8Callback)), {})
    # plateau and greedy read the held-out loss to decide: those evaluations are work the method needs
    uses_eval = method.args.get("lr_scheduler_type") in ("reduce_lr_on_plateau", "greedy")
    extra = len(history) * math.ceil(len(task.eval) / 256) if uses_eval else 0
    return Run(task.name, method.name, lr, seed, [int(entry["step"]) for entry in history], losses,
               final if math.isfinite(final) else math.inf, diverged, runtime, extra, forgetting,
               counts.get("rollbacks", 0), counts.get("skipped_steps", 0))


@functools.cache
def _task(name: str, quick: bool) -> Task:
    return TASKS[name](quick)


def _quiet_worker() -> None:
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("hf_r8").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def run_job(task_name: str, quick: bool, method_name: str, seeds: list[int], lrs: list[float]) -> list[Run]:
    """Every LR and seed of one (task, method): the unit of work of a worker process."""
    task = _task(task_name, quick)
    runs = []
    for lr in lrs:
        for seed in seeds:
            run = run_one(task, METHODS[method_name], lr, seed, RESULTS / "tmp" / f"{os.getpid()}")
            runs.append(run)
            print(f"{task.name:10s} {method_name:13s} lr={lr:<7g} seed={seed} "
                  f"eval_loss={run.final_eval_loss:.4f} {run.train_runtime:.1f}s", flush=True)
    return runs


def _reused_runs(path: Path | None, methods_run: set[str], tasks: set[str]) -> list[Run]:
    if path is None:
        return []
    saved = json.loads(path.read_text())["runs"]
    return [Run(**run) for run in saved if run["method"] not in methods_run and run["task"] in tasks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, 150 steps, 3 seeds (~10 min)")
    parser.add_argument("--steps", type=int, default=None,
                        help="step budget of every task (default 150 with --quick, else 600)")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--lrs", nargs="*", type=float, default=LR_GRID,
                        help="the LR grid (default: three decades around where these models train best; widen it to "
                             "see a start far above or below the best LR)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes, one torch thread each (default: one per core)")
    parser.add_argument("--name", default=None, help="results file stem (default lr_sweep[_quick])")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a results .json whose runs of methods not run now are kept (baselines do not depend on "
                             "hf_r8's code: re-run only hf_r8's methods after changing it)")
    options = parser.parse_args(argv)
    if options.steps is not None:
        os.environ["BENCH_STEPS"] = str(options.steps)  # read by the tasks, in this process and the workers
    _quiet_worker()
    ready_tasks = [_task(task, options.quick) for task in options.tasks]  # the fine-tuning base is trained once
    seeds = list(range(options.seeds or (3 if options.quick else 5)))
    name = options.name or ("lr_sweep_quick" if options.quick else "lr_sweep") + \
        (f"_{options.steps}" if options.steps is not None else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [(task, options.quick, method, seeds, options.lrs) for task in options.tasks for method in options.methods]
    with ProcessPoolExecutor(options.workers, initializer=_quiet_worker) as pool:
        runs = [run for batch in pool.map(run_job, *zip(*jobs, strict=True)) for run in batch]
    elapsed = time.perf_counter() - started
    reused = _reused_runs(options.reuse, set(options.methods), set(options.tasks))
    runs += reused
    names = [*options.methods, *sorted({run.method for run in reused})]
    methods = {method: METHODS[method].description for method in names}
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {options.workers} worker process(es) with one "
                   f"torch thread each, torch {torch.__version__}",
        "elapsed_s": elapsed, "quick": options.quick, "lr_grid": options.lrs, "seeds": seeds,
        "tasks": {task.name: task.description for task in ready_tasks},
        "methods": methods,
        "reused": f"{len(reused)} runs of {sorted({r.method for r in reused})} from {options.reuse.name}" if reused
        else None,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "runs": [asdict(run) for run in runs]}))
    counterparts = {method: (METHODS[method].stock, METHODS[method].test_off) for method in names
                    if METHODS[method].stock is not None}
    print(write_report(name, meta, runs, RESULTS, counterparts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
