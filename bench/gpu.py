"""GPU figures: stock Trainer vs R8Trainer with the full default stack, on a GPT-2 of ~124M parameters.

    python bench/gpu.py                  # one CUDA GPU, bf16, 200 steps per run, 2 interleaved pairs (< 8 min)
    python bench/gpu.py --tiny --steps 20    # the same script on CPU at a toy size (what the tests run)

The model is GPT-2 small's shape (12 layers x 768, vocabulary 50257) built from a config with random
weights, trained on the offline corpus (`hf_r8.demo.offline`, tokens below 2048). R8Trainer runs the default
preset: the LR range test (its steps are ordinary training steps, timed like the others), rollback
(a host read of each step's loss and gradient norm, snapshots every 50 steps), the per-example loss
catalog and balanced batches, run files. Reported per trainer: median step time after 10 warm-up steps
(and their ratio), peak GPU memory (`torch.cuda.max_memory_allocated`), and host synchronizations per
step: the CUDA synchronization calls (`cudaStreamSynchronize`, `cudaDeviceSynchronize`,
`cudaEventSynchronize`) that `torch.profiler` records over `--profile-steps` steps after the range test.
On CPU there is no device to wait for: memory and syncs read 0. Writes bench/results/gpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_r8 import R8Config, R8Trainer
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset

RESULTS = Path(__file__).parent / "results"
WARMUP_STEPS = 10
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


@dataclass
class Measured:
    trainer: str
    step_time: float
    peak_memory: int
    syncs_per_step: float


class StepProbe(TrainerCallback):
    """Step start times, and a profiler running over steps [first, first + count)."""

    def __init__(self, first: int, count: int) -> None:
        self.starts: list[float] = []
        self.first, self.count = first, count
        self.profiler: profile | None = None
        self.profiled_steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        # No synchronize here (it would be counted): both Trainers read the loss on the host every step anyway.
        self.starts.append(time.perf_counter())
        if state.global_step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
        elif state.global_step == self.first + self.count and self.profiler is not None:
            self._stop()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self._stop()

    def _stop(self) -> None:
        self.profiler.__exit__(None, None, None)
        self.profiled_steps = self.count
        self.syncs = sum(event.count for event in self.profiler.key_averages() if event.key in SYNC_CALLS)
        self.profiler = None

    def step_time(self) -> float:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)][WARMUP_STEPS:]
        return statistics.median(gaps)


def run(name: str, options: argparse.Namespace, dataset, output_dir: Path) -> Measured:
    if options.tiny:
        config = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=2, n_positions=options.seq_len)
    else:
        config = GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=options.seq_len)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    cuda = torch.cuda.is_available() and not options.tiny
    args = TrainingArguments(output_dir=str(output_dir / name), max_steps=options.steps,
                             per_device_train_batch_size=options.batch_size, learning_rate=3e-4,
                             lr_scheduler_type="cosine", warmup_steps=0.1, bf16=cuda, use_cpu=not cuda,
                             logging_steps=50, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)
    # Profile after the range test (4% of the steps, at least 15) and past warm-up: the steady state.
    probe = StepProbe(first=max(WARMUP_STEPS, options.steps // 2), count=options.profile_steps)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if name == "stock":
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[probe])
    else:
        trainer = R8Trainer(model=model, args=args, train_dataset=dataset, callbacks=[probe],
                            r8=dataclasses.replace(R8Config.from_preset("default"), dashboard=False))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    syncs = getattr(probe, "syncs", 0) / max(1, probe.profiled_steps)
    return Measured(name, probe.step_time(), peak, syncs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a toy model on CPU (the test's mode)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=2, help="interleaved stock / R8 pairs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--output", type=Path, default=RESULTS / "gpu.md")
    options = parser.parse_args(argv)
    if options.tiny:
        options.seq_len, options.batch_size = min(options.seq_len, 32), min(options.batch_size, 4)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    tokenizer = build_tokenizer(512 if options.tiny else 2048)
    dataset = language_modeling_dataset(tokenizer, seq_len=options.seq_len)
    started = time.perf_counter()
    results: dict[str, list[Measured]] = {"stock": [], "r8": []}
    with tempfile.TemporaryDirectory() as folder:
        for pair in range(options.pairs):
            for name in (("stock", "r8") if pair % 2 == 0 else ("r8", "stock")):
                results[name].append(run(name, options, dataset, Path(folder)))
    stock, r8 = results["stock"], results["r8"]
    ratio = statistics.median(b.step_time / a.step_time for a, b in zip(stock, r8, strict=True))
    on_gpu = torch.cuda.is_available() and not options.tiny
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.machine()})"
    model = "toy model" if options.tiny else "GPT-2 124M from config, bf16"
    lines = [
        "# GPU figures: stock Trainer vs R8Trainer (default preset)", "",
        f"Device: {device}; torch {torch.__version__}; {model}, {options.steps} steps of {options.batch_size} x "
        f"{options.seq_len} tokens, {options.pairs} interleaved pair(s); {(time.perf_counter() - started) / 60:.1f} "
        "min.", "",
        "| trainer | median step time (s) | peak GPU memory (GiB) | host syncs per step |", "|---|---|---|---|",
    ]
    for name, runs in results.items():
        lines.append(f"| {'R8Trainer' if name == 'r8' else 'stock Trainer'} | "
                     f"{statistics.median(m.step_time for m in runs):.4f} | "
                     f"{max(m.peak_memory for m in runs) / 2**30:.2f} | "
                     f"{statistics.median(m.syncs_per_step for m in runs):.1f} |")
    lines += ["", f"Step-time ratio R8 / stock (median over pairs): **{ratio:.3f}**", ""]
    text = "\n".join(lines)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
