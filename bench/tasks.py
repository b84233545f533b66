"""The benchmark tasks: a causal LM and a classifier, each with a fixed held-out split.

Both build their model from a seed, so every method starts from the same weights for a seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset

from hf_r8.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2


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


def causal_lm(quick: bool) -> Task:
    """Tiny GPT-2 (random init) on the Python reference docs; 64 held-out blocks."""
    tokenizer = build_tokenizer(512 if quick else 2048)
    seq_len, width, layers = (32, 32, 1) if quick else (64, 64, 2)
    blocks = language_modeling_dataset(tokenizer, seq_len=seq_len, max_examples=1088 if quick else None)
    split = blocks.train_test_split(test_size=64, seed=0)

    def make_model(seed: int) -> torch.nn.Module:
        return tiny_gpt2(len(tokenizer), n_embd=width, n_layer=layers, n_head=2, n_positions=seq_len, seed=seed)

    steps = 150 if quick else 600
    return Task("causal_lm", split["train"], split["test"], make_model, steps, 16,
                f"GPT-2 {layers} layer(s) x {width} wide, vocab {len(tokenizer)}, {seq_len}-token blocks, "
                f"{len(split['train'])} train / {len(split['test'])} held-out, {steps} steps of 16")


class DigitsMLP(torch.nn.Module):
    """inputs (64 for digits) -> hidden -> 10 classifier returning a Trainer-style {"loss", "logits"}."""

    def __init__(self, hidden: int, inputs: int = 64) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))

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

    steps = 150 if quick else 600
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

    steps = 150 if quick else 600
    return Task("synthetic", train, held_out, make_model, steps, 32,
                f"MLP 32-{hidden}-10 on make_classification, {len(train)} train / {len(held_out)} held-out, "
                f"{steps} steps of 32")


TASKS = {"causal_lm": causal_lm, "digits": digits}
