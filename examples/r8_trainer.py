"""R8Trainer: adaptive LR, a per-example loss catalog and loss-quartile balanced batches. Offline by default.

    python examples/r8_trainer.py [--examples 1024] [--epochs 3] [--steps N] [--preset default] [--model gpt2]
        [--output-dir outputs/example_r8_trainer]

The first epoch is the cataloging epoch: every example is trained on once, in a seeded order, and its
own loss goes into the catalog. Every later epoch is planned from the catalog: each batch mixes the
examples of the four loss quartiles (Q1 lowest ... Q4 highest) in fixed proportions. `--steps` caps
the run (by default it runs `--epochs` full epochs). `--model` loads a Hub model instead (falls back to
the offline tiny GPT-2 when the Hub is unreachable).
"""

from __future__ import annotations

import argparse

import torch
from transformers import TrainingArguments

from hf_r8 import R8Config, R8Trainer
from hf_r8.demo.offline import language_modeling_dataset, load_hub_or_offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1024, help="training blocks of 64 tokens")
    parser.add_argument("--epochs", type=float, default=3.0, help="epoch 1 catalogs, later epochs are balanced")
    parser.add_argument("--steps", type=int, default=-1, help="stop after this many steps (default: --epochs)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--model", default=None, help="a Hub model name (default: the offline tiny GPT-2)")
    parser.add_argument("--output-dir", default="outputs/example_r8_trainer")
    options = parser.parse_args()

    model, tokenizer, source = load_hub_or_offline(options.model)
    print(f"model: {source}")
    blocks = language_modeling_dataset(tokenizer, seq_len=64, max_examples=options.examples + 64)
    train, held_out = blocks.select(range(options.examples)), blocks.select(range(options.examples, len(blocks)))
    args = TrainingArguments(output_dir=options.output_dir, num_train_epochs=options.epochs, max_steps=options.steps,
                             learning_rate=1e-3, per_device_train_batch_size=16, lr_scheduler_type="cosine",
                             warmup_steps=10, logging_steps=10, report_to=[],
                             save_strategy="no", use_cpu=not torch.cuda.is_available())
    trainer = R8Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                        r8=R8Config.from_preset(options.preset))
    trainer.train()

    catalog = trainer.r8_catalog
    for event in trainer.r8_callback.events:
        if event.group <= 0:  # the sampler's epoch plans (group -1) and group 0's LR decisions
            print(f"step {event.step:4d}  {event.rule}/{event.action}: {event.reason}")
    statistics = catalog.statistics()
    quartiles = "  ".join(f"Q{q} {statistics[f'q{q}_loss']:.3f}" for q in range(1, 5) if f"q{q}_loss" in statistics)
    print(f"catalog: {int(catalog.seen.sum())}/{catalog.size} examples cataloged, "
          f"each used {int(catalog.usage.min())}..{int(catalog.usage.max())} times; mean loss per quartile: "
          f"{quartiles}")
    print(f"final LR gain {trainer.r8_callback.controller.lr_gain():.3f}, "
          f"eval loss {trainer.evaluate()['eval_loss']:.3f}")


if __name__ == "__main__":
    main()
