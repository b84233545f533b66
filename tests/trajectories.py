"""Fixed runs whose LR, gain, momentum, events and catalog must not move by a bit when the code is reorganised.

`tests/test_trajectories.py` runs them and compares with `tests/data/trajectories.json`, exactly. When a change
is *meant* to alter behaviour, regenerate the file and say so in the commit:

    OMP_NUM_THREADS=1 python -m tests.trajectories --write

Each run is small (a tiny GPT-2, a few dozen steps, fixed seeds, CPU) and covers one adapter: R8Callback with the
aggressive preset, the default (range test and anneal), a rollback run (NaN and spike), R8Trainer (catalog and
batches), TRL's GRPO (rewards and momentum), AdaptiveScheduler and R8Loop.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from hf_r8 import AdaptiveScheduler, R8Callback, R8Config, R8Loop, R8Trainer
from hf_r8.demo.offline import build_tokenizer, english_paragraphs, language_modeling_dataset, tiny_gpt2
from tests.conftest import ScriptedLossModel, training_args

GOLDEN = Path(__file__).parent / "data" / "trajectories.json"


class UsedSteps(TrainerCallback):
    """The LR and momentum of each param group when `optimizer.step()` runs (a step pre-hook)."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.momenta: list[list[float | None]] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs):
        self.lrs.append([float(group["lr"]) for group in optimizer.param_groups])
        self.momenta.append([float(group["betas"][0]) if "betas" in group else group.get("momentum")
                             for group in optimizer.param_groups])


def _events(events: Any) -> list[list[Any]]:
    return [[event.step, event.group, event.rule, event.action, event.old_value, event.new_value] for event in events]


def _quiet(config: R8Config) -> R8Config:
    config.dashboard = config.run_files = config.report = False
    return config


def _trainer_run(output_dir: str, config: R8Config, model: torch.nn.Module, dataset: Any, **args: Any) -> dict:
    r8, used = R8Callback(_quiet(config)), UsedSteps()
    trainer = Trainer(model=model, args=training_args(output_dir, **args), train_dataset=dataset, callbacks=[r8, used])
    trainer.train()
    weights = sum(float(parameter.double().sum()) for parameter in trainer.model.parameters())
    return {"lrs": used.lrs, "momenta": used.momenta, "events": _events(r8.events), "weights": weights}


def _spiky(step: int) -> float:
    """A falling loss with a NaN at step 12 and a spike at 30 and 31 (a skip, then a rollback)."""
    if step == 12:
        return math.nan
    if step in (30, 31):
        return 40.0
    return 2.0 + 3.0 * math.exp(-step / 15)


def record(output_dir: str) -> dict[str, Any]:
    tokenizer = build_tokenizer(512)
    dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=512)

    def gpt2(seed: int = 1) -> torch.nn.Module:
        return tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128, seed=seed)

    runs: dict[str, Any] = {}
    runs["callback_aggressive"] = _trainer_run(
        f"{output_dir}/a", R8Config.from_preset("aggressive"), gpt2(), dataset, max_steps=40, learning_rate=3e-3,
        warmup_steps=4, lr_scheduler_type="linear")
    runs["callback_default"] = _trainer_run(  # 160 steps: the range test (15 steps) and the anneal both run
        f"{output_dir}/b", R8Config.from_preset("default"), gpt2(), dataset, max_steps=160, learning_rate=1e-4)
    rollback_config = R8Config.from_preset("default")
    rollback_config.rollback.every_steps = 10
    runs["callback_rollback"] = _trainer_run(
        f"{output_dir}/c", rollback_config, ScriptedLossModel(gpt2(), _spiky), dataset, max_steps=50)

    trainer_config = _quiet(R8Config.from_preset("default"))
    used = UsedSteps()
    args = training_args(f"{output_dir}/d", max_steps=24, per_device_train_batch_size=8)
    trainer = R8Trainer(model=gpt2(), args=args, train_dataset=dataset.select(range(64)), r8=trainer_config,
                        callbacks=[used])
    trainer.train()
    runs["r8trainer"] = {"lrs": used.lrs, "events": _events(trainer.r8_callback.events),
                         "catalog_losses": [float(value) for value in trainer.r8_catalog.ema_loss],
                         "usage": trainer.r8_catalog.usage.tolist()}

    runs["grpo"] = _grpo_run(f"{output_dir}/e", tokenizer, gpt2())
    runs["scheduler"] = _scheduler_run()
    runs["loop"] = _loop_run()
    return runs


def _grpo_run(output_dir: str, tokenizer: Any, model: torch.nn.Module) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def rising(completions, trainer_state=None, **kwargs):
        return [0.05 * trainer_state.global_step] * len(completions)

    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    config = _quiet(R8Config.from_preset("reward_rl"))
    config.momentum.rule = "reward"
    config.reward.trend_window = 8
    r8, used = R8Callback(config), UsedSteps()
    prompts = Dataset.from_dict({"prompt": [text[:40] for text in english_paragraphs()[:32]]})
    args = GRPOConfig(output_dir=output_dir, max_steps=16, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=8, learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1,
                      save_strategy="no", disable_tqdm=True, beta=0.0, seed=0)
    GRPOTrainer(model=model, reward_funcs=r8.track_rewards([rising]), args=args, train_dataset=prompts,
                processing_class=tokenizer, callbacks=[r8, used]).train()
    return {"lrs": used.lrs, "momenta": used.momenta, "events": _events(r8.events)}


def _scheduler_run() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(120, generator=generator).tolist()
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.zeros(3)
    optimizer = torch.optim.SGD([parameter], lr=1e-2, momentum=0.9)
    scheduler = AdaptiveScheduler(optimizer, _quiet(R8Config.from_preset("aggressive")), total_steps=120)
    lrs, momenta = [], []
    for step in range(120):
        optimizer.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        momenta.append(optimizer.param_groups[0]["momentum"])
        loss = math.nan if step == 50 else 5.0 * math.exp(-step / 40) + 0.05 * noise[step]
        scheduler.step_loss(loss, grad_norm=1.0 + noise[step])
    return {"lrs": lrs, "momenta": momenta, "events": _events(scheduler.events)}


def _loop_run() -> dict[str, Any]:
    difficulty = np.linspace(0.1, 4.0, 64)
    lrs, batches = [], []
    with R8Loop(64, batch_size=8, config=_quiet(R8Config.from_preset("aggressive")), num_epochs=4,
                base_lr=1e-3) as loop:
        for epoch in loop.epochs():
            for indices, lr in loop.batches():
                lrs.append(lr)
                batches.append(indices.tolist())
                losses = torch.tensor(difficulty[indices] * (0.97 ** (epoch * 8)))
                loop.report(losses.mean(), per_example_losses=losses)
    return {"lrs": lrs, "batches": batches, "events": _events(loop.events)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN.name} (a deliberate change)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        runs = record(output_dir)
    text = json.dumps(runs, indent=1, sort_keys=True)
    if args.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text + "\n", encoding="utf-8")
    print(f"{len(runs)} runs; {'written to ' + str(GOLDEN) if args.write else 'not written (--write)'}")


if __name__ == "__main__":
    main()
