"""Fixed runs whose LR, gain, momentum, events and catalog must not move when the code is reorganised.

`tests/test_trajectories.py` runs them and compares with `tests/data/trajectories.json`: discrete values exactly,
floats to a relative `RELATIVE` (`differences`). When a change is *meant* to alter behaviour, regenerate the file
and say so in the commit (the file records the CPU and torch kernels that wrote it):

    OMP_NUM_THREADS=1 python -m tests.trajectories --write

`--sensitivity` shows what the tolerance still catches: each numeric field of the runs' configs in turn is
multiplied by 1.01, and the runs it moves are compared with the unchanged ones, exactly and within the tolerance.

Each run is small (a tiny GPT-2, a few dozen steps, fixed seeds, CPU) and covers one adapter: R8Callback with the
aggressive preset, the default (range test and anneal), a rollback run (NaN and spike), R8Trainer (catalog and
batches), TRL's GRPO (rewards and momentum), AdaptiveScheduler and R8Loop.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from tests.trainer_setup import ScriptedLossModel, training_args

GOLDEN = Path(__file__).parent / "data" / "trajectories.json"
RECORDED_ON = "recorded_on"
"""The golden file's entry that says where it was written (not a run)."""
RELATIVE = 5e-6
"""A float's allowed relative difference: another CPU moves one by ~1e-8 (AVX-512 against AVX2), torch's
unvectorized kernels (`ATEN_CPU_CAPABILITY=default`) by up to 2e-6; a changed rule or constant by far more."""


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


def _trainer_run(output_dir: str, config: R8Config, model: torch.nn.Module, dataset: Any, weights: bool = True,
                 **args: Any) -> dict:
    """The LRs, momenta and events of a Trainer run with R8Callback, and the sum of its final weights (which
    shows that rollbacks restore them; left out where long training at a high LR amplifies the rounding of
    another CPU's kernels to ~1e-3 in the weights, chaos that says nothing about R8)."""
    r8, used = R8Callback(_quiet(config)), UsedSteps()
    trainer = Trainer(model=model, args=training_args(output_dir, **args), train_dataset=dataset, callbacks=[r8, used])
    trainer.train()
    run = {"lrs": used.lrs, "momenta": used.momenta, "events": _events(r8.events)}
    if weights:
        run["weights"] = sum(float(parameter.double().sum()) for parameter in trainer.model.parameters())
    return run


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
    # 160 steps: the range test (15 sweep steps before the first; it keeps this LR) and the anneal both run. A
    # lower LR, which the test raises to ~3e-3, makes a run whose grad-norm decisions flip with a CPU's rounding.
    runs["callback_default"] = _trainer_run(
        f"{output_dir}/b", R8Config.from_preset("default"), gpt2(), dataset, weights=False, max_steps=160,
        learning_rate=1e-3)
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


def differences(found: Any, expected: Any, path: str, relative: float = RELATIVE) -> list[str]:
    """Where `found` departs from `expected`: any discrete value (int, str, bool, None, a length) that differs,
    and any float off by more than `relative` of its size (NaN matches NaN only)."""
    if isinstance(expected, dict) and isinstance(found, dict):
        if found.keys() != expected.keys():
            return [f"{path}: keys {sorted(found)} != {sorted(expected)}"]
        return [line for key in expected for line in differences(found[key], expected[key], f"{path}/{key}", relative)]
    if isinstance(expected, list) and isinstance(found, list):
        if len(found) != len(expected):
            return [f"{path}: {len(found)} values != {len(expected)}"]
        return [line for index, (value, wanted) in enumerate(zip(found, expected, strict=True))
                for line in differences(value, wanted, f"{path}[{index}]", relative)]
    numbers = (int, float)
    if (isinstance(expected, float) or isinstance(found, float)) and all(
            isinstance(value, numbers) and not isinstance(value, bool) for value in (found, expected)):
        if math.isnan(expected) or math.isnan(found):
            same = math.isnan(expected) and math.isnan(found)
        else:
            same = math.isclose(found, expected, rel_tol=relative, abs_tol=1e-300)
        return [] if same else [f"{path}: {found!r} != {expected!r}"]
    return [] if type(found) is type(expected) and found == expected else [f"{path}: {found!r} != {expected!r}"]


def recorded_on() -> dict[str, str]:
    """The machine and kernels a recording ran on (written beside the runs)."""
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}


def _float_fields(config: R8Config) -> list[tuple[str, str]]:
    """(section, field) of every float field of `config`'s sections."""
    return [(section.name, item.name) for section in dataclasses.fields(config)
            if dataclasses.is_dataclass(getattr(config, section.name))
            for item in dataclasses.fields(getattr(config, section.name))
            if type(getattr(getattr(config, section.name), item.name)) is float]


def sensitivity(output_dir: str, factor: float = 1.01) -> list[dict[str, Any]]:
    """For each float config field: whether multiplying it by `factor` in every run moves a recorded run, and
    whether the tolerant comparison still tells the moved runs from the unchanged ones."""
    baseline = json.loads(json.dumps(record(f"{output_dir}/base")))
    original = R8Config.from_preset.__func__
    rows = []
    for section, name in _float_fields(R8Config.from_preset("default")):
        def changed(cls: type[R8Config], preset: str, section: str = section, name: str = name) -> R8Config:
            config = original(cls, preset)
            values = getattr(config, section)
            setattr(values, name, getattr(values, name) * factor)
            return config

        R8Config.from_preset = classmethod(changed)
        try:
            runs = json.loads(json.dumps(record(f"{output_dir}/{section}.{name}")))
        except ValueError as error:  # the changed value is out of its range
            rows.append({"field": f"{section}.{name}", "refused": str(error)[:80]})
            continue
        finally:
            R8Config.from_preset = classmethod(original)
        moved = sorted(run for run in runs if differences(runs[run], baseline[run], run, relative=0.0))
        caught = sorted(run for run in moved if differences(runs[run], baseline[run], run))
        rows.append({"field": f"{section}.{name}", "moved": moved, "caught": caught})
        print(f"{section}.{name}: moved {moved or '-'}; caught within tolerance {caught or '-'}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN.name} (a deliberate change)")
    parser.add_argument("--sensitivity", action="store_true",
                        help="multiply each float config field by 1.01 in turn and report what the comparison catches")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        if args.sensitivity:
            rows = sensitivity(output_dir)
            missed = [row["field"] for row in rows if set(row.get("moved", [])) != set(row.get("caught", []))]
            moving = sum(bool(row.get("moved")) for row in rows)
            print(f"{len(rows)} fields; {moving} move a recorded run; missed within tolerance: {missed or 'none'}")
            return
        runs = record(output_dir)
    text = json.dumps({**runs, RECORDED_ON: recorded_on()}, indent=1, sort_keys=True)
    if args.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text + "\n", encoding="utf-8")
    print(f"{len(runs)} runs; {'written to ' + str(GOLDEN) if args.write else 'not written (--write)'}")


if __name__ == "__main__":
    main()
