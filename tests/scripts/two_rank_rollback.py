"""Run under `torchrun --nproc_per_node 2`: faults on rank 1 only, in a real 2-process R8Trainer run (gloo on CPU).

Rank 1 alone gets a NaN loss at step 30 and garbage batches at steps 40 and 41. Each rank writes
OUTPUT_DIR/rank<k>.json (rollback counts, a digest of its weights, the indices it trained on) and
OUTPUT_DIR/rank<k>/r8_catalog.npz, for tests/test_distributed.py to compare.
"""

from __future__ import annotations

import faulthandler
import hashlib
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from rank_result import write_rank_result
from recording_trainer import RecordingR8Trainer
from transformers import TrainingArguments

from hf_r8 import R8Config
from hf_r8.control.config import RollbackConfig
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2

NAN_STEP, GARBAGE_STEPS = 30, (40, 41)


class RankOneFaults(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.training_forwards = 0

    def forward(self, input_ids, labels=None, attention_mask=None):
        faulty_rank = dist.get_rank() == 1
        if self.training:
            self.training_forwards += 1
        if self.training and faulty_rank and self.training_forwards in GARBAGE_STEPS:
            input_ids = torch.randint(0, self.inner.config.vocab_size, input_ids.shape)
            labels = torch.randint(0, self.inner.config.vocab_size, input_ids.shape)
        output = self.inner(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
        if self.training and faulty_rank and self.training_forwards == NAN_STEP:
            output["loss"] = output.loss * math.nan
        return output


def main(output_dir: str) -> None:
    tokenizer = build_tokenizer(512)
    dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=256)
    model = RankOneFaults(tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    config = R8Config.from_preset("default")
    config.rollback = RollbackConfig(every_steps=10, healthy_steps=5, window=20, min_history=10)
    args = TrainingArguments(output_dir=output_dir, max_steps=50, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=5, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                             ddp_find_unused_parameters=False, seed=0)
    trainer = RecordingR8Trainer(model=model, args=args, train_dataset=dataset, r8=config)
    trainer.train()
    rank = dist.get_rank()
    weights = torch.cat([param.detach().reshape(-1) for param in model.parameters()])
    policy = trainer.r8_callback._run.engine.rollback
    result = {"rollbacks": policy.rollbacks, "skipped_steps": policy.skipped_steps,
              "weights_digest": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
              "weights_finite": bool(torch.isfinite(weights).all()),
              "rollback_steps": [event.step for event in trainer.r8_callback.events
                                 if event.rule == "rollback" and event.group == 0],
              "seen_indices": trainer.seen_indices}
    folder = Path(output_dir, f"rank{rank}")
    folder.mkdir(parents=True, exist_ok=True)
    trainer.r8_catalog.save(folder)
    write_rank_result(output_dir, result)


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)
    main(sys.argv[1])
