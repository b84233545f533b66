"""R8Callback on a stock transformers.Trainer, offline: a tiny GPT-2 on the Python docs.

    python examples/stock_trainer.py [--preset conservative]

Everything R8 adds is the `callbacks=[...]` line; the rest is an ordinary Trainer script.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Trainer, TrainingArguments

from hf_r8 import R8Callback
from hf_r8.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=200)
    options = parser.parse_args()

    tokenizer = build_tokenizer(2048)
    dataset = language_modeling_dataset(tokenizer, seq_len=64)
    model = tiny_gpt2(len(tokenizer))
    args = TrainingArguments(output_dir="outputs/example", max_steps=options.steps, learning_rate=1e-3,
                             per_device_train_batch_size=16, lr_scheduler_type="cosine", warmup_steps=10,
                             logging_steps=20, report_to=[], save_strategy="no",
                             use_cpu=not torch.cuda.is_available())  # several CPU processes: a real DDP run
    r8 = R8Callback.from_preset(options.preset)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[r8]).train()
    for event in r8.events:
        if event.group == 0:
            print(f"step {event.step:4d}  {event.action:15s} gain {event.old_value:.3f} -> {event.new_value:.3f}  "
                  f"({event.reason})")


if __name__ == "__main__":
    main()
