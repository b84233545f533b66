"""R8Trainer / with_r8: the cataloging epoch, balanced batches, exact losses, resume, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Trainer

from hf_r8 import R8Config, R8Trainer, with_r8
from hf_r8.control.config import SamplerConfig
from hf_r8.demo.offline import tiny_gpt2
from tests.trainer_setup import ScriptedLossModel, training_args

pytestmark = pytest.mark.integration
IDENTITY = {"rules": [], "anneal": {"enabled": False}}  # the LR stays the schedule's: these tests are about data


class RecordingR8Trainer(R8Trainer):
    """Remembers the example indices of every training micro-batch, in order."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "r8_index" in inputs and model.training:
            self.seen_indices = getattr(self, "seen_indices", []) + [inputs["r8_index"].tolist()]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def make_model(tokenizer, seed=0):
    return tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, seed=seed)


def r8_config(**sampler):
    return R8Config.from_dict({**IDENTITY, "sampler": sampler})


def test_first_epoch_catalogs_every_example_once_then_batches_are_balanced(tokenizer, lm_dataset, tmp_path):
    dataset = lm_dataset.select(range(64))
    trainer = RecordingR8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=16,
                                 per_device_train_batch_size=8), train_dataset=dataset, r8=r8_config())
    trainer.train()
    first, second = trainer.seen_indices[:8], trainer.seen_indices[8:]
    assert sorted(i for batch in first for i in batch) == list(range(64))
    catalog = trainer.r8_catalog
    assert catalog.usage.tolist() == [2] * 64  # equal quartiles, equal shares: everyone once per epoch
    # epoch 2 followed the plan made from the catalog as it stood after epoch 1
    assert sorted(i for batch in second for i in batch) == list(range(64))
    assert trainer.r8_sampler.epoch == 1
    last_log = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    assert {"r8/q1_loss", "r8/q4_loss", "r8/usage_std", "r8/seen_fraction", "r8/lr_gain"} <= set(last_log)
    assert last_log["r8/q1_loss"] < last_log["r8/q4_loss"]


def test_batches_follow_the_quartile_plan(tokenizer, lm_dataset, tmp_path):
    dataset = lm_dataset.select(range(64))
    config = r8_config(proportions=[0.5, 0.5, 0.0, 0.0])
    trainer = RecordingR8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=9,
                                 per_device_train_batch_size=8), train_dataset=dataset, r8=config)
    trainer.train()
    # the plan for epoch 2 was built from the catalog after epoch 1; its quartiles are fixed by then
    batch = trainer.seen_indices[8]
    after_first_epoch = trainer.r8_catalog.usage.copy()
    assert after_first_epoch.sum() == 72
    losses = trainer.r8_catalog.ema_loss
    assert np.median(losses[batch]) <= np.median(losses)  # only the two easiest quartiles


def test_runs_are_deterministic(tokenizer, lm_dataset, tmp_path):
    dataset = lm_dataset.select(range(48))
    orders = []
    for run in range(2):
        trainer = RecordingR8Trainer(model=make_model(tokenizer), args=training_args(tmp_path / str(run),
                                     max_steps=14, per_device_train_batch_size=8), train_dataset=dataset,
                                     r8=r8_config())
        trainer.train()
        orders.append(trainer.seen_indices)
    assert orders[0] == orders[1]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_loss_for_backward_equals_the_stock_trainer(tokenizer, lm_dataset, tmp_path, accumulation):
    dataset = lm_dataset.select(range(64))
    args = dict(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=accumulation)
    stock = Trainer(model=make_model(tokenizer), args=training_args(tmp_path / "stock", **args),
                    train_dataset=dataset)
    stock.train()
    r8 = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path / "r8", **args), train_dataset=dataset,
                   r8=r8_config(enabled=False))
    r8.train()
    stock_losses = [e["loss"] for e in stock.state.log_history if "loss" in e]
    r8_losses = [e["loss"] for e in r8.state.log_history if "loss" in e]
    assert r8_losses == pytest.approx(stock_losses, abs=1e-6)


def test_per_example_losses_average_to_the_batch_loss(tokenizer, lm_dataset, tmp_path):
    dataset = lm_dataset.select(range(8))  # full-length blocks: every sequence has the same token count
    trainer = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=2,
                        per_device_train_batch_size=8, learning_rate=1e-9), train_dataset=dataset, r8=r8_config())
    trainer.train()
    last_loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]  # the step that set last_loss
    assert float(np.mean(trainer.r8_catalog.last_loss)) == pytest.approx(last_loss, rel=1e-4)


