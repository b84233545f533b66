"""Run under `torchrun --nproc_per_node 2`: R8Callback in a real 2-process DDP Trainer (gloo on CPU).

Each rank writes OUTPUT_DIR/rank<k>.json with its controller state, the LRs it logged and the
loss of each step as seen on that rank alone, for tests/test_distributed.py to compare.
"""

from __future__ import annotations

import faulthandler
import sys

import torch.distributed as dist
from rank_result import write_rank_result
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_r8 import R8Callback
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2


class LocalLosses(TrainerCallback):
    """This rank's own per-step loss, read from R8's tap before any reduction."""

    def __init__(self, r8: R8Callback) -> None:
        self.r8 = r8
        self.losses: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.losses.append(self.r8._run.taps.step_loss.item())


def main(output_dir: str) -> None:
    tokenizer = build_tokenizer(512)
    dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=256)
    model = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    r8 = R8Callback.from_preset("aggressive")
    local = LocalLosses(r8)
    args = TrainingArguments(output_dir=output_dir, max_steps=20, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                             ddp_find_unused_parameters=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[r8, local])
    trainer.train()
    result = {
        "world_size": dist.get_world_size(),
        "controller": r8.controller.state_dict(),
        "learning_rates": [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry],
        "local_losses": local.losses,
    }
    write_rank_result(output_dir, result)


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)  # a hang prints where it is stuck instead of timing out silently
    main(sys.argv[1])
