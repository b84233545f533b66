"""`hf-r8 demo`: GPT-2 fine-tuned on WikiText-2 with the whole hf_r8 stack, then its report.

`R8Trainer` (LR controller, per-example loss catalog and loss-balanced batches, rollback, live
dashboard) trains GPT-2; the run ends with the report's plots (`<output_dir>/r8/r8_report/`) and a
one-screen summary. By default (`compare=True`) it first trains the same model on the same data, seed and
steps with the stock Trainer and its cosine schedule: the summary puts both side by side, and
`<output_dir>/compare.png` draws both loss curves and both LR curves.

Online it fine-tunes the pretrained `gpt2` on `wikitext-2-raw-v1`. Offline (no network, or
HF_HUB_OFFLINE=1) it says so in one line and builds a GPT-2 of `model_size` from a config, with a
tokenizer trained locally on the Python documentation and the standard library's docstrings (see
`offline.py`): nothing is downloaded, and the default settings finish in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from rich.console import Console
from rich.table import Table
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    ProgressCallback,
    Trainer,
    TrainingArguments,
)

from hf_r8.control.config import R8Config
from hf_r8.demo.offline import (
    build_tokenizer,
    english_paragraphs,
    hub_or_cache,
    hub_reachable,
    language_modeling_dataset,
    load_causal_lm,
)
from hf_r8.integrations.trainer import R8Trainer
from hf_r8.ui.report import REPORT_DIR
from hf_r8.ui.run_log import EVENTS_FILE, RUN_DIR

# GPT-2 shapes the offline fallback builds from a config: (layers, width, heads).
MODEL_SIZES = {"tiny": (2, 128, 2), "small": (4, 256, 4), "gpt2": (12, 768, 12)}
OFFLINE_VOCAB_SIZE = 4096
COMPARE_FIGURE = "compare.png"


@dataclass
class DemoSettings:
    """What `hf-r8 demo` runs (its flags)."""

    steps: int = 300
    train_examples: int | None = 1200
    """Blocks of `seq_len` tokens trained on (None: all): 1200 makes 300 steps 4 epochs, so the run shows
    the cataloging epoch and then loss-balanced batches."""
    model_size: str = "tiny"
    """Shape of the GPT-2 built from a config when the Hub is unreachable (`MODEL_SIZES`)."""
    preset: str = "default"
    output_dir: str = "outputs/demo"
    dashboard: bool = True
    compare: bool = True
    """Also train the same model with the stock Trainer's cosine schedule: the summary's and the figure's baseline."""
    learning_rate: float | None = None
    """Default: 5e-5 to fine-tune the pretrained model, 1e-3 for a model trained from scratch."""
    batch_size: int = 16
    seq_len: int = 128
    model: str = "gpt2"
    dataset: tuple[str, str] = ("Salesforce/wikitext", "wikitext-2-raw-v1")
    offline: bool = False
    """Use the offline fallback without asking the Hub."""
    seed: int = 0


@dataclass
class DemoData:
    model: Any
    train: Dataset
    held_out: Dataset
    source: str
    pretrained: bool
    notes: list[str] = field(default_factory=list)


def _blocks(texts: list[str], tokenizer: Any, seq_len: int) -> Dataset:
    return language_modeling_dataset(tokenizer, seq_len=seq_len, texts=[text for text in texts if text.strip()])


