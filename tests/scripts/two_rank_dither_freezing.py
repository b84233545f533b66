"""Run under `torchrun --nproc_per_node 2`: dither and freezing in a real 2-process DDP Trainer (gloo on CPU).

Each rank writes OUTPUT_DIR/rank<k>.json with a digest of all parameters after every step, the frozen
state of every tensor, and whether the silenced block stayed unchanged while frozen.
"""

from __future__ import annotations

import faulthandler
import hashlib
import sys

import torch
from rank_result import write_rank_result
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_r8 import R8Callback, R8Config
from hf_r8.control.config import ExplorationConfig, FreezingConfig
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset
from tests.dither_freezing_models import ReviveAt, model_with_a_silenceable_block


class ParameterDigests(TrainerCallback):
    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.digests = model, []

    def on_step_end(self, args, state, control, **kwargs):
        digest = hashlib.sha256()
        for parameter in self.model.parameters():
            digest.update(parameter.detach().numpy().tobytes())
        self.digests.append(digest.hexdigest())


def main(output_dir: str) -> None:
    tokenizer = build_tokenizer(512)
    dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=256)
    model, scale = model_with_a_silenceable_block(len(tokenizer))
    config = R8Config.from_preset("default")
    config.dashboard = config.run_files = config.report = False
    config.exploration = ExplorationConfig(enabled=True, sigma_init=1e-3)
    config.freezing = FreezingConfig(enabled=True, check_every=5, patience_steps=10, probe_every=20)
    r8, digests, watch = R8Callback(config), ParameterDigests(model), ReviveAt(model, scale, step=10_000)
    args = TrainingArguments(output_dir=output_dir, max_steps=30, per_device_train_batch_size=4, learning_rate=1e-3,
                             warmup_steps=2, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                             ddp_find_unused_parameters=False, seed=0)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[r8, digests, watch]).train()
    frozen_at = min(event.step for event in r8.events if event.action == "freeze")
    unchanged = all(torch.equal(watch.weights[frozen_at - 1][name], watch.weights[-1][name]) for name in watch.quiet)
    freezer = r8._run.actions.freezer
    result = {"parameter_digests": digests.digests, "frozen": [state.frozen for state in freezer.policy.tensors],
              "quiet_block_unchanged_while_frozen": unchanged}
    write_rank_result(output_dir, result)


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)  # a hang prints where it is stuck instead of timing out silently
    main(sys.argv[1])
