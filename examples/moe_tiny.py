"""R8Trainer on a mixture-of-experts model: the routers get parameter groups and gentler LR control. Offline.

    python examples/moe_tiny.py [--steps 150] [--preset moe] [--model NAME]
        [--output-dir outputs/example_moe]

R8Trainer sees a model whose config declares several experts and splits the router (`gate`) parameters
into optimizer groups of their own; the `moe` preset keeps a router group's LR gain within tighter
bounds and moves it more gently. With `output_router_logits=True` the model adds its router
load-balancing loss to the loss and returns it; R8 tracks it (`r8/router_aux_loss_ema`) and damps the
routers when routing gets less balanced. By default the model is a tiny random Mixtral (4 experts,
top-2); `--model` loads a Hub mixture-of-experts model instead (the tiny Mixtral when unreachable).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_r8 import R8Config, R8Trainer
from hf_r8.demo.offline import language_modeling_dataset, load_hub_or_offline, tiny_mixtral
from hf_r8.runtime.moe import is_moe_model


class GroupGains(TrainerCallback):
    """Each optimizer step's LR gain per parameter group: the LR used over the schedule's LR.

    Passed before R8's callback, so it reads the schedule's LR before R8 writes its own, and the LR used
    before R8 gives the schedule its value back."""

    def __init__(self) -> None:
        self.schedule: list[float] = []
        self.gains: list[list[float]] = []

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        self.schedule = [group["lr"] for group in optimizer.param_groups]

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        used = [group["lr"] for group in optimizer.param_groups]
        self.gains.append([lr / schedule if schedule else 1.0
                           for lr, schedule in zip(used, self.schedule, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--preset", default="moe")
    parser.add_argument("--model", default=None, help="a mixture-of-experts Hub model (default: a tiny Mixtral)")
    parser.add_argument("--output-dir", default="outputs/example_moe")
    options = parser.parse_args()

    model, tokenizer, source = load_hub_or_offline(options.model)
    if source.startswith("offline"):  # the offline fallback is a dense GPT-2: a tiny Mixtral on its tokenizer
        model, source = tiny_mixtral(len(tokenizer), output_router_logits=True), "offline:tiny-mixtral"
    elif not is_moe_model(model):
        parser.error(f"--model {options.model}: not a mixture-of-experts model")
    model.config.output_router_logits = True
    print(f"model: {source}")
    dataset = language_modeling_dataset(tokenizer, seq_len=64)
    args = TrainingArguments(output_dir=options.output_dir, max_steps=options.steps, learning_rate=3e-3,
                             per_device_train_batch_size=16, lr_scheduler_type="cosine", warmup_steps=10,
                             logging_steps=10, report_to=[], save_strategy="no",
                             use_cpu=not torch.cuda.is_available())
    gains = GroupGains()
    trainer = R8Trainer(model=model, args=args, train_dataset=dataset, callbacks=[gains],
                        r8=R8Config.from_preset(options.preset))
    trainer.train()

    controller, names = trainer.r8_callback.controller, {id(p): n for n, p in model.named_parameters()}
    for index, group in enumerate(trainer.optimizer.param_groups):
        kind = "router" if controller.specs[index].is_router else "rest"
        example = names[id(group["params"][0])]
        low, high = controller.gain_bounds[index]
        used = [step[index] for step in gains.gains]
        print(f"group {index} ({kind:6s}): {len(group['params']):2d} tensors (e.g. {example}), "
              f"gain bounds [{low:.2f}, {high:.2f}], gain used {min(used):.3f}..{max(used):.3f}")
    routers = [index for index, spec in enumerate(controller.specs) if spec.is_router]
    for event in trainer.r8_callback.events:
        if event.group <= 0 or event.group in routers:  # the other groups decide as group 0 does
            print(f"step {event.step:4d}  group {event.group:2d}  {event.rule}/{event.action}: {event.reason}")
    within = bool(routers) and all(controller.gain_bounds[i][0] - 1e-9 <= step[i] <= controller.gain_bounds[i][1] + 1e-9
                 for step in gains.gains for i in routers)
    aux = [log["r8/router_aux_loss_ema"] for log in trainer.state.log_history if "r8/router_aux_loss_ema" in log]
    aux_text = f"{aux[0]:.4f} -> {aux[-1]:.4f}" if aux else "not logged"
    print(f"router groups {routers}: LR gain within bounds at every step: {within}; "
          f"router aux loss EMA {aux_text}; final train loss {trainer.state.log_history[-1]['train_loss']:.3f}")


if __name__ == "__main__":
    main()
