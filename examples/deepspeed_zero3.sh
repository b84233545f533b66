#!/usr/bin/env bash
# R8Callback on a stock Trainer under DeepSpeed ZeRO-3, offline (a tiny GPT-2 on the Python docs):
#
#     pip install "hf_r8[deepspeed]"
#     bash examples/deepspeed_zero3.sh [--steps 60] [--preset aggressive]      # 2 processes
#     NPROC=1 bash examples/deepspeed_zero3.sh                                 # one process
#     PORT=29600 bash examples/deepspeed_zero3.sh                              # another rendezvous port
#
# On a CPU-only machine DeepSpeed runs its CPU accelerator over gloo and nothing is compiled: the config has no
# "optimizer" block (the Trainer's torch AdamW is handed to the engine) and the CPU shared-memory comm op is
# skipped. R8 writes each step's LR into the engine's optimizer, guards against non-finite steps and keeps
# rollback snapshots of each process's own ZeRO partitions. It prints the LR the engine used at each step
# (a step pre-hook) next to the logged learning_rate: they are the same.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
program="$(mktemp --suffix .py)"
trap 'rm -f "$program"' EXIT
cat > "$program" <<'PY'
import argparse

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_r8 import R8Callback
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2
from hf_r8.integrations.compat_deepspeed import skip_deepspeed_shm_op


class UsedLR(TrainerCallback):
    """The LR of group 0 when the engine's torch optimizer really steps (once per optimizer step)."""

    def __init__(self):
        self.used = {}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        while hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        self.state = state
        optimizer.register_step_pre_hook(self.record)

    def record(self, inner, *_):
        self.used.setdefault(self.state.global_step + 1, inner.param_groups[0]["lr"])


parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--preset", default="aggressive")
options = parser.parse_args()
on_cpu = not torch.cuda.is_available()
if on_cpu:
    skip_deepspeed_shm_op()
tokenizer = build_tokenizer(512)
model = tiny_gpt2(len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=64)
dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=1024)
deepspeed = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 3},
             "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                         "warmup_num_steps": "auto"}}}
args = TrainingArguments(output_dir="outputs/deepspeed_zero3", max_steps=options.steps, learning_rate=1e-3,
                         warmup_steps=5, per_device_train_batch_size=8, logging_steps=10, report_to=[],
                         save_strategy="no", use_cpu=on_cpu, deepspeed=deepspeed, disable_tqdm=True)
r8, used = R8Callback.from_preset(options.preset), UsedLR()
trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[r8, used])
trainer.train()
if trainer.is_world_process_zero():
    for entry in trainer.state.log_history:
        if "learning_rate" in entry:
            step = entry["step"]
            print(f"step {step:4d}  LR used {used.used.get(step, float('nan')):.4g}  logged "
                  f"{entry['learning_rate']:.4g}  gain x{entry.get('r8/lr_gain', 1.0):.3g}")
    print(f"R8 under DeepSpeed ZeRO-3: {len(r8.events)} events, rollback counts {r8.rollback_counts}")
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
PY
torchrun --nproc_per_node "${NPROC:-2}" --master_port "${PORT:-29500}" "$program" "$@"
