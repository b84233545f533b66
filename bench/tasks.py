"""The benchmark tasks: a causal LM, two classifiers and a fine-tuning run, each with a fixed held-out split.

Each builds its model from a seed, so every method starts from the same weights for a seed (the
fine-tuning task from the same pre-trained weights for every seed: the seed orders its data).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from hf_r8.demo.offline import (
    build_tokenizer,
    english_paragraphs,
    language_modeling_dataset,
    stdlib_docstrings,
    tiny_gpt2,
)


@dataclass
class Task:
    """One benchmark task."""

    name: str
    train: Dataset
    eval: Dataset
    make_model: Callable[[int], torch.nn.Module]
    steps: int
    batch_size: int
    description: str
    forgetting_eval: Dataset | None = None
    """Held-out data of what the model knew before this task (fine-tuning): its final loss measures forgetting."""


def _steps(quick: bool) -> int:
    """The step budget: 150 (quick) or 600, or BENCH_STEPS when set (the quick grid at another budget)."""
    return int(os.environ.get("BENCH_STEPS", 150 if quick else 600))


def causal_lm(quick: bool) -> Task:
    """Tiny GPT-2 (random init) on the Python reference docs; 64 held-out blocks."""
    tokenizer = build_tokenizer(512 if quick else 2048)
    seq_len, width, layers = (32, 32, 1) if quick else (64, 64, 2)
    blocks = language_modeling_dataset(tokenizer, seq_len=seq_len, max_examples=1088 if quick else None)
    split = blocks.train_test_split(test_size=64, seed=0)

    def make_model(seed: int) -> torch.nn.Module:
        return tiny_gpt2(len(tokenizer), n_embd=width, n_layer=layers, n_head=2, n_positions=seq_len, seed=seed)

    steps = _steps(quick)
    return Task("causal_lm", split["train"], split["test"], make_model, steps, 16,
                f"GPT-2 {layers} layer(s) x {width} wide, vocab {len(tokenizer)}, {seq_len}-token blocks, "
                f"{len(split['train'])} train / {len(split['test'])} held-out, {steps} steps of 16")


class DigitsMLP(torch.nn.Module):
    """inputs (64 for digits) -> hidden -> classes classifier returning a Trainer-style {"loss", "logits"}."""

    def __init__(self, hidden: int, inputs: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, classes))

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(pixels)
        output = {"logits": logits}
        if labels is not None:
            output["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return output


def digits(quick: bool) -> Task:
    """scikit-learn's bundled 8x8 digits (1797 images), standardized; 360 held out."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order].astype(np.float32), labels[order]
    mean, std = images[:-360].mean(axis=0), images[:-360].std(axis=0) + 1e-6
    images = (images - mean) / std
    train = Dataset.from_dict({"pixels": images[:-360], "labels": labels[:-360]})
    held_out = Dataset.from_dict({"pixels": images[-360:], "labels": labels[-360:]})
    hidden = 64 if quick else 128

    def make_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return DigitsMLP(hidden)

    steps = _steps(quick)
    return Task("digits", train, held_out, make_model, steps, 32,
                f"MLP 64-{hidden}-10 on sklearn digits, {len(train)} train / {len(held_out)} held-out, "
                f"{steps} steps of 32")


def synthetic_classes(quick: bool) -> Task:
    """scikit-learn's `make_classification`: 10 classes of 2 Gaussian clusters in 32 dimensions.

    10,000 held-out examples, so one held-out example is 0.01 accuracy points: differences between
    data-selection modes are not lost in evaluation noise as they are on digits' 360.
    """
    from sklearn.datasets import make_classification

    features, labels = make_classification(n_samples=20_000, n_features=32, n_informative=16, n_redundant=4,
                                           n_classes=10, n_clusters_per_class=2, class_sep=1.5, random_state=0)
    features = features.astype(np.float32)
    train = Dataset.from_dict({"pixels": features[:10_000], "labels": labels[:10_000]})
    held_out = Dataset.from_dict({"pixels": features[10_000:], "labels": labels[10_000:]})
    hidden = 64 if quick else 128

    def make_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return DigitsMLP(hidden, inputs=32)

    steps = _steps(quick)
    return Task("synthetic", train, held_out, make_model, steps, 32,
                f"MLP 32-{hidden}-10 on make_classification, {len(train)} train / {len(held_out)} held-out, "
                f"{steps} steps of 32")


