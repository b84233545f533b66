"""One R8 run under DeepSpeed ZeRO on CPU (or without DeepSpeed, `--stage none`), for tests/test_deepspeed.py.

Run as `python deepspeed_run.py OUTPUT_DIR --stage 2` (one process: the rendezvous variables are set here) or
under `torchrun --nproc_per_node 2`. The training loss is either the real one or, for runs compared step by step,
a scripted value with the real gradient (the same signals whatever the parallelism), optionally with faults:

* `--faults nan`: the loss of step NAN_STEP is NaN (NaN gradients: the engine must skip the step);
* `--faults spikes`: steps SPIKE_STEPS report a spike (the second in a row rolls back to a snapshot).

Each rank writes OUTPUT_DIR/rank<k>.json: the LR each real optimizer step used (a step pre-hook on the innermost
torch optimizer), the logged `learning_rate`, R8's events and rollback counts, whether the weights are finite,
and, around a rollback, digests of this rank's own state and the loss of a fixed batch.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_r8 import R8Callback, R8Config
from hf_r8.control.config import RollbackConfig
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2
from hf_r8.integrations.compat_deepspeed import deepspeed_tensors, skip_deepspeed_shm_op, zero3_partition

NAN_STEP = 9
SPIKE_STEPS = (24, 25)
SNAPSHOT_EVERY = 8


def scripted_loss(step: int) -> float:
    """A falling loss with a little deterministic noise (the `aggressive` preset raises the LR on it)."""
    return (1.0 + 4.0 * math.exp(-step / 20)) * (1.0 + 0.005 * math.sin(1.7 * step))


class FaultyModel(torch.nn.Module):
    """A tiny GPT-2 whose training loss is the real or the scripted one, with the run's fault (see the module
    docstring). `step` is the optimizer step being taken, set by `StepRecorder` (also right in a resumed run)."""

    def __init__(self, inner: torch.nn.Module, scripted: bool, faults: list[str]) -> None:
        super().__init__()
        self.inner, self.scripted, self.faults = inner, scripted, faults
        self.step = 0

    def forward(self, input_ids, labels=None, attention_mask=None):
        output = self.inner(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
        if not self.training or labels is None:
            return output
        real = output.loss
        loss = real - real.detach() + scripted_loss(self.step) if self.scripted else real
        if "spikes" in self.faults and self.step in SPIKE_STEPS:
            loss = real - real.detach() + 50.0
        if "nan" in self.faults and self.step == NAN_STEP:
            loss = real * math.nan
        return {"loss": loss, "logits": output.logits}


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under Accelerate's and DeepSpeed's wrappers: the one whose step is the real one."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def own_state_digest(model: torch.nn.Module, optimizer: Any) -> str:
    """A digest of this rank's own parameter partitions, master partitions and optimizer state."""
    partitions, masters = deepspeed_tensors(model, optimizer)
    tensors = [zero3_partition(param) if zero3_partition(param) is not None else param
               for param in model.parameters()]
    tensors += list(partitions.values()) + list(masters.values())
    inner = innermost_optimizer(optimizer)
    for group in inner.param_groups:
        for param in group["params"]:
            tensors += [value for value in inner.state.get(param, {}).values() if torch.is_tensor(value)]
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class StepRecorder(TrainerCallback):
    """What the run is checked on (added after R8Callback, so it sees each step as R8 left it)."""

    def __init__(self, model: FaultyModel, probe: torch.Tensor) -> None:
        self.model, self.probe = model, probe
        self.used: list[float] = []
        self.digests: dict[int, str] = {}
        self.probe_losses: dict[int, float] = {}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer
        innermost_optimizer(optimizer).register_step_pre_hook(self.record_used)

    def record_used(self, inner: torch.optim.Optimizer, *_: Any) -> None:
        """ZeRO 1/2 call the torch optimizer once per parameter group: the step's first call is its LR."""
        if len(self.used) < self.model.step:
            self.used.extend([math.nan] * (self.model.step - 1 - len(self.used)))  # steps before a resume
            self.used.append(float(inner.param_groups[0]["lr"]))

    def on_step_begin(self, args, state, control, **kwargs):
        self.model.step = state.global_step + 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if "spikes" in self.model.faults:  # each step's own state, after the check (and a rollback's restore)
            self.digests[state.global_step + 1] = own_state_digest(self.model, self.optimizer)
            self.probe_losses[state.global_step + 1] = self.probe_loss()

    def probe_loss(self) -> float:
        """The loss of a fixed batch on the weights the forward gathers (ZeRO-3: the persistent copies too)."""
        self.model.eval()
        with torch.no_grad():
            loss = float(self.model.inner(input_ids=self.probe, labels=self.probe).loss)
        self.model.train()
        return loss


