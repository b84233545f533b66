"""R8Callback on a stock transformers.Trainer, offline: a tiny GPT-2 on the Python docs.

    python examples/trainer_callback_only.py [--steps 200] [--preset conservative] [--model gpt2]
        [--output-dir outputs/example]

Everything R8 adds is the `callbacks=[...]` line; the rest is an ordinary Trainer script (no R8Trainer:
no loss catalog, no balanced sampler). `--model` loads a Hub model instead (falls back to the offline
tiny GPT-2 when the Hub is unreachable).
"""

from __future__ import annotations

import argparse

import torch
from transformers import Trainer, TrainingArguments

from hf_r8 import R8Callback
from hf_r8.demo.offline import language_modeling_dataset, load_hub_or_offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--model", default=None, help="a Hub model name (default: the offline tiny GPT-2)")
    parser.add_argument("--output-dir", default="outputs/example")
    options = parser.parse_args()

    model, tokenizer, source = load_hub_or_offline(options.model)
    print(f"model: {source}")
    dataset = language_modeling_dataset(tokenizer, seq_len=64)
    args = TrainingArguments(output_dir=options.output_dir, max_steps=options.steps, learning_rate=1e-3,
                             per_device_train_batch_size=16, lr_scheduler_type="cosine", warmup_steps=10,
                             logging_steps=20, report_to=[], save_strategy="no",
                             use_cpu=not torch.cuda.is_available())  # several CPU processes: a real DDP run
    r8 = R8Callback.from_preset(options.preset)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[r8]).train()
    for event in r8.events:
        if event.group == 0:
            print(f"step {event.step:4d}  {event.action:15s} gain {event.old_value:.3f} -> {event.new_value:.3f}  "
                  f"({event.reason})")
    if torch.distributed.is_initialized():  # several processes: leave together (gloo may abort an exit without it)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