def test_resume_restores_the_catalog(tokenizer, lm_dataset, tmp_path):
    dataset = lm_dataset.select(range(32))
    common = dict(max_steps=10, per_device_train_batch_size=8, save_strategy="steps", save_steps=5)
    whole = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path / "a", **common), train_dataset=dataset,
                      r8=r8_config())
    whole.train()
    assert (tmp_path / "a" / "checkpoint-5" / "r8_catalog.npz").is_file()
    resumed = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path / "b", **common),
                        train_dataset=dataset, r8=r8_config())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    assert resumed.r8_catalog.equals(whole.r8_catalog)


def test_iterable_dataset_falls_back_to_stock_sampling(tokenizer, lm_dataset, tmp_path, caplog):
    iterable = lm_dataset.select(range(32)).to_iterable_dataset()
    trainer = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=3,
                        per_device_train_batch_size=4), train_dataset=iterable, r8=r8_config())
    trainer.train()
    assert trainer.r8_catalog is None
    assert "has no length" in caplog.text


def test_group_by_length_is_refused_clearly(tokenizer, lm_dataset, tmp_path):
    trainer = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=2,
                        train_sampling_strategy="group_by_length"), train_dataset=lm_dataset, r8=r8_config())
    with pytest.raises(ValueError, match="group_by_length"):
        trainer.train()


class LossOnlyModel(torch.nn.Module):
    """Returns a loss and nothing else: per-example losses cannot be recomputed."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, input_ids, labels=None):
        return {"loss": ((self.weight * input_ids.float().mean() / 1000.0) ** 2).sum()}


def test_models_without_logits_use_the_surprise_estimate(lm_dataset, tmp_path, caplog):
    trainer = R8Trainer(model=LossOnlyModel(), args=training_args(tmp_path, max_steps=4,
                        per_device_train_batch_size=4), train_dataset=lm_dataset.select(range(16)),
                        r8=r8_config())
    trainer.train()
    assert trainer.r8_catalog.seen[:12].sum() >= 8
    assert np.isnan(trainer.r8_catalog.last_loss).all()
    assert "surprise estimate" in caplog.text


def test_with_r8_subclasses_any_trainer_and_keeps_foreign_samplers(tokenizer, lm_dataset, tmp_path):
    assert issubclass(with_r8(Trainer), Trainer) and with_r8(Trainer).__name__ == "TrainerWithR8"

    class OwnSampler(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return None

    wrapped = with_r8(OwnSampler)
    assert issubclass(wrapped, OwnSampler) and not hasattr(wrapped, "_r8_owns_sampling")
    assert wrapped.__name__ == "OwnSamplerWithR8"
    trainer = wrapped(model=make_model(tokenizer), args=training_args(tmp_path), train_dataset=lm_dataset)
    assert trainer.r8_callback in trainer.callback_handler.callbacks


def test_bad_sampler_config_is_refused():
    with pytest.raises(ValueError, match="sampler.proportions"):
        SamplerConfig(proportions=[1, 1])


def test_infobatch_mode_trains_with_reweighted_losses(tokenizer, lm_dataset, tmp_path):
    dataset = lm_dataset.select(range(64))
    config = r8_config(mode="infobatch", prune_ratio=0.5)
    trainer = RecordingR8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=24,
                                 per_device_train_batch_size=8), train_dataset=dataset, r8=config)
    trainer.train()
    second_epoch = {i for batch in trainer.seen_indices[8:16] for i in batch}
    assert len(second_epoch) < 64  # some well-learned examples were left out of epoch 2
    assert trainer.r8_sampler.total_epochs == 3
    assert all(np.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_weighted_loss_with_unit_weights_is_the_model_loss(tokenizer, lm_dataset):
    from hf_r8.data.per_example import per_example_losses, weighted_loss

    model = make_model(tokenizer)
    ids = torch.tensor(lm_dataset.select(range(4))["input_ids"])
    output = model(input_ids=ids, labels=ids)
    unit = weighted_loss(output, ids, torch.ones(4), True, None)
    assert unit.item() == pytest.approx(output.loss.item(), rel=1e-6)
    doubled_first = weighted_loss(output, ids, torch.tensor([2.0, 1.0, 1.0, 1.0]), True, None)
    first = per_example_losses(output, ids, True)[0]
    # equal-length sequences: doubling one adds its own token-mean loss / 4 to the batch mean
    assert doubled_first.item() == pytest.approx(unit.item() + first.item() / 4, rel=1e-5)


def test_with_r8_sft_trainer_catalogs_every_example(tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hf_r8.demo.offline import english_paragraphs

    dataset = Dataset.from_dict({"text": english_paragraphs()[:32]})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, report_to=[],
                     save_strategy="no", use_cpu=True, max_length=64, logging_steps=1, disable_tqdm=True)
    model = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(module.training))
    trainer = with_r8(SFTTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  r8=r8_config())
    trainer.train()
    assert forwards.count(True) == 4  # one forward per micro-batch: the losses come from TRL's fused LM head
    catalog = trainer.r8_catalog
    assert catalog.seen.all() and catalog.usage.tolist() == [1] * 32  # the cataloging epoch, through TRL's collator
    assert trainer.r8_example_losses.agreement.verdict is True  # the fused head's losses proven to be the model's own
    first_loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][0]
    assert abs(float(catalog.ema_loss.mean()) - first_loss) < 0.2


def test_per_example_losses_refuse_shapes_they_cannot_split():
    from hf_r8.data.per_example import per_example_losses

    multi_label = per_example_losses({"logits": torch.zeros(4, 3)}, torch.ones(4, 3), shifts_labels=False)
    assert multi_label is None  # BCE over [batch, labels] is not one number per example here
    regression = per_example_losses({"logits": torch.ones(4, 1)}, torch.zeros(4), shifts_labels=False)
    assert regression.tolist() == [1.0, 1.0, 1.0, 1.0]


class PairedRowsModel(torch.nn.Module):
    """Per-token log-probs for two rows per example, as a preference trainer's fused LM head returns them."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, input_ids, labels=None):
        log_probs = -(torch.cat([input_ids, input_ids]).float() / 1000.0 * self.weight).abs()
        return {"loss": -log_probs.mean(), "log_probs": log_probs, "label_mask": torch.ones_like(log_probs)}


