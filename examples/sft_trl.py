"""`with_r8(SFTTrainer)`: TRL's supervised fine-tuning with R8's adaptive LR, loss catalog and balanced batches.

    python examples/sft_trl.py [--steps 60] [--examples 256] [--preset default] [--model gpt2]
        [--output-dir outputs/example_sft]

`with_r8` subclasses any Trainer class: here TRL's SFTTrainer, on plain text (paragraphs of the Python
documentation, offline). SFTTrainer tokenizes the `text` column itself; R8 adds its callback, records each
example's loss from the trainer's fused LM head and plans balanced batches from the second epoch on.
`--model` loads a Hub model instead (falls back to the offline tiny GPT-2 when the Hub is unreachable).
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from hf_r8 import R8Config, with_r8
from hf_r8.demo.offline import english_paragraphs, load_hub_or_offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--examples", type=int, default=256, help="paragraphs to train on")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--model", default=None, help="a Hub model name (default: the offline tiny GPT-2)")
    parser.add_argument("--output-dir", default="outputs/example_sft")
    options = parser.parse_args()

    model, tokenizer, source = load_hub_or_offline(options.model)
    print(f"model: {source}")
    dataset = Dataset.from_dict({"text": english_paragraphs()[:options.examples]})
    args = SFTConfig(output_dir=options.output_dir, max_steps=options.steps, max_length=64, learning_rate=1e-3,
                     per_device_train_batch_size=16, lr_scheduler_type="cosine", warmup_steps=10, logging_steps=10,
                     report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available())
    trainer = with_r8(SFTTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  r8=R8Config.from_preset(options.preset))
    trainer.train()

    for event in trainer.r8_callback.events:
        if event.group <= 0:
            print(f"step {event.step:4d}  {event.rule}/{event.action}: {event.reason}")
    catalog = trainer.r8_catalog
    print(f"catalog: {int(catalog.seen.sum())}/{catalog.size} examples cataloged")
    history = trainer.state.log_history
    losses = [log["loss"] for log in history if "loss" in log] or [history[-1]["train_loss"]]  # logged, or the mean
    print(f"final LR gain {trainer.r8_callback.controller.lr_gain():.3f}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
