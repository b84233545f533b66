"""hf_r8's controller in a plain PyTorch loop: `AdaptiveScheduler` instead of a Trainer. Offline.

    python examples/plain_torch_loop.py [--steps 200] [--preset default] [--model gpt2]

A tiny GPT-2 on the Python docs, AdamW, and a hand-written loop. `scheduler.step_loss(loss, grad_norm=...)`
hands the step's loss (a tensor: no `.item()`, no device sync) to the same controller R8Callback runs;
it sets the next step's LR and momentum just before `optimizer.step()`.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from hf_r8 import AdaptiveScheduler, R8Config
from hf_r8.demo.offline import language_modeling_dataset, load_hub_or_offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--model", default=None, help="a Hub causal LM (default: the offline tiny GPT-2)")
    options = parser.parse_args()

    model, tokenizer, source = load_hub_or_offline(options.model)
    print(f"model: {source}")
    dataset = language_modeling_dataset(tokenizer, seq_len=64).with_format("torch")
    loader = DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step, model = 0, model.train()
    # Leaving the block removes the scheduler's optimizer hook; its events and controller stay readable.
    with AdaptiveScheduler(optimizer, R8Config.from_preset(options.preset), total_steps=options.steps) as scheduler:
        while step < options.steps:
            for batch in loader:
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step_loss(loss.detach(), grad_norm=grad_norm)
                step += 1
                if step % 50 == 0:
                    print(f"step {step:4d}  loss {loss.item():.3f}  lr {scheduler.get_last_lr()[0]:.3g}")
                if step == options.steps:
                    break
    for event in scheduler.events:
        if event.group == 0:
            print(f"step {event.step:4d}  {event.rule}/{event.action}: gain {event.old_value:.3f} -> "
                  f"{event.new_value:.3f} ({event.reason})")
    print(f"final LR gain {scheduler.controller.lr_gain(0):.3f} after {step} steps")


if __name__ == "__main__":
    main()
