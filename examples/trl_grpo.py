"""R8Callback on TRL's GRPOTrainer (and RLOOTrainer): the reward drives the learning rate. Offline by default.

    python examples/trl_grpo.py [--steps 60] [--model gpt2] [--trainer rloo] [--beta 0.04]

The task: completions rich in the letter "e" (a reward anyone can check on a CPU). The reward
functions go through `r8.track_rewards(...)`, so each optimizer step's reward reaches the
controller (TRL's metric names are kept). With KL on (`--beta` > 0) TRL rebuilds the reference model
by name, so the in-memory offline model is saved to a folder first and passed as a path.
`--model` loads a Hub model instead (falls back to the offline tiny GPT-2 when the Hub is unreachable).
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from hf_r8 import R8Callback, R8Config
from hf_r8.demo.offline import english_paragraphs, load_hub_or_offline

TRAINERS = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}


def letter_e(completions: list[str], **kwargs) -> list[float]:
    """Share of the letter "e" among the completion's characters."""
    return [completion.count("e") / max(1, len(completion)) for completion in completions]


def run(trainer_name: str, steps: int, model_name: str | None, beta: float, output_dir: str) -> R8Callback:
    model, tokenizer, source = load_hub_or_offline(model_name, vocab_size=512)
    print(f"model: {source}")
    model_path = os.path.join(output_dir, "initial_model")
    model.save_pretrained(model_path)  # TRL builds the reference model (KL) from a name or a path
    tokenizer.save_pretrained(model_path)
    prompts = Dataset.from_dict({"prompt": [text[:40] for text in english_paragraphs()[:64]]})
    trainer_type, config_type = TRAINERS[trainer_name]
    args = config_type(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=16, num_generations=8,
                       max_completion_length=16, learning_rate=3e-3, logging_steps=10, report_to=[],
                       save_strategy="no", beta=beta, use_cpu=not torch.cuda.is_available())
    r8 = R8Callback(R8Config.from_preset("reward_rl"))
    trainer = trainer_type(model=model_path, reward_funcs=r8.track_rewards([letter_e]), args=args,
                           train_dataset=prompts, processing_class=tokenizer, callbacks=[r8])
    trainer.train()
    return r8


def main(trainer_name: str = "grpo") -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=list(TRAINERS), default=trainer_name)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", default=None, help="a Hub model name (default: the offline tiny GPT-2)")
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0 turns the reference model off)")
    parser.add_argument("--output-dir", default=None)
    options = parser.parse_args()
    output_dir = options.output_dir or f"outputs/example_{options.trainer}"
    r8 = run(options.trainer, options.steps, options.model, options.beta, output_dir)
    reward = r8.controller.reward.ema.value
    reward_text = "none yet" if reward is None else f"{reward:.3f}"
    print(f"final LR gain {r8.controller.lr_gain():.3f}, reward EMA {reward_text}; "
          f"decisions and plots in {output_dir}/r8/r8_events.jsonl and {output_dir}/r8/r8_report/")


if __name__ == "__main__":
    main()
