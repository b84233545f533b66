"""Reward-driven fine-tuning: constant LR vs cosine vs hf_r8 `reward_rl`, with TRL's GRPO and RLOO.

    python bench/reward_rl.py [--seeds 3] [--steps 80]     # writes bench/results/reward_rl.md and .png

The task, solvable on a CPU: make a random-init tiny GPT-2 (2 layers x 64, the offline BPE) write
completions rich in the letter "e" (reward = share of "e" among the completion's characters) after
prompts cut from Python's bundled documentation. KL to the initial model is on (GRPO beta 0.04, RLOO 0.005: see
SETTINGS; the model is saved to a folder first, since TRL rebuilds the reference model by name). hf_r8 runs on the
constant schedule with `R8Callback.track_rewards`. Reported per method: steps until the 5-step mean
reward reaches the threshold, final reward, reward std within a generation batch, KL at the
threshold step and at the end; medians over seeds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hf_r8 import R8Callback, R8Config  # noqa: E402
from hf_r8.demo.offline import build_tokenizer, english_paragraphs, tiny_gpt2  # noqa: E402

RESULTS = Path(__file__).parent / "results"
THRESHOLD = 0.5
TRAINERS = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}
METHODS = ("constant", "cosine", "r8_reward_rl")
# KL coefficient and LR grid per trainer. RLOO puts the KL into the reward, summed over the completion's
# tokens: at beta 0.04 that penalty drowns the task's reward differences (~0.04) and no method learns in 80
# steps (also not with normalize_advantages=True, nor at constant 1e-2); at beta 0.005 it learns from 1e-2.
SETTINGS = {"grpo": {"beta": 0.04, "lrs": (1e-3, 3e-3)}, "rloo": {"beta": 0.005, "lrs": (3e-3, 1e-2)}}


def letter_e(completions, **kwargs):
    """Share of the letter "e" among the completion's characters."""
    return [completion.count("e") / max(1, len(completion)) for completion in completions]