IMBALANCE = (0.6, 0.2, 0.1, 0.06, 0.04)


def tabular(quick: bool) -> Task:
    """An imbalanced tabular problem: scikit-learn's `make_classification`, 5 classes at 60/20/10/6/4% with 2%
    of the labels flipped, 20 features (8 informative), standardized; a small MLP. Not tuned for: the bench's
    check that what holds on digits is not digits'."""
    from sklearn.datasets import make_classification

    features, labels = make_classification(n_samples=12_000, n_features=20, n_informative=8, n_redundant=4,
                                           n_classes=len(IMBALANCE), n_clusters_per_class=2, weights=list(IMBALANCE),
                                           flip_y=0.02, class_sep=1.0, random_state=0)
    features = features.astype(np.float32)
    mean, std = features[:10_000].mean(axis=0), features[:10_000].std(axis=0) + 1e-6
    features = (features - mean) / std
    train = Dataset.from_dict({"pixels": features[:10_000], "labels": labels[:10_000]})
    held_out = Dataset.from_dict({"pixels": features[10_000:], "labels": labels[10_000:]})
    hidden = 32 if quick else 64

    def make_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return DigitsMLP(hidden, inputs=20, classes=len(IMBALANCE))

    steps = _steps(quick)
    return Task("tabular", train, held_out, make_model, steps, 64,
                f"MLP 20-{hidden}-5 on make_classification, classes at {'/'.join(f'{w:.0%}' for w in IMBALANCE)}, "
                f"2% labels flipped, {len(train)} train / {len(held_out)} held-out, {steps} steps of 64")


_PRETRAIN_STEPS = 1200
_PRETRAIN_LR = 3e-3


def finetune(quick: bool) -> Task:
    """Fine-tuning: a GPT-2 pre-trained here on the standard library's docstrings (trained once, cached on
    disk), fine-tuned on the Python reference docs. Held out: 64 reference-doc blocks (quality) and 64
    docstring blocks (forgetting: how much of the pre-training the fine-tuning undoes)."""
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    tokenizer = build_tokenizer(512 if quick else 2048, include_docstrings=True)
    seq_len, width, layers = (32, 48, 2) if quick else (64, 64, 2)
    docs = language_modeling_dataset(tokenizer, seq_len=seq_len, max_examples=1088 if quick else None,
                                     texts=english_paragraphs())
    docs = docs.train_test_split(test_size=64, seed=0)
    docstrings = language_modeling_dataset(tokenizer, seq_len=seq_len, max_examples=8256 if quick else 40_064,
                                           texts=stdlib_docstrings())
    docstrings = docstrings.train_test_split(test_size=64, seed=0)
    cache = Path(os.environ.get("HF_R8_CACHE", Path.home() / ".cache" / "hf_r8")) / \
        f"bench-pretrained-gpt2-{layers}x{width}-v{len(tokenizer)}-s{seq_len}-{_PRETRAIN_STEPS}"
    if not (cache / "config.json").is_file():
        model = tiny_gpt2(len(tokenizer), n_embd=width, n_layer=layers, n_head=2, n_positions=seq_len, seed=1234)
        args = TrainingArguments(output_dir=str(cache.with_suffix(".run")), max_steps=_PRETRAIN_STEPS,
                                 per_device_train_batch_size=32, learning_rate=_PRETRAIN_LR,
                                 lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0, report_to=[],
                                 save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, log_level="error")
        Trainer(model=model, args=args, train_dataset=docstrings["train"]).train()
        model.save_pretrained(cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)

    def make_model(seed: int) -> torch.nn.Module:
        model = GPT2LMHeadModel.from_pretrained(cache)
        model.loss_type = "ForCausalLM"
        return model

    steps = _steps(quick)
    return Task("finetune", docs["train"], docs["test"], make_model, steps, 16,
                f"GPT-2 {layers} layer(s) x {width} wide, vocab {len(tokenizer)}, {seq_len}-token blocks, pre-trained "
                f"for {_PRETRAIN_STEPS} steps of 32 on {len(docstrings['train'])} stdlib-docstring blocks (cosine, "
                f"lr {_PRETRAIN_LR:g}), fine-tuned on {len(docs['train'])} Python-reference blocks, "
                f"{len(docs['test'])} held out of each corpus; {steps} steps of 16",
                forgetting_eval=docstrings["test"])


TASKS = {"causal_lm": causal_lm, "digits": digits, "finetune": finetune, "tabular": tabular}