def test_outputs_with_more_rows_than_examples_use_the_surprise_estimate(lm_dataset, tmp_path, caplog):
    trainer = R8Trainer(model=PairedRowsModel(), args=training_args(tmp_path, max_steps=4,
                        per_device_train_batch_size=4), train_dataset=lm_dataset.select(range(16)),
                        r8=r8_config())
    trainer.train()
    assert trainer.r8_catalog.seen.sum() == 16 and np.isnan(trainer.r8_catalog.last_loss).all()
    assert "surprise estimate" in caplog.text


def test_a_checkpoint_inside_a_stabilization_resumes_with_the_low_loss_batches_still_owed(tokenizer, lm_dataset,
                                                                                        tmp_path):
    def spikes_twice(step):  # a rollback at step 21, in epoch 2 (8 steps of 4 examples per epoch)
        return 20.0 if step in (20, 21) else 6.0 - 0.01 * step + 0.05 * (step % 3)

    dataset = lm_dataset.select(range(32))
    config = {**IDENTITY, "range_test": {"enabled": False},
              "rollback": {"every_steps": 10, "healthy_steps": 5, "window": 20, "min_history": 10,
                           "stabilize_steps": 6}}
    common = dict(max_steps=32, per_device_train_batch_size=4, save_strategy="steps", save_steps=22)

    def run(output_dir, resume=None):
        model = make_model(tokenizer)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # a plain module is saved
        trainer = RecordingR8Trainer(model=ScriptedLossModel(model, spikes_twice),
                                     args=training_args(output_dir, **common), train_dataset=dataset,
                                     r8=R8Config.from_dict(config))
        if resume is not None:
            trainer.model.training_forwards = 22  # the script goes on where the checkpoint was taken
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "a")
    assert whole.r8_callback._run.engine.rollback.rollbacks == 1
    owed = whole.seen_indices[24:28]  # epoch 3's first batches: the stabilization's share left for it
    assert len({index for batch in owed for index in batch}) <= 8  # drawn from one quartile of 32 examples
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-22"))
    assert resumed.seen_indices == whole.seen_indices[22:]  # the owed batches too (a checkpoint once lost them)
