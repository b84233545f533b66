"""Rollback: CPU-RAM snapshot/restore vs the Trainer's disk checkpoint, and recovery from injected faults.

    python bench/rollback.py [--seeds 3] [--steps 150]     # writes bench/results/rollback.md and .png

Part 1, for GPT-2 models of three sizes with AdamW state: time to capture a snapshot (first, with
its buffers allocated, and later, reusing them) and to restore it, against the Trainer's own
`_save_checkpoint` and the load `resume_from_checkpoint` does (`_load_from_checkpoint` +
`_load_optimizer_and_scheduler`), from the page cache and cold (the files evicted with
posix_fadvise, as after a crash or on a new machine). Part 2: the faults of tests/faults.py at
step 35 of a tiny GPT-2 run, stock Trainer vs Trainer + R8Callback vs R8Trainer (default preset; R8Trainer
also feeds the steps after a rollback from the lowest-loss quartile), against each one's clean run:
final held-out loss, the gap to the clean run, steps until the training-loss EMA is back within 1% of
its pre-fault value, wasted steps.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hf_r8 import R8Callback, R8Trainer  # noqa: E402
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2  # noqa: E402
from hf_r8.runtime.snapshot import StateSnapshot  # noqa: E402
from tests.faults import FAULT_STEP, FaultClock, FaultyModel, LearningRateBlast  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SIZES = {"5M": (256, 4), "29M": (512, 8), "91M": (768, 12)}  # name -> (width, layers), vocab 8192
FAULTS = ("nan_loss", "inf_gradient", "garbage_batch", "lr_blast")
TRAINERS = {"stock": "stock Trainer", "callback": "Trainer + R8Callback", "r8_trainer": "R8Trainer"}


def _quiet() -> None:
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")


def _median_time(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def snapshot_vs_disk(name: str, width: int, layers: int) -> dict:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_embd=width, n_layer=layers, n_head=8, n_positions=128))
    data = [{"input_ids": torch.randint(0, 8192, (64,)).tolist()} for _ in range(4)]
    data = [{**row, "labels": row["input_ids"]} for row in data]
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, max_steps=1, per_device_train_batch_size=2, report_to=[],
                                 save_strategy="no", disable_tqdm=True, use_cpu=True, log_level="error")
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.remove_callback(PrinterCallback)
        trainer.train()  # AdamW state exists from here on
        optimizer = trainer.optimizer
        snapshot = StateSnapshot()
        first_capture = _median_time(lambda: snapshot.capture(model, optimizer, step=1), 1)
        capture = _median_time(lambda: snapshot.capture(model, optimizer, step=1), 3)
        restore = _median_time(lambda: snapshot.restore(model, optimizer), 3)
        checkpoint = os.path.join(folder, "checkpoint-1")
        save = _median_time(lambda: trainer._save_checkpoint(model, trial=None), 2)

        def load() -> None:
            trainer._load_from_checkpoint(checkpoint)
            trainer._load_optimizer_and_scheduler(checkpoint)

        reload = _median_time(load, 2)
        files = [path for path in Path(checkpoint).iterdir() if path.is_file()]
        disk_bytes = sum(path.stat().st_size for path in files)
        for path in files:  # out of the page cache: what a reload after a crash or on a new machine reads
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        cold_reload = _median_time(load, 1)
    parameters = sum(param.numel() for param in model.parameters())
    return {"name": name, "parameters": parameters, "snapshot_bytes": snapshot.nbytes, "disk_bytes": disk_bytes,
            "first_capture": first_capture, "capture": capture, "restore": restore, "save": save, "reload": reload,
            "cold_reload": cold_reload}


class LossRecorder(FaultyModel):
    """FaultyModel that also keeps the loss of every training forward of a counted step (NaN included; not the
    range test's sweep, which runs before the first)."""

    def __init__(self, inner: torch.nn.Module, fault: str | None) -> None:
        super().__init__(inner, fault)
        self.losses: list[float] = []

    def forward(self, input_ids, labels=None, attention_mask=None):
        output = super().forward(input_ids, labels=labels, attention_mask=attention_mask)
        if self.training and self.step > 0:
            self.losses.append(float(output["loss"].detach()))
        return output

    @property
    def loss_function(self):
        """The inner causal LM's: R8Trainer reads it to shift the labels of its per-example losses."""
        return self.inner.loss_function


def fault_run(fault: str, trainer_kind: str, seed: int, steps: int) -> dict:
    torch.set_num_threads(1)
    _quiet()
    tokenizer = build_tokenizer(512)
    dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=576)
    model = LossRecorder(tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, seed=seed),
                         None if fault in ("clean", "lr_blast") else fault)
    callbacks = [R8Callback(), FaultClock(model)] if trainer_kind == "callback" else [FaultClock(model)]
    if fault == "lr_blast":
        callbacks.append(LearningRateBlast())
    trainer_class = R8Trainer if trainer_kind == "r8_trainer" else Trainer
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
                                 lr_scheduler_type="constant", report_to=[], save_strategy="no", disable_tqdm=True,
                                 use_cpu=True, seed=seed, log_level="error")
        trainer = trainer_class(model=model, args=args, train_dataset=dataset.select(range(64, 576)),
                                eval_dataset=dataset.select(range(64)), callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        eval_loss = trainer.evaluate()["eval_loss"]
    r8 = next((callback for callback in trainer.callback_handler.callbacks if isinstance(callback, R8Callback)), None)
    counts = r8.rollback_counts if r8 is not None else {}
    return {"fault": fault, "trainer": trainer_kind, "seed": seed, "eval_loss": eval_loss, "losses": model.losses,
            "wasted": counts.get("wasted_steps", 0) + counts.get("skipped_steps", 0),
            "rollbacks": counts.get("rollbacks", 0)}


def steps_to_recover(losses: list[float], beta: float = 0.9) -> int | None:
    """Steps after the fault until the loss EMA is back within 1% of its value just before the fault
    and stays there to the end (a non-finite loss is never "back"; the EMA runs over finite ones)."""
    ema = None
    for loss in losses[: FAULT_STEP - 1]:
        ema = loss if ema is None else beta * ema + (1 - beta) * loss
    before, recovered_from = ema, None
    for offset, loss in enumerate(losses[FAULT_STEP - 1:]):
        if math.isfinite(loss):
            ema = beta * ema + (1 - beta) * loss
        back = math.isfinite(loss) and ema <= 1.01 * before
        recovered_from = (offset if recovered_from is None else recovered_from) if back else None
    return recovered_from


def _fmt_optional(values: list[float | None]) -> str:
    finite = [value for value in values if value is not None]
    if len(finite) < len(values) / 2:
        return "never"
    return f"{statistics.median(finite):.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    options = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(os.cpu_count() or 1)
    timings = [snapshot_vs_disk(name, *shape) for name, shape in SIZES.items()]
    started = time.perf_counter()
    runs = [fault_run(fault, trainer_kind, seed, options.steps) for fault in ("clean", *FAULTS)
            for trainer_kind in TRAINERS for seed in range(options.seeds)]
    elapsed = time.perf_counter() - started
    lines = ["# Rollback: snapshot vs disk checkpoint, and recovery from faults", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU only (the snapshot copies CPU to CPU here; "
             "on a GPU it is a device-to-host copy into pinned memory).", "",
             "| model | parameters | snapshot RAM | first capture | capture | restore | Trainer save to disk | "
             "Trainer load (page cache) | Trainer load (cold) | load / restore (cache, cold) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in timings:
        lines.append(f"| GPT-2 {row['name']} | {row['parameters'] / 1e6:.1f}M | {row['snapshot_bytes'] / 2**20:.0f} MiB"
                     f" | {row['first_capture']:.3f} s | {row['capture']:.3f} s | {row['restore']:.3f} s | "
                     f"{row['save']:.3f} s | {row['reload']:.3f} s | {row['cold_reload']:.3f} s | "
                     f"{row['reload'] / row['restore']:.1f}x, {row['cold_reload'] / row['restore']:.1f}x |")
    lines += ["", f"Fault suite: tiny GPT-2, {options.steps} steps of 8, lr 3e-3 constant, fault at step {FAULT_STEP}, "
              f"seeds {list(range(options.seeds))}, medians; {len(runs)} runs in {elapsed / 60:.1f} min.", "",
              "| fault | trainer | final held-out loss | gap to its clean run | steps to recover (EMA within 1%) | "
              "wasted steps | rollbacks |", "|---|---|---|---|---|---|---|"]
    clean = {kind: statistics.median(r["eval_loss"] for r in runs if r["fault"] == "clean" and r["trainer"] == kind)
             for kind in TRAINERS}
    figure, axes = plt.subplots(1, len(FAULTS), figsize=(4.5 * len(FAULTS), 3.6))
    for axis, fault in zip(axes, FAULTS, strict=True):
        for kind, name in TRAINERS.items():
            chosen = [r for r in runs if r["fault"] == fault and r["trainer"] == kind]
            final = statistics.median(r["eval_loss"] for r in chosen)
            gap = final / clean[kind] - 1 if math.isfinite(final) else math.nan
            recover = _fmt_optional([steps_to_recover(r["losses"]) for r in chosen])
            lines.append(f"| {fault} | {name} | {final:.4f} | "
                         f"{gap:+.1%} | {recover} | {statistics.median(r['wasted'] for r in chosen):.0f} | "
                         f"{statistics.median(r['rollbacks'] for r in chosen):.0f} |")
            axis.plot(chosen[0]["losses"], label=name, linewidth=0.9)
        axis.axvline(FAULT_STEP - 1, color="gray", linewidth=0.6)
        axis.set(title=fault, xlabel="step", ylabel="training loss (seed 0)", ylim=(3.5, 8.0))
        axis.legend(fontsize=8)
    figure.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(RESULTS / "rollback.png", dpi=110)
    lines += ["", "R8Trainer's training loss right after a rollback comes from lowest-loss batches, so its steps to "
              "recover (on the training loss) flatter it: compare the held-out gap.", "",
              "![training loss around the fault](rollback.png)", ""]
    (RESULTS / "rollback.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
