"""A short real training with R8Callback, run by tests/test_dashboard.py inside a pseudo-terminal."""

from __future__ import annotations

import sys

from transformers import Trainer, TrainingArguments

from hf_r8 import R8Callback
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2


def main(output_dir: str) -> None:
    tokenizer = build_tokenizer(512)
    dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=128)
    model = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    args = TrainingArguments(output_dir=output_dir, max_steps=30, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[R8Callback()]).train()


if __name__ == "__main__":
    main(sys.argv[1])