def deepspeed_config(stage: int, warmup_lr: bool) -> dict[str, Any]:
    """The Trainer's "auto" config; no "optimizer" block, so nothing compiles (the Trainer's torch AdamW is used)."""
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "train_batch_size": "auto", "gradient_clipping": "auto",
                              "zero_optimization": {"stage": stage}}
    if stage == 3:  # the embeddings and projections partitioned between steps, the small tensors kept gathered
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
    if warmup_lr:
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                             "warmup_num_steps": "auto"}}
    return config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(output_dir: str, stage: str, scripted: bool, faults: list[str], max_steps: int, save_steps: int,
        resume: str | None, warmup_lr: bool) -> None:
    if "RANK" not in os.environ:  # one process: DeepSpeed would otherwise look for MPI
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    skip_deepspeed_shm_op()
    tokenizer = build_tokenizer(512)
    dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=256)
    model = FaultyModel(tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64), scripted, faults)
    config = R8Config.from_preset("aggressive")
    config.rules = ["decision", "trend"]  # the loss alone: the same signals with and without DeepSpeed
    config.rollback = RollbackConfig(every_steps=SNAPSHOT_EVERY, healthy_steps=4, window=12, min_history=8)
    config.dashboard = config.run_files = config.report = False
    args = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        warmup_steps=4, lr_scheduler_type="cosine", logging_steps=1, report_to=[], disable_tqdm=True, use_cpu=True,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, seed=0,
        dataloader_num_workers=0, deepspeed=deepspeed_config(int(stage), warmup_lr) if stage != "none" else None)
    recorder = StepRecorder(model, torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(7)))
    r8 = R8Callback(config)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[r8, recorder])
    trainer.train(resume_from_checkpoint=resume)
    params = [zero3_partition(param) if zero3_partition(param) is not None else param
              for param in model.parameters()]
    engine = getattr(trainer, "deepspeed", None)
    result = {
        "used": recorder.used,
        "logged": [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry],
        "gains": [entry["r8/lr_gain"] for entry in trainer.state.log_history if "r8/lr_gain" in entry],
        "events": [[event.step, event.rule, event.action, event.reason] for event in r8.events],
        "counts": r8.rollback_counts,
        "engine_skipped_steps": getattr(engine, "skipped_steps", None),
        "weights_finite": all(bool(torch.isfinite(param).all()) for param in params),
        "digests": recorder.digests,
        "probe_losses": recorder.probe_losses,
        "snapshot_steps": [snapshot.step for snapshot in r8._run.rollback.snapshots],
        "world_size": args.world_size,
    }
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    faulthandler.dump_traceback_later(170, exit=True)  # a hung collective must fail the test, not stall it
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--stage", default="2", choices=["none", "0", "1", "2", "3"])
    parser.add_argument("--real-loss", action="store_true")
    parser.add_argument("--faults", nargs="*", default=[], choices=["nan", "spikes"])
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--warmup-lr", action="store_true", help="DeepSpeed's own WarmupLR scheduler")
    options = parser.parse_args()
    run(options.output_dir, options.stage, not options.real_loss, options.faults, options.max_steps,
        options.save_steps, options.resume, options.warmup_lr)


if __name__ == "__main__":
    sys.exit(main())
