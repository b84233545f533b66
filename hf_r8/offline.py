"""Real English text, a tokenizer and a small GPT-2 that need no download.

The demo, the tests and the benchmarks run where the Hub cannot be reached. The text is the
Python reference documentation every CPython ships (`pydoc_data.topics`, ~65k words); the
tokenizer is a byte-level BPE trained on it in about a second; the model is GPT-2 built from a
config with random weights. `load_hub_or_offline` keeps the real Hub path for users who have
internet and falls back to these when the Hub is unreachable (at once under HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"


def english_paragraphs() -> list[str]:
    """Paragraphs of the Python reference documentation, in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(block.split())
            if len(text) > 40:
                paragraphs.append(text)
    return paragraphs


def build_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `english_paragraphs()`; pad token = end-of-text, as for GPT-2.

    Training takes ~10 s on one core, so the result is cached as JSON under $HF_R8_CACHE
    (default ~/.cache/hf_r8), keyed by vocabulary size and Python version (the corpus).
    """
    cache = Path(os.environ.get("HF_R8_CACHE", Path.home() / ".cache" / "hf_r8"))
    path = cache / f"bpe-{vocab_size}-py{sys.version_info.major}{sys.version_info.minor}.json"
    if path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(english_paragraphs(), trainer=trainer)
        cache.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        tokenizer.save(str(temporary))
        temporary.replace(path)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT, unk_token=END_OF_TEXT)


def language_modeling_dataset(tokenizer: PreTrainedTokenizerFast, seq_len: int = 64,
                              max_examples: int | None = None) -> Dataset:
    """The corpus tokenized, concatenated and cut into `seq_len` blocks with `labels = input_ids`."""
    ids: list[int] = []
    for paragraph in english_paragraphs():
        ids.extend(tokenizer(paragraph)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    blocks = [ids[start:start + seq_len] for start in range(0, len(ids) - seq_len + 1, seq_len)]
    if max_examples is not None:
        blocks = blocks[:max_examples]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


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


def load_hub_or_offline(model_name: str | None, vocab_size: int = 2048,
                        ) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, str]:
    """`model_name` from the Hub when reachable; otherwise the offline tokenizer and a tiny GPT-2.

    Returns (model, tokenizer, source) where source says which one was used.
    """
    if model_name:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_name)
            model = AutoModelForCausalLM.from_pretrained(model_name)
        except OSError as error:
            logger.warning("Could not load %r from the Hub (%s); using the offline tiny GPT-2.", model_name,
                           type(error).__name__)
        else:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return model, tokenizer, f"hub:{model_name}"
    tokenizer = build_tokenizer(vocab_size)
    return tiny_gpt2(len(tokenizer)), tokenizer, "offline:tiny-gpt2"
