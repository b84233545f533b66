"""One R8Trainer run (30 steps, a checkpoint every 5), for tests/test_rollback.py's crash test.

    python crash_and_resume.py RUN_DIR [--kill-at STEP] [--resume]

Appends the LR of every optimizer step to RUN_DIR/lrs.jsonl as it goes; `--kill-at` sends itself
SIGKILL at the end of that step (no cleanup of any kind runs); `--resume` continues from the last
checkpoint. At the end it writes RUN_DIR/final/ (the catalog) and RUN_DIR/final/controller.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

from transformers import TrainerCallback, TrainingArguments

from hf_r8 import R8Config, R8Trainer
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2


class StepLog(TrainerCallback):
    def __init__(self, path: Path, kill_at: int | None) -> None:
        self.path, self.kill_at = path, kill_at

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        with self.path.open("a") as handle:  # the LR this step used (R8 restores the schedule's after this event)
            handle.write(json.dumps([state.global_step + 1, [group["lr"] for group in optimizer.param_groups]]) + "\n")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    run_dir = Path(options.run_dir)
    tokenizer = build_tokenizer(512)
    dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=96)
    model = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    args = TrainingArguments(output_dir=str(run_dir), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
                             lr_scheduler_type="cosine", warmup_steps=3, logging_steps=1, report_to=[],
                             save_strategy="steps", save_steps=5, disable_tqdm=True, use_cpu=True, seed=0)
    config = R8Config.from_preset("aggressive")
    trainer = R8Trainer(model=model, args=args, train_dataset=dataset, r8=config,
                        callbacks=[StepLog(run_dir / "lrs.jsonl", options.kill_at)])
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    final = run_dir / "final"
    final.mkdir(exist_ok=True)
    trainer.r8_catalog.save(final)
    (final / "controller.json").write_text(json.dumps(trainer.r8_callback.controller.state_dict()))


if __name__ == "__main__":
    main()
