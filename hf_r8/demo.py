"""The main job until the notebook demo lands: a small GPT-2 trained without and with R8Callback.

Runs offline: the model is GPT-2 built from a config, the tokenizer is trained locally, the text is
the Python reference documentation (see `offline.py`). With `--model gpt2` and internet, the real
pretrained model and tokenizer are used instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from transformers import PrinterCallback, Trainer, TrainingArguments

from hf_r8.callback import R8Callback
from hf_r8.config import R8Config
from hf_r8.offline import language_modeling_dataset, load_hub_or_offline


@dataclass
class DemoSettings:
    """What `hf-r8 demo` runs."""

    steps: int = 300
    preset: str = "default"
    learning_rate: float = 1e-3
    batch_size: int = 16
    seq_len: int = 64
    model: str | None = None
    output_dir: str = "outputs/demo"


def run_demo(settings: DemoSettings, console: Console | None = None) -> dict[str, float]:
    """Train the same model twice, without and with R8; print R8's decisions and both results."""
    console = console or Console()
    model, tokenizer, source = load_hub_or_offline(settings.model)
    dataset = language_modeling_dataset(tokenizer, seq_len=settings.seq_len)
    split = dataset.train_test_split(test_size=0.05, seed=0)
    console.print(f"[bold]hf_r8 demo[/bold]: {source}, {sum(p.numel() for p in model.parameters()):,} parameters, "
                  f"{len(split['train']):,} train / {len(split['test']):,} held-out blocks of {settings.seq_len} "
                  f"tokens, AdamW lr={settings.learning_rate:g} with warmup + cosine, {settings.steps} steps")
    initial_weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def train(callbacks: list[R8Callback]) -> tuple[Trainer, float, float]:
        model.load_state_dict(initial_weights)
        args = TrainingArguments(
            output_dir=settings.output_dir, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=64, learning_rate=settings.learning_rate, lr_scheduler_type="cosine",
            warmup_steps=max(1, settings.steps // 20), logging_steps=max(1, settings.steps // 10),
            eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, seed=0, log_level="warning",
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=args, train_dataset=split["train"], eval_dataset=split["test"],
                          callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # the tables below say it better
        runtime = trainer.train().metrics["train_runtime"]
        return trainer, trainer.evaluate()["eval_loss"], runtime

    console.print("baseline: the same run without R8 ...")
    _, baseline_loss, baseline_runtime = train([])
    console.print(f"with R8Callback (preset [cyan]{settings.preset}[/cyan]) ...")
    callback = R8Callback(R8Config.from_preset(settings.preset))
    trainer, eval_loss, runtime = train([callback])

    table = Table(title="R8 decisions (parameter group 0)")
    for column in ("step", "rule", "action", "LR gain", "reason"):
        table.add_column(column)
    decisions = [event for event in callback.events if event.group in (0, -1)]
    for event in decisions:
        table.add_row(str(event.step), event.rule, event.action, f"{event.old_value:.3g} -> {event.new_value:.3g}",
                      event.reason)
    console.print(table)
    columns = ("step", "loss", "learning_rate", "r8/lr_gain", "r8/loss_ema", "r8/grad_norm_ema")
    history = Table(title="Training log with R8")
    for column in columns:
        history.add_column(column, justify="right")
    for entry in trainer.state.log_history:
        if "loss" in entry:
            history.add_row(*(f"{entry.get(key, float('nan')):.4g}" for key in columns))
    console.print(history)
    summary = {
        "baseline_eval_loss": baseline_loss, "r8_eval_loss": eval_loss,
        "baseline_perplexity": math.exp(baseline_loss), "r8_perplexity": math.exp(eval_loss),
        "final_lr_gain": callback.controller.lr_gain(0), "decisions": float(len(decisions)),
        "baseline_runtime_s": baseline_runtime, "r8_runtime_s": runtime,
    }
    console.print("  ".join(f"[bold]{key}[/bold]={value:.4g}" for key, value in summary.items()))
    return summary
