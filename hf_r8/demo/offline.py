"""Real English text, a tokenizer and a small GPT-2 that need no download; a fast Hub check.

The demo, the tests and the benchmarks run where the Hub cannot be reached. The text is the
Python reference documentation every CPython ships (`pydoc_data.topics`, ~65k words), for the demo
followed by the docstrings of the standard library (~250k words more); the tokenizer is a byte-level
BPE trained on it locally; the model is GPT-2 built from a config with random weights.
`load_hub_or_offline` keeps the real Hub path for users who have internet and falls back to these
when the Hub is unreachable, in seconds: `hub_reachable` asks for a TCP connection (no retries), and
an unreachable Hub is put in offline mode so that only cached files are tried.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import socket
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import huggingface_hub.constants
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"


def _cache_dir() -> Path:
    return Path(os.environ.get("HF_R8_CACHE", Path.home() / ".cache" / "hf_r8"))


def _write_atomically(path: Path, write: Any) -> None:
    """`write(temporary_path)` then rename, so concurrent processes never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    write(temporary)
    temporary.replace(path)


def _paragraphs(text: str) -> list[str]:
    blocks = (" ".join(block.split()) for block in re.split(r"\n\s*\n", text))
    return [block for block in blocks if len(block) > 40]


def english_paragraphs(include_docstrings: bool = False) -> list[str]:
    """Paragraphs of the Python reference documentation, in a fixed order; with `include_docstrings`,
    followed by those of `stdlib_docstrings()`."""
    from pydoc_data.topics import topics

    paragraphs = [paragraph for name in sorted(topics) for paragraph in _paragraphs(topics[name])]
    return paragraphs + stdlib_docstrings() if include_docstrings else paragraphs


def stdlib_docstrings() -> list[str]:
    """Paragraphs of the docstrings of the standard library's modules, classes and functions, read
    from the sources with `ast` (nothing is imported; tests and IDLE left out), in a fixed order.

    The same on every installation of a Python version. Parsing takes ~10 s, so the paragraphs are
    cached under $HF_R8_CACHE (default ~/.cache/hf_r8).
    """
    path = _cache_dir() / f"stdlib-docstrings-py{sys.version_info.major}{sys.version_info.minor}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "test", "tests", "idlelib"}
    paragraphs: list[str] = []
    for source in sorted(root.rglob("*.py")):
        if skipped.intersection(source.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    paragraphs.extend(_paragraphs(docstring))
    _write_atomically(path, lambda temporary: temporary.write_text(json.dumps(paragraphs), encoding="utf-8"))
    return paragraphs


def build_tokenizer(vocab_size: int = 2048, include_docstrings: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `english_paragraphs(include_docstrings)`; pad token = end-of-text, as
    for GPT-2.

    Training takes ~10 s on one core, so the result is cached as JSON under $HF_R8_CACHE
    (default ~/.cache/hf_r8), keyed by vocabulary size, corpus and Python version.
    """
    corpus = "-docstrings" if include_docstrings else ""
    path = _cache_dir() / f"bpe-{vocab_size}{corpus}-py{sys.version_info.major}{sys.version_info.minor}.json"
    if path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(english_paragraphs(include_docstrings), trainer=trainer)
        _write_atomically(path, lambda temporary: tokenizer.save(str(temporary)))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT, unk_token=END_OF_TEXT)


def language_modeling_dataset(tokenizer: PreTrainedTokenizerFast, seq_len: int = 64,
                              max_examples: int | None = None, texts: list[str] | None = None) -> Dataset:
    """`texts` (default `english_paragraphs()`) tokenized, each followed by end-of-text, concatenated
    and cut into `seq_len` blocks with `labels = input_ids`. The blocks are packed, never padded: the
    attention mask is all ones (given, so GPT-2 does not warn that its input may be padded)."""
    ids: list[int] = []
    encoded = tokenizer(texts if texts is not None else english_paragraphs())["input_ids"]
    for paragraph in encoded:
        ids.extend(paragraph)
        ids.append(tokenizer.eos_token_id)
    blocks = [ids[start:start + seq_len] for start in range(0, len(ids) - seq_len + 1, seq_len)]
    if max_examples is not None:
        blocks = blocks[:max_examples]
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * seq_len for _ in blocks],
                              "labels": blocks})


def tiny_gpt2(vocab_size: int, n_embd: int = 64, n_layer: int = 2, n_head: int = 2, n_positions: int = 128,
              seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 small enough for a CPU test (about 0.2M parameters by default)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        n_positions=n_positions, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    # transformers cannot infer the loss type from the name "GPT2LMHeadModel"; without it the Trainer
    # counts num_items_in_batch without the causal shift and scales the loss by (T-1)/T.
    model.loss_type = "ForCausalLM"
    return model


def tiny_mixtral(vocab_size: int, hidden_size: int = 32, num_hidden_layers: int = 2, num_local_experts: int = 4,
                 output_router_logits: bool = False, seed: int = 0) -> MixtralForCausalLM:
    """A randomly initialised Mixtral (top-2 of `num_local_experts` experts) small enough for a CPU test.

    `output_router_logits=True` makes it return (and add to its loss) the router load-balancing loss.
    """
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                            intermediate_size=2 * hidden_size, num_hidden_layers=num_hidden_layers,
                                            num_attention_heads=2, num_key_value_heads=2,
                                            num_local_experts=num_local_experts, num_experts_per_tok=2,
                                            bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                            output_router_logits=output_router_logits))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub can be asked for files: False at once under HF_HUB_OFFLINE=1; otherwise whether a
    TCP connection to its endpoint opens within `timeout` seconds (behind an HTTP(S) proxy, assumed)."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub (so transformers) and datasets in offline mode within the block: files already
    in the cache load, nothing is requested (no retries against an unreachable Hub)."""
    import datasets.config

    saved = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


@contextmanager
def hub_or_cache(reachable: bool) -> Iterator[None]:
    """The Hub as configured when `reachable`, else `hub_offline()`."""
    if reachable:
        yield
    else:
        with hub_offline():
            yield


def load_causal_lm(name_or_path: str) -> tuple[Any, Any]:
    """`AutoModelForCausalLM` and its tokenizer, ready for the Trainer: a pad token (end-of-text when the
    tokenizer has none) and `loss_type="ForCausalLM"` when transformers cannot infer it from the class
    name (GPT-2): without it the Trainer counts the labels for `num_items_in_batch` without the causal
    shift, scaling the loss by (T-1)/T."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model, tokenizer


def load_hub_or_offline(model_name: str | None, vocab_size: int = 2048,
                        ) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, str]:
    """`model_name` from the Hub (or the local cache when the Hub is unreachable); otherwise the offline
    tokenizer and a tiny GPT-2.

    Returns (model, tokenizer, source) where source says which one was used.
    """
    if model_name:
        try:
            with hub_or_cache(hub_reachable()):
                model, tokenizer = load_causal_lm(model_name)
        except OSError as error:
            logger.warning("Could not load %r from the Hub or the cache (%s); using the offline tiny GPT-2.",
                           model_name, type(error).__name__)
        else:
            return model, tokenizer, f"hub:{model_name}"
    tokenizer = build_tokenizer(vocab_size)
    return tiny_gpt2(len(tokenizer)), tokenizer, "offline:tiny-gpt2"