def run(trainer_name: str, method: str, learning_rate: float, seed: int, steps: int, r8_config: str) -> dict:
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    tokenizer = build_tokenizer(512)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    prompts = Dataset.from_dict({"prompt": [text[:40] for text in english_paragraphs()[:64]]})
    trainer_type, config_type = TRAINERS[trainer_name]
    with tempfile.TemporaryDirectory() as folder:
        model_dir = os.path.join(folder, "model")
        tiny_gpt2(len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=128, seed=seed).save_pretrained(model_dir)
        args = config_type(output_dir=os.path.join(folder, "run"), max_steps=steps, per_device_train_batch_size=16,
                           num_generations=8, max_completion_length=16, learning_rate=learning_rate,
                           lr_scheduler_type="cosine" if method == "cosine" else "constant", report_to=[],
                           use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                           beta=SETTINGS[trainer_name]["beta"], seed=seed)
        reward_funcs, callbacks = [letter_e], []
        if method == "r8_reward_rl":
            config = R8Config.from_yaml(r8_config) if r8_config.endswith(".yaml") else R8Config.from_preset(r8_config)
            config.dashboard, config.run_files, config.report = False, False, False
            r8 = R8Callback(config)
            reward_funcs, callbacks = r8.track_rewards(reward_funcs), [r8]
        trainer = trainer_type(model=model_dir, reward_funcs=reward_funcs, args=args, train_dataset=prompts,
                               processing_class=tokenizer, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        diverged = False
        try:
            trainer.train()
        except RuntimeError as error:  # NaN/inf weights: sampling from the policy fails
            if "nan" not in str(error) and "inf" not in str(error):
                raise
            diverged = True
    history = [entry for entry in trainer.state.log_history if "reward" in entry]
    return {"trainer": trainer_name, "method": method, "lr": learning_rate, "seed": seed, "diverged": diverged,
            "reward": [entry["reward"] for entry in history], "reward_std": [entry["reward_std"] for entry in history],
            "kl": [entry.get("kl", float("nan")) for entry in history],
            "lr_used": [entry["learning_rate"] for entry in history]}


def steps_to_threshold(rewards: list[float], window: int = 5) -> int | None:
    for end in range(window, len(rewards) + 1):
        if statistics.fmean(rewards[end - window:end]) >= THRESHOLD:
            return end
    return None


def _median_or_never(values: list[int | None]) -> str:
    reached = [value for value in values if value is not None]
    if len(reached) < len(values) / 2:
        return f"never ({len(reached)}/{len(values)})"
    return f"{statistics.median(reached):.0f} ({len(reached)}/{len(values)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--r8-config", default="reward_rl", help="a preset name or a YAML file for the hf_r8 runs")
    parser.add_argument("--trainers", nargs="+", choices=list(TRAINERS), default=list(TRAINERS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--name", default="reward_rl", help="results file name (bench/results/NAME.md/.png)")
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="instead of each trainer's grid")
    options = parser.parse_args(argv)
    started = time.perf_counter()
    jobs = [(trainer, method, lr, seed, options.steps, options.r8_config) for trainer in options.trainers
            for method in options.methods for lr in options.lrs or SETTINGS[trainer]["lrs"]
            for seed in range(options.seeds)]
    with ProcessPoolExecutor(options.workers) as pool:
        runs = list(pool.map(run, *zip(*jobs, strict=True)))
    elapsed = time.perf_counter() - started
    lines = ["# Reward-driven fine-tuning: constant vs cosine vs hf_r8 reward_rl (GRPO, RLOO)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores; {len(runs)} runs in {elapsed / 60:.1f} min; "
             f"{options.steps} steps of 16 completions (8 per prompt), seeds {list(range(options.seeds))}, medians. "
             f"Threshold: 5-step mean reward >= {THRESHOLD}.", "",
             "A diverged run (NaN weights, the policy cannot sample) counts as never reaching the threshold; final "
             "reward, reward std and final KL are medians over the runs that finished.", "",
             "| trainer | method | lr | steps to threshold (runs that reached it) | diverged | final reward | "
             "reward std | KL at threshold | final KL |", "|---|---|---|---|---|---|---|---|---|"]
    figure, axes = plt.subplots(1, len(options.trainers), figsize=(6 * len(options.trainers), 4), squeeze=False)
    for axis, trainer in zip(axes[0], options.trainers, strict=True):
        for method in options.methods:
            for lr in options.lrs or SETTINGS[trainer]["lrs"]:
                chosen = [r for r in runs if r["trainer"] == trainer and r["method"] == method and r["lr"] == lr]
                reached = [steps_to_threshold(r["reward"]) for r in chosen]
                kl_at = [r["kl"][step - 1] for r, step in zip(chosen, reached, strict=True) if step is not None]
                kl_text = f"{statistics.median(kl_at):.3f}" if kl_at else "—"
                finished = [r for r in chosen if not r["diverged"]]
                final, spread, final_kl = (f"{statistics.median(values):.3f}" if finished else "—" for values in (
                    [r["reward"][-1] for r in finished], [statistics.fmean(r["reward_std"]) for r in finished],
                    [r["kl"][-1] for r in finished]))
                lines.append(f"| {trainer} | {method} | {lr:g} | {_median_or_never(reached)} | "
                             f"{len(chosen) - len(finished)} | {final} | {spread} | {kl_text} | {final_kl} |")
                length = max(len(r["reward"]) for r in chosen)
                curve = [statistics.median(r["reward"][i] for r in chosen if i < len(r["reward"]))
                         for i in range(length)]
                axis.plot(range(1, len(curve) + 1), curve, label=f"{method} {lr:g}", linewidth=0.9)
        axis.axhline(THRESHOLD, color="gray", linewidth=0.6)
        axis.set(title=trainer.upper(), xlabel="step", ylabel="mean reward (median over seeds)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(RESULTS / f"{options.name}.png", dpi=110)
    lines += ["", f"![reward vs steps]({options.name}.png)", ""]
    (RESULTS / f"{options.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
