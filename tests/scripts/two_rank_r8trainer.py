"""Run under `torchrun --nproc_per_node 2`: R8Trainer in a real 2-process DDP run (gloo on CPU).

Each rank writes OUTPUT_DIR/rank<k>/r8_catalog.npz and OUTPUT_DIR/rank<k>.json with the example
indices it trained on, for tests/test_distributed.py to compare.
"""

from __future__ import annotations

import faulthandler
import sys
from pathlib import Path

import torch.distributed as dist
from rank_result import write_rank_result
from recording_trainer import RecordingR8Trainer
from transformers import TrainingArguments

from hf_r8 import R8Config
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2


def main(output_dir: str) -> None:
    tokenizer = build_tokenizer(512)
    dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=64)
    model = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    args = TrainingArguments(output_dir=output_dir, max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=1, report_to=[], save_strategy="steps", save_steps=5, disable_tqdm=True,
                             use_cpu=True,
                             ddp_find_unused_parameters=False, seed=0)
    trainer = RecordingR8Trainer(model=model, args=args, train_dataset=dataset, r8=R8Config.from_preset("default"))
    trainer.train()
    rank = dist.get_rank()
    folder = Path(output_dir, f"rank{rank}")
    folder.mkdir(parents=True, exist_ok=True)
    trainer.r8_catalog.save(folder)
    write_rank_result(output_dir, {"seen_indices": trainer.seen_indices})


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)
    main(sys.argv[1])