def load_demo_data(settings: DemoSettings, console: Console) -> DemoData:
    """GPT-2 and WikiText-2 from the Hub (or its cache); else the offline GPT-2 and text, said in one line."""
    reachable = not settings.offline and hub_reachable()
    if not settings.offline:
        try:
            from datasets import load_dataset

            with hub_or_cache(reachable):
                model, tokenizer = load_causal_lm(settings.model)
                wikitext = load_dataset(*settings.dataset)
        except (OSError, ValueError) as error:  # unreachable and not cached; ValueError: no such config
            why = "the Hub is unreachable" if not reachable else type(error).__name__
            console.print(f"[yellow]offline[/yellow]: {why} and {settings.model} / {settings.dataset[1]} are not "
                          f"cached: a GPT-2 ({settings.model_size}) from config, trained from scratch on the Python "
                          "docs and the standard library's docstrings")
        else:
            return DemoData(model=model, train=_blocks(wikitext["train"]["text"], tokenizer, settings.seq_len),
                            held_out=_blocks(wikitext["validation"]["text"], tokenizer, settings.seq_len),
                            source=f"{settings.model} on {settings.dataset[1]}", pretrained=True)
    tokenizer = build_tokenizer(OFFLINE_VOCAB_SIZE, include_docstrings=True)
    paragraphs = english_paragraphs(include_docstrings=True)
    layers, width, heads = MODEL_SIZES[settings.model_size]
    torch.manual_seed(settings.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=layers, n_embd=width, n_head=heads,
                                       n_positions=max(128, settings.seq_len), bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
    model.loss_type = "ForCausalLM"  # not inferable from the class name (see offline.tiny_gpt2)
    # Every 20th paragraph is held out: a validation split spread over the whole corpus.
    return DemoData(model=model,
                    train=_blocks([text for i, text in enumerate(paragraphs) if i % 20], tokenizer, settings.seq_len),
                    held_out=_blocks(paragraphs[::20], tokenizer, settings.seq_len),
                    source=f"offline: GPT-2 {settings.model_size} from config on the Python docs", pretrained=False)


def _arguments(settings: DemoSettings, output_dir: Path, learning_rate: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=2 * settings.batch_size, learning_rate=learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.steps // 20), logging_steps=max(1, settings.steps // 30), eval_strategy="no",
        save_strategy="no", report_to=[], seed=settings.seed, log_level="warning",
        use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available(),
    )


def run_demo(settings: DemoSettings, console: Console | None = None) -> dict[str, float]:
    """Train (the cosine baseline first with `compare`, then R8), print the summary, return its numbers."""
    if settings.model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {sorted(MODEL_SIZES)}, got {settings.model_size!r}")
    if settings.train_examples is not None and settings.train_examples < 1:
        raise ValueError(f"train_examples must be >= 1 or None, got {settings.train_examples!r}")
    console = console or Console()
    data = load_demo_data(settings, console)
    if settings.train_examples is not None and settings.train_examples < len(data.train):
        data.train = data.train.shuffle(seed=settings.seed).select(range(settings.train_examples))
    learning_rate = settings.learning_rate or (5e-5 if data.pretrained else 1e-3)
    parameters = sum(p.numel() for p in data.model.parameters())
    console.print(f"[bold]hf_r8 demo[/bold]: {data.source}; {parameters / 1e6:.1f}M parameters, "
                  f"{len(data.train):,} train / {len(data.held_out):,} held-out blocks of {settings.seq_len} tokens; "
                  f"AdamW lr={learning_rate:g}, warmup + cosine, {settings.steps} steps, preset {settings.preset}")
    output_dir = Path(settings.output_dir)
    initial_weights = {name: tensor.clone() for name, tensor in data.model.state_dict().items()}
    summary: dict[str, float] = {}
    histories: dict[str, list[dict[str, float]]] = {}
    if settings.compare:
        console.print("cosine baseline: the stock Trainer, same model, data and steps ...")
        baseline = Trainer(model=data.model, args=_arguments(settings, output_dir / "cosine_baseline", learning_rate),
                           train_dataset=data.train, eval_dataset=data.held_out)
        start = time.perf_counter()
        baseline.train()
        summary["cosine_seconds"] = time.perf_counter() - start
        summary["cosine_eval_loss"] = baseline.evaluate()["eval_loss"]
        histories["cosine (stock Trainer)"] = baseline.state.log_history
        data.model.load_state_dict(initial_weights)

    config = R8Config.from_preset(settings.preset)
    config.dashboard = settings.dashboard
    trainer = R8Trainer(model=data.model, args=_arguments(settings, output_dir, learning_rate),
                        train_dataset=data.train, eval_dataset=data.held_out, r8=config)
    if settings.dashboard:
        trainer.remove_callback(ProgressCallback)  # the dashboard shows progress, the summary the results
    start = time.perf_counter()
    trainer.train()
    summary["r8_seconds"] = time.perf_counter() - start
    summary["r8_eval_loss"] = trainer.evaluate()["eval_loss"]
    callback = trainer.r8_callback
    summary.update(final_lr_gain=callback.controller.lr_gain(0),
                   **{name: float(count) for name, count in callback.rollback_counts.items()})
    _print_summary(console, settings, summary, callback.events, output_dir)
    if histories:
        histories[f"hf_r8 ({settings.preset})"] = trainer.state.log_history
        console.print(f"both runs' loss and LR: {compare_figure(histories, output_dir / COMPARE_FIGURE)}")
    return summary


def compare_figure(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """The training loss and the LR used of each run (a Trainer's `state.log_history`), side by side, in one PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    loss_axis, lr_axis = figure.subplots(1, 2)
    for label, history in histories.items():
        logs = [entry for entry in history if "loss" in entry and "learning_rate" in entry]
        steps = [entry["step"] for entry in logs]
        loss_axis.plot(steps, [entry["loss"] for entry in logs], label=label)
        lr_axis.plot(steps, [entry["learning_rate"] for entry in logs], label=label)
    loss_axis.set(xlabel="optimizer step", ylabel="training loss", title="training loss")
    lr_axis.set(xlabel="optimizer step", ylabel="learning rate used", yscale="log", title="learning rate")
    for axis in (loss_axis, lr_axis):
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _print_summary(console: Console, settings: DemoSettings, summary: dict[str, float], events: list[Any],
                   output_dir: Path) -> None:
    table = Table(title=f"hf_r8 demo: {settings.steps} steps, held-out loss")
    for column in ("run", "eval loss", "perplexity", "train time"):
        table.add_column(column, justify="right" if column != "run" else "left")
    runs = [("cosine (stock Trainer)", "cosine")] if settings.compare else []
    for label, key in [*runs, (f"hf_r8 ({settings.preset})", "r8")]:
        loss = summary[f"{key}_eval_loss"]
        table.add_row(label, f"{loss:.4f}", f"{math.exp(min(loss, 50.0)):.2f}", f"{summary[f'{key}_seconds']:.1f} s")
    console.print(table)
    decisions = [event for event in events if event.group in (0, -1) and event.action != "plan"]
    kinds = Counter(event.action for event in decisions)
    counted = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "none"
    console.print(f"decisions (group 0): {counted};"
                  f" final LR gain {summary['final_lr_gain']:.3f}; {summary['skipped_steps']:.0f} skipped steps,"
                  f" {summary['rollbacks']:.0f} rollbacks")
    for event in decisions[-5:]:
        console.print(f"  step {event.step:4d}  {event.action:10s} gain {event.old_value:.3g} -> {event.new_value:.3g}"
                      f"  ({event.reason})")
    report = output_dir / RUN_DIR / REPORT_DIR
    plots = sorted(path.name for path in report.glob("*.png")) if report.is_dir() else []
    console.print(f"report: {report}/ ({', '.join(plots)}, summary.md); "
                  f"every decision: {output_dir / RUN_DIR / EVENTS_FILE}")
