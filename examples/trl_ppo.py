"""R8Callback on TRL's PPOTrainer: the reward drives the learning rate once per PPO update. Offline by default.

    pip install "trl==1.12.0"      # PPOTrainer lives in trl.experimental.ppo up to TRL 1.12, and is gone after
    python examples/trl_ppo.py [--steps 20] [--model gpt2]

PPOTrainer runs its own loop: each update generates completions, scores them with a reward *model*,
then takes several optimizer steps (PPO epochs x mini-batches) and fires `on_step_end` once. R8 sets
the LR and AdamW's beta1 once per update from the update's mean score (`objective/scores`); the
non-finite guard and rollback need a hook before each optimizer step, which this loop does not
fire, so they are off (R8 says so in a warning).

The reward model here scores completions rich in the letter "e" without any training: its
"backbone" maps every token to its count of "e" and of characters and returns the running share,
so the score read at the last token is the share of "e" in the text. `--model` loads a Hub model as
the policy instead (falls back to the offline tiny GPT-2 when the Hub is unreachable).
"""

from __future__ import annotations

import argparse
import copy
import sys
from types import SimpleNamespace

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from hf_r8 import R8Callback, R8Config
from hf_r8.demo.offline import english_paragraphs, load_hub_or_offline

try:
    from trl.experimental.ppo import PPOConfig, PPOTrainer
except ImportError:  # TRL >= 1.13
    PPOConfig = PPOTrainer = None


class LetterShare(torch.nn.Module):
    """Per position, the share of `letter` among the characters of the tokens so far (padding excluded)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, letter: str = "e") -> None:
        super().__init__()
        pieces = [tokenizer.decode([token]) for token in range(len(tokenizer))]
        self.register_buffer("letters", torch.tensor([piece.count(letter) for piece in pieces], dtype=torch.float32))
        self.register_buffer("characters", torch.tensor([len(piece) for piece in pieces], dtype=torch.float32))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> SimpleNamespace:
        mask = attention_mask.float()
        letters = (self.letters[input_ids] * mask).cumsum(dim=1)
        characters = (self.characters[input_ids] * mask).cumsum(dim=1).clamp(min=1.0)
        return SimpleNamespace(hidden_states=((letters / characters).unsqueeze(-1),))


class LetterShareRewardModel(torch.nn.Module):
    """The interface TRL's PPO reads from a reward model: `getattr(model, model.base_model_prefix)` and `score`."""

    base_model_prefix = "backbone"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, letter: str = "e") -> None:
        super().__init__()
        self.backbone = LetterShare(tokenizer, letter)
        self.score = torch.nn.Identity()


def run(steps: int, model_name: str | None, output_dir: str) -> R8Callback:
    if PPOTrainer is None:
        sys.exit("This TRL has no PPOTrainer (it lives in trl.experimental.ppo up to TRL 1.12): "
                 "pip install 'trl==1.12.0' to run this example.")
    policy, tokenizer, source = load_hub_or_offline(model_name, vocab_size=512)
    print(f"model: {source}")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    # The value model: the policy's architecture with a one-output head (initialised from scratch).
    value_config = copy.deepcopy(AutoConfig.for_model(**policy.config.to_dict()))
    value_config.num_labels = 1
    value_config.pad_token_id = tokenizer.pad_token_id
    value_model = AutoModelForSequenceClassification.from_config(value_config)
    prompts = [text[:40] for text in english_paragraphs()[:64]]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(prompt)["input_ids"] for prompt in prompts]})
    batch = 16
    args = PPOConfig(output_dir=output_dir, total_episodes=steps * batch, per_device_train_batch_size=batch,
                     num_mini_batches=2, num_ppo_epochs=2, response_length=16, learning_rate=3e-3,
                     lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
                     stop_token=None, missing_eos_penalty=None, num_sample_generations=0,
                     use_cpu=not torch.cuda.is_available())
    r8 = R8Callback(R8Config.from_preset("reward_rl"))
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=LetterShareRewardModel(tokenizer), value_model=value_model,
                         train_dataset=dataset, callbacks=[r8])
    trainer.train()
    return r8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="PPO updates")
    parser.add_argument("--model", default=None, help="a Hub model name for the policy (default: offline tiny GPT-2)")
    parser.add_argument("--output-dir", default="outputs/example_ppo")
    options = parser.parse_args()
    r8 = run(options.steps, options.model, options.output_dir)
    reward = r8.controller.reward.ema.value
    reward_text = "none yet" if reward is None else f"{reward:.3f}"
    print(f"final LR gain {r8.controller.lr_gain():.3f}, reward EMA {reward_text}; "
          f"decisions and plots in {options.output_dir}/r8/r8_events.jsonl and {options.output_dir}/r8/r8_report/")


if __name__ == "__main__":
    main()
