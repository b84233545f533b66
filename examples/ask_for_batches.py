"""hf_r8 in an "ask for the next batch" loop: `R8Loop` picks each batch's examples and its LR. Offline.

    python examples/ask_for_batches.py [--epochs 3] [--preset default] [--model gpt2]

A tiny GPT-2 on the Python docs. The first epoch visits every block once and catalogs its loss; later
epochs draw every batch evenly from the four loss quartiles. Each example's own loss goes back with
`loop.report(...)`; rollback restores what `save()` returned (weights and optimizer state, in RAM) when a
NaN or repeated spikes show up.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from hf_r8 import R8Config, R8Loop
from hf_r8.demo.offline import language_modeling_dataset, load_hub_or_offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=512, help="blocks of 64 tokens to train on")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--model", default=None, help="a Hub causal LM (default: the offline tiny GPT-2)")
    options = parser.parse_args()

    model, tokenizer, source = load_hub_or_offline(options.model)
    print(f"model: {source}")
    blocks = torch.tensor(language_modeling_dataset(tokenizer, seq_len=64, max_examples=options.examples)["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def save() -> dict:
        return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}

    def load(state: dict) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    config = R8Config.from_preset(options.preset)
    with R8Loop(len(blocks), batch_size=16, config=config, base_lr=1e-3, num_epochs=options.epochs, save=save,
                load=load, dashboard=False) as loop:
        for epoch in loop.epochs():
            for indices, lr in loop.batches():
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = blocks[torch.from_numpy(indices)]
                logits = model(input_ids=batch).logits[:, :-1]
                token_losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
                losses = token_losses.mean(dim=1)  # each example's own loss
                losses.mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loop.report(losses.mean().detach(), per_example_losses=losses.detach())
            edges = loop.catalog.quartile_edges()
            print(f"epoch {epoch}: step {loop.step}, LR {lr:.3g}, catalog quartile edges "
                  f"{[round(float(edge), 3) for edge in edges] if edges is not None else None}")
    for event in loop.events:
        if event.group <= 0 and event.rule != "sampler":
            print(f"step {event.step:4d}  {event.rule}/{event.action}: {event.reason}")
    print(f"every example cataloged: {bool(loop.catalog.seen.all())}; final LR gain {loop.controller.lr_gain(0):.3f}")


if __name__ == "__main__":
    main()
