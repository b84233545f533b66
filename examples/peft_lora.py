"""R8Trainer on a PEFT LoRA model: the LR adapts, and rollback snapshots hold the adapters only. Offline by default.

    python examples/peft_lora.py [--steps 200] [--rank 8] [--preset default] [--model gpt2]
        [--output-dir outputs/example_peft_lora]

LoRA trains a few small matrices beside frozen weights. R8's rollback keeps healthy snapshots of what
can change (`rollback.scope: trainable`, the default): the adapters, their optimizer state and the
buffers, never the frozen base model, so a snapshot costs a fraction of the model's size in RAM.
`--model` loads a Hub model instead (falls back to the offline tiny GPT-2 when the Hub is unreachable);
LoRA goes on GPT-2's fused attention projection `c_attn`.
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from hf_r8 import R8Config, R8Trainer
from hf_r8.demo.offline import language_modeling_dataset, load_hub_or_offline
from hf_r8.runtime.snapshot import model_tensors, snapshot_bytes, trainable_parameter_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--model", default=None, help="a GPT-2-like Hub model (default: the offline tiny GPT-2)")
    parser.add_argument("--output-dir", default="outputs/example_peft_lora")
    options = parser.parse_args()

    base, tokenizer, source = load_hub_or_offline(options.model)
    print(f"model: {source}")
    model = get_peft_model(base, LoraConfig(r=options.rank, lora_alpha=2 * options.rank, target_modules=["c_attn"],
                                            fan_in_fan_out=True))  # GPT-2's Conv1D stores weights transposed
    model.print_trainable_parameters()
    dataset = language_modeling_dataset(tokenizer, seq_len=64)
    args = TrainingArguments(output_dir=options.output_dir, max_steps=options.steps, learning_rate=3e-3,
                             per_device_train_batch_size=16, lr_scheduler_type="cosine", warmup_steps=10,
                             logging_steps=20, report_to=[], save_strategy="no",
                             use_cpu=not torch.cuda.is_available())
    config = R8Config.from_preset(options.preset)
    trainer = R8Trainer(model=model, args=args, train_dataset=dataset, r8=config)
    trainer.train()

    for event in trainer.r8_callback.events:
        if event.group <= 0:
            print(f"step {event.step:4d}  {event.rule}/{event.action}: {event.reason}")
    rollback = next((log for log in reversed(trainer.state.log_history) if "r8/rollbacks" in log), {})
    print(f"rollbacks {rollback.get('r8/rollbacks', 0):.0f}, skipped steps {rollback.get('r8/skipped_steps', 0):.0f}")
    # What StateSnapshot.capture copies at this scope (plus the optimizer state of the trainable parameters).
    held_names = trainable_parameter_names(model) if config.rollback.scope == "trainable" else None
    held = [name for name in model_tensors(model, held_names) if not name.startswith("buffer:")]
    snapshot_kb = snapshot_bytes(model, trainer.optimizer, held_names) / 1e3
    whole_kb = snapshot_bytes(model, trainer.optimizer) / 1e3
    adapters_only = bool(held) and all("lora_" in name for name in held)
    print(f"rollback snapshot (scope={config.rollback.scope}): {len(held)} parameter tensors, "
          f"{'LoRA adapters only' if adapters_only else 'not only adapters'}, {snapshot_kb:.1f} kB "
          f"(the whole model would take {whole_kb:.1f} kB)")
    print(f"final LR gain {trainer.r8_callback.controller.lr_gain():.3f}, "
          f"train loss {trainer.state.log_history[-1]['train_loss']:.3f}")


if __name__ == "__main__":
    main()
