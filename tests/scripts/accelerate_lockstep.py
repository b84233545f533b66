"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU): every rank checks, at every step,
that all ranks use the same LR and hold the same catalog; writes OUTPUT_DIR/rank<k>.json.

`script.py OUTPUT_DIR moe` trains a tiny Mixtral (router aux loss on) with the `moe` preset instead.
"""

from __future__ import annotations

import faulthandler
import hashlib
import sys

import torch.distributed as dist
from rank_result import write_rank_result
from recording_trainer import RecordingR8Trainer
from transformers import TrainerCallback, TrainingArguments

from hf_r8 import R8Config, R8Trainer
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2, tiny_mixtral


class Lockstep(TrainerCallback):
    """After each step: gather (LR of every group, catalog digest) from all ranks; count disagreements."""

    def __init__(self, trainer: R8Trainer) -> None:
        self.trainer, self.steps, self.disagreements = trainer, 0, []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        catalog = self.trainer.r8_catalog
        digest = hashlib.sha256(b"".join(getattr(catalog, name).tobytes() for name in
                                         ("ema_loss", "usage", "seen"))).hexdigest()
        mine = ([group["lr"] for group in optimizer.param_groups], digest)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        self.steps += 1
        if any(other != everyone[0] for other in everyone):
            self.disagreements.append(state.global_step)


def main(output_dir: str, moe: bool) -> None:
    tokenizer = build_tokenizer(512)
    dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=128)
    model = tiny_mixtral(len(tokenizer), output_router_logits=True) if moe else \
        tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    args = TrainingArguments(output_dir=output_dir, max_steps=30, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=5, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                             ddp_find_unused_parameters=False, seed=0)  # use_cpu: without it each process
    # would train alone on a machine without GPUs (Accelerate's state says 1 process)
    config = R8Config.from_preset("moe" if moe else "aggressive")
    if not moe:  # a 10-step LR range test first (30 steps are too few for the default's sizing): both ranks sweep
        config.range_test.steps = 10
    trainer = RecordingR8Trainer(model=model, args=args, train_dataset=dataset, r8=config)
    lockstep = Lockstep(trainer)
    trainer.add_callback(lockstep)
    trainer.train()
    result = {"world_size": dist.get_world_size(), "accelerate_processes": trainer.accelerator.num_processes,
              "steps": lockstep.steps, "disagreements": lockstep.disagreements,
              "decisions": sum(event.rule == "decision" for event in trainer.r8_callback.events),
              "seen_indices": trainer.seen_indices}
    controller = trainer.r8_callback.controller
    result["routers"] = [spec.is_router for spec in controller.specs]
    result["router_gains"] = [[*controller.gain_bounds[i], controller.lr_gain(i)] for i, spec in
                              enumerate(controller.specs) if spec.is_router]
    result["aux_loss_ema"] = controller.aux_slow.value
    result["range_test"] = [[event.step, event.new_value] for event in trainer.r8_callback.events
                            if event.rule == "range_test"]
    write_rank_result(output_dir, result)


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)
    main(sys.argv[1], moe=sys.argv[2:] == ["moe"])
