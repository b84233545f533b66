"""Exploration dither and reversible freezing: noise statistics, determinism, the freeze/unfreeze cycle
on a real Trainer, frozen tensors untouched, and the same on two DDP processes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_r8 import R8Callback, R8Config
from hf_r8.control.config import ExplorationConfig, FreezingConfig, RollbackConfig
from hf_r8.runtime.dither import Dither
from hf_r8.runtime.freezing import FreezePolicy
from tests.dither_freezing_models import QUIET_PREFIX, ReviveAt, model_with_a_silenceable_block
from tests.faults import LearningRateBlast
from tests.test_distributed import run_two_ranks
from tests.test_rollback import RestoreProbe
from tests.trainer_setup import training_args


@pytest.mark.parametrize("shaping", ["rms", "magnitude"])
def test_noise_has_the_law_and_shape_asked_for(shaping):
    torch.manual_seed(0)
    parameter = torch.randn(400, 500) * 0.3
    parameter[:10] = 0.0
    before = parameter.clone()
    sigma = 1e-2
    Dither(ExplorationConfig(enabled=True, shaping=shaping)).apply([parameter], sigma, step=7)
    change = parameter - before
    if shaping == "rms":
        scale = sigma * before.pow(2).mean().sqrt()
        standardized = change / scale
    else:
        assert torch.all(change[:10] == 0)  # zeros stay zeros: the noise is proportional to |theta|
        standardized = change[10:] / (sigma * before[10:].abs())
    assert abs(standardized.mean().item()) < 0.01
    assert standardized.std().item() == pytest.approx(1.0, abs=0.01)


def test_noise_depends_only_on_seed_and_step():
    def noise(seed: int, step: int) -> torch.Tensor:
        parameter = torch.ones(1000)
        Dither(ExplorationConfig(enabled=True, seed=seed)).apply([parameter], 1e-2, step)
        return parameter

    assert torch.equal(noise(0, 5), noise(0, 5))
    assert not torch.equal(noise(0, 5), noise(0, 6)) and not torch.equal(noise(0, 5), noise(1, 5))


def test_policy_freezes_after_patience_unfreezes_on_probe_and_keeps_a_cap():
    config = FreezingConfig(enabled=True, check_every=10, patience_steps=30, probe_every=50, threshold=0.01,
                            revive_threshold=0.05, max_frozen_fraction=0.5)
    policy = FreezePolicy(config, ["a", "b", "quiet"], [100, 100, 100])
    events = []
    for step in range(10, 50, 10):
        events += policy.observe(step, [1.0, 1.2, 1e-5])
    assert [(event.action, event.step) for event in events] == [("freeze", 30)]
    assert policy.frozen_fraction == pytest.approx(1 / 3)
    assert policy.observe(50, [1.0, 1.2, 0.01]) == []  # probed, still below revive_threshold x median
    revived = policy.observe(100, [1.0, 1.2, 0.5])
    assert [event.action for event in revived] == ["unfreeze"] and policy.frozen_fraction == 0.0
    crowded = FreezePolicy(config, ["a", "b", "c", "d"], [10, 10, 10, 70])
    for step in range(10, 100, 10):
        crowded.observe(step, [1.0, 1.1, 1e-5, 1e-6])
    assert [state.frozen for state in crowded.tensors] == [False, False, True, False]  # d: over the 50% cap


def test_a_non_finite_gradient_norm_counts_as_not_measured():
    policy = FreezePolicy(FreezingConfig(enabled=True, check_every=10, patience_steps=20), ["a", "b", "c"],
                          [10, 10, 10])
    policy.observe(10, [1.0, 1.0, 1e-6])
    policy.observe(20, [math.inf, math.nan, 1e-6])  # an fp16 overflow step the grad scaler skips
    policy.observe(30, [1.0, 1.0, 1e-6])
    assert all(math.isfinite(state.ema) for state in policy.tensors)
    assert [state.frozen for state in policy.tensors] == [False, False, True]


def _freezing_config(**exploration) -> R8Config:
    config = R8Config.from_preset("default")
    config.dashboard = config.run_files = config.report = False
    config.freezing = FreezingConfig(enabled=True, check_every=5, patience_steps=10, probe_every=20)
    if exploration:
        config.exploration = ExplorationConfig(enabled=True, **exploration)
    return config


@pytest.mark.integration
def test_a_quiet_block_is_frozen_untouched_then_unfrozen_when_it_revives(tokenizer, lm_dataset, tmp_path):
    model, scale = model_with_a_silenceable_block(len(tokenizer))
    watch = ReviveAt(model, scale, step=30)
    r8 = R8Callback(_freezing_config())
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=5, report_to=[], save_strategy="no",
                             disable_tqdm=True, use_cpu=True, seed=0)
    Trainer(model=model, args=args, train_dataset=lm_dataset, callbacks=[r8, watch]).train()

    freezes = [event for event in r8.events if event.action == "freeze"]
    unfreezes = [event for event in r8.events if event.action == "unfreeze"]
    assert freezes and {event.reason.split(":")[0] for event in freezes} <= {
        name for name, _ in model.named_parameters() if name.startswith(QUIET_PREFIX)}
    assert all(event.step == 40 for event in unfreezes) and unfreezes  # the first probe after the revival
    frozen_from, unfrozen_at = max(event.step for event in freezes), unfreezes[0].step
    # Between the last freeze and the unfreeze: no gradient computed, no update (AdamW decay included).
    after = watch.weights  # after[i]: the weights after step i + 1
    for step in range(frozen_from + 1, unfrozen_at):
        assert all(torch.equal(after[step - 2][name], after[step - 1][name]) for name in watch.quiet)
        assert not watch.requires_grad[step - 1]  # also after a probe step: its gradient was measured, then dropped
    assert all(watch.requires_grad[unfrozen_at - 1:])
    assert all(not torch.equal(after[unfrozen_at - 2][name], after[-1][name]) for name in watch.quiet)  # training
    assert all(p.requires_grad for p in model.parameters())  # the user's model is fully trainable after train()
    logged = [entry["r8/frozen_fraction"] for entry in r8._run.trainer.state.log_history
              if "r8/frozen_fraction" in entry]
    assert max(logged) > 0 and logged[-1] == 0.0


@pytest.mark.integration
def test_freezing_state_comes_back_on_resume(tokenizer, lm_dataset, tmp_path):
    def run(max_steps: int, resume: bool) -> R8Callback:
        model, _ = model_with_a_silenceable_block(len(tokenizer))
        r8 = R8Callback(_freezing_config())
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                                 learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=25,
                                 disable_tqdm=True, use_cpu=True, seed=0)
        Trainer(model=model, args=args, train_dataset=lm_dataset, callbacks=[r8]).train(
            resume_from_checkpoint=resume or None)
        return r8

    first = run(25, resume=False)
    assert first._run.actions.freezer.frozen_fraction > 0
    resumed = run(30, resume=True)
    resumed_freezer, first_freezer = resumed._run.actions.freezer, first._run.actions.freezer
    assert resumed_freezer.policy.state_dict().keys() == first_freezer.policy.state_dict().keys()
    assert resumed_freezer.frozen_fraction > 0  # still frozen after the resume: no re-learning from scratch


@pytest.mark.integration
def test_a_rollback_restores_tensors_frozen_since_the_snapshot_and_the_frozen_set(tokenizer, lm_dataset, tmp_path):
    config = _freezing_config()
    config.freezing.patience_steps = 35  # the quiet block freezes at step 35, after the last snapshot (step 34)
    config.rollback = RollbackConfig(every_steps=10, healthy_steps=5, window=20, min_history=10)
    model, _ = model_with_a_silenceable_block(len(tokenizer))
    r8 = R8Callback(config)
    probe = RestoreProbe(r8)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=60, per_device_train_batch_size=8,
                                                      learning_rate=3e-3, logging_steps=10),
                      train_dataset=lm_dataset, callbacks=[r8, LearningRateBlast(), probe])
    trainer.train()
    assert trainer.state.global_step == 60 and r8.rollback_counts["rollbacks"] == 1 and probe.compared == 1
    rollback_step = next(event.step for event in r8.events if event.action == "cut")
    quiet = {name for name, _ in model.named_parameters() if name.startswith(QUIET_PREFIX)}
    assert quiet <= set(r8._run.rollback.snapshots[-1]._model)  # trainable at the start: in every snapshot
    freeze_steps = sorted({event.step for event in r8.events if event.action == "freeze"})
    # Frozen on the discarded trajectory, unfrozen by the rollback, frozen again by the restored patience count.
    assert freeze_steps[0] < rollback_step < freeze_steps[1]


class RaiseAt(TrainerCallback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


@pytest.mark.integration
def test_a_run_that_raised_leaves_no_tensor_frozen_for_the_next_one(tokenizer, lm_dataset, tmp_path):
    model, scale = model_with_a_silenceable_block(len(tokenizer))
    quiet = {name: param for name, param in model.named_parameters() if name.startswith(QUIET_PREFIX)}
    r8, failure = R8Callback(_freezing_config()), RaiseAt(18)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=30, logging_steps=10),
                      train_dataset=lm_dataset, callbacks=[r8, failure])
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer.train()
    assert any(event.rule == "freezing" and event.new_value > 0 for event in r8.events), "nothing was frozen"
    assert all(param.requires_grad for param in quiet.values()), "released where the exception left train()"
    failure.step, scale[0] = None, 1.0  # the next run, where the block's gradient is back
    before = {name: param.detach().clone() for name, param in quiet.items()}
    trainer.train()
    assert set(quiet) <= set(r8._run.actions.freezer.names) and all(param.requires_grad for param in quiet.values())
    assert all(not torch.equal(before[name], param) for name, param in quiet.items())


class Fp16Overflow(TrainerCallback):
    """An fp16 overflow at `step` as R8 meets it (no GPU here, so no real grad scaler): every gradient is inf,
    the loss finite, the Trainer's accelerator has a grad scaler, and the step is not applied (the callback
    placed after R8 drops the gradients, as `GradScaler.step` does when it finds an inf)."""

    def __init__(self, trainer: Trainer, step: int) -> None:
        self.trainer, self.step, self.overflowing = trainer, step, [False]
        for param in trainer.model.parameters():
            param.register_hook(lambda grad: torch.full_like(grad, math.inf) if self.overflowing[0] else grad)

    def on_step_begin(self, args, state, control, **kwargs):
        self.overflowing[0] = state.global_step + 1 == self.step
        self.trainer.accelerator.scaler = torch.amp.GradScaler("cpu") if self.overflowing[0] else None


class ScalerSkips(TrainerCallback):
    def __init__(self, overflow: Fp16Overflow) -> None:
        self.overflow, self.unchanged = overflow, None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.overflow.overflowing[0]:
            self.weights = [param.detach().clone() for param in self.overflow.trainer.model.parameters()]
            optimizer.zero_grad(set_to_none=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.overflow.overflowing[0]:
            self.unchanged = all(torch.equal(before, param) for before, param in
                                 zip(self.weights, self.overflow.trainer.model.parameters(), strict=True))


@pytest.mark.integration
def test_an_fp16_overflow_step_gets_no_dither_and_leaves_the_freezer_finite(tokenizer, lm_dataset, tmp_path):
    model, _ = model_with_a_silenceable_block(len(tokenizer))
    r8 = R8Callback(_freezing_config(sigma_init=1e-3))
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=30, logging_steps=10),
                      train_dataset=lm_dataset)
    overflow = Fp16Overflow(trainer, step=10)  # a check step of the freezer, past warmup
    skips = ScalerSkips(overflow)
    for callback in (overflow, r8, skips):  # R8 between the overflow and the scaler's skip
        trainer.add_callback(callback)
    trainer.train()
    assert skips.unchanged  # no noise on the weights of a step that was not applied
    assert all(math.isfinite(state.ema) for state in r8._run.actions.freezer.policy.tensors)
    assert not any(event.action == "skip_step" for event in r8.events)  # the scaler's skip, not R8's
    assert any(event.action == "freeze" for event in r8.events)


@pytest.mark.integration
def test_dither_moves_the_weights_by_sigma_after_warmup(tokenizer, lm_dataset, tmp_path):
    def final_weights(config: R8Config) -> torch.Tensor:
        model, _ = model_with_a_silenceable_block(len(tokenizer))
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                                 learning_rate=1e-3, warmup_steps=4, report_to=[], save_strategy="no",
                                 disable_tqdm=True, use_cpu=True, seed=0, logging_steps=4)
        trainer = Trainer(model=model, args=args, train_dataset=lm_dataset, callbacks=[R8Callback(config)])
        trainer.train()
        assert ("r8/sigma" in trainer.state.log_history[-2]) == config.exploration.enabled
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    plain = R8Config.from_preset("default")
    plain.dashboard = plain.run_files = plain.report = False
    dithered = _freezing_config(sigma_init=1e-3)
    dithered.freezing.enabled = False
    difference = final_weights(dithered) - final_weights(plain)
    assert difference.abs().max() > 0
    # 8 steps of noise with sigma 1e-3 x rms: small against the weights, not zero, and not a blow-up.
    assert difference.pow(2).mean().sqrt() < 0.05


@pytest.mark.integration
def test_two_processes_dither_and_freeze_identically_without_ddp_errors(tmp_path):
    run_two_ranks("two_rank_dither_freezing.py", tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["parameter_digests"] == rank1["parameter_digests"]  # the noise kept the replicas equal
    assert rank0["frozen"] == rank1["frozen"] and any(rank0["frozen"])
    assert rank0["quiet_block_unchanged_while_frozen"] and rank1["quiet_block_unchanged_while_frozen"]


@pytest.mark.integration
def test_freezing_on_a_lora_model_only_touches_the_adapters(tokenizer, lm_dataset, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, _ = model_with_a_silenceable_block(len(tokenizer))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    frozen_base = [p for name, p in model.named_parameters() if not p.requires_grad]
    config = _freezing_config(sigma_init=1e-3)
    config.freezing.threshold, config.freezing.revive_threshold = 0.5, 0.9  # freeze the quieter half
    r8 = R8Callback(config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True)
    Trainer(model=model, args=args, train_dataset=lm_dataset, callbacks=[r8]).train()
    assert all("lora_" in name for name in r8._run.actions.freezer.names)
    assert any(event.action == "freeze" for event in r8.events)
    assert not any(p.requires_grad for p in frozen_base)  # the base model stays the user's frozen base
