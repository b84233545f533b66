"""R8Trainer's data path: items of any kind, batched fetch, data_seed, exactness proven, resume on another set."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from hf_r8 import R8Callback, R8Trainer
from hf_r8.data.indexed_data import IndexedDataset
from hf_r8.data.per_example import ExampleLosses, LossAgreement
from tests.test_trainer import RecordingR8Trainer, make_model, r8_config
from tests.trainer_setup import training_args

pytestmark = pytest.mark.integration


def r8_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno >= logging.WARNING and record.getMessage().startswith("R8:")]


def tensor_dataset(lm_dataset, size):
    ids = torch.tensor(lm_dataset.select(range(size))["input_ids"])
    return torch.utils.data.TensorDataset(ids, ids.clone())


def stack_into_dict(rows):
    return {"input_ids": torch.stack([x for x, _ in rows]), "labels": torch.stack([y for _, y in rows])}


def stack_into_tuple(rows):
    return torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows])


# ------------------------------------------------------------------------------- items of any kind
def test_tuple_items_with_a_dict_collator_get_exact_losses(tokenizer, lm_dataset, tmp_path, caplog):
    trainer = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=4,
                        per_device_train_batch_size=8), train_dataset=tensor_dataset(lm_dataset, 32),
                        data_collator=stack_into_dict, r8=r8_config())
    trainer.train()
    catalog = trainer.r8_catalog
    assert catalog.usage.tolist() == [1] * 32  # the cataloging epoch reached every tuple
    assert np.isfinite(catalog.last_loss).all()  # exact per-example losses, not the surprise estimate
    assert r8_warnings(caplog) == []


class TupleBatchTrainer(R8Trainer):
    """What a transformers user writes for tuple batches: the stock compute_loss calls model(**inputs)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        assert type(inputs) is tuple and len(inputs) == 2  # the collator's batch, with nothing of R8's in it
        input_ids, labels = inputs
        self.batch_sizes = getattr(self, "batch_sizes", []) + [len(input_ids)]
        outputs = model(input_ids=input_ids, labels=labels)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def test_tuple_batches_reach_your_compute_loss_as_collated_and_feed_the_surprise_estimate(
        tokenizer, lm_dataset, tmp_path, caplog):
    trainer = TupleBatchTrainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=6,
                                per_device_train_batch_size=8), train_dataset=tensor_dataset(lm_dataset, 32),
                                data_collator=stack_into_tuple, r8=r8_config())
    trainer.train()
    assert trainer.batch_sizes == [8] * 6
    catalog = trainer.r8_catalog
    assert catalog.seen.all() and catalog.usage.sum() == 48
    assert np.isnan(catalog.last_loss).all()  # no exact values: only the batch loss was known
    warnings = r8_warnings(caplog)
    assert len(warnings) == 1 and "surprise estimate" in warnings[0] and "not a dict" in warnings[0]
    assert "compute_loss" not in trainer.__dict__  # the per-step recording wrapper is gone


# ------------------------------------------------------------------------------------- batched fetch
@pytest.fixture
def counted_getitems(monkeypatch):
    """Counts calls of `datasets.Dataset.__getitems__` (the batched Arrow fetch) and the rows they asked for."""
    calls = []
    original = datasets.Dataset.__getitems__

    def counting(self, keys):
        calls.append(list(keys))
        return original(self, keys)

    monkeypatch.setattr(datasets.Dataset, "__getitems__", counting)
    return calls


def test_indexed_dataset_keeps_the_batched_fetch_and_its_items(lm_dataset, counted_getitems):
    dataset = lm_dataset.select(range(16))
    indexed = IndexedDataset(dataset)
    batched = indexed.__getitems__([5, 2, 9])
    assert counted_getitems == [[5, 2, 9]]
    assert batched == [indexed[5], indexed[2], indexed[9]]
    assert [item["r8_index"] for item in batched] == [5, 2, 9]
    # a dataset without batched fetch must not look as if it had one (torch's fetcher would call it)
    assert getattr(IndexedDataset(torch.utils.data.TensorDataset(torch.zeros(4))), "__getitems__", None) is None


def test_training_fetches_each_batch_of_a_datasets_dataset_at_once(tokenizer, lm_dataset, tmp_path,
                                                                   counted_getitems):
    trainer = RecordingR8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=4,
                                 per_device_train_batch_size=8), train_dataset=lm_dataset.select(range(32)),
                                 r8=r8_config())
    trainer.train()
    assert counted_getitems == trainer.seen_indices  # one Arrow fetch per micro-batch, of exactly its rows
    assert trainer.r8_catalog.usage.tolist() == [1] * 32


# ----------------------------------------------------------------------------------------- data_seed
def first_epoch_order(tokenizer, lm_dataset, output_dir, **seeds):
    trainer = RecordingR8Trainer(model=make_model(tokenizer), args=training_args(output_dir, max_steps=2,
                                 per_device_train_batch_size=8, **seeds), train_dataset=lm_dataset.select(range(16)),
                                 r8=r8_config())
    trainer.train()
    return [index for batch in trainer.seen_indices for index in batch]


def test_data_seed_sets_the_batch_order_as_in_the_stock_trainer(tokenizer, lm_dataset, tmp_path):
    one = first_epoch_order(tokenizer, lm_dataset, tmp_path / "a", seed=0, data_seed=1)
    two = first_epoch_order(tokenizer, lm_dataset, tmp_path / "b", seed=0, data_seed=2)
    one_again = first_epoch_order(tokenizer, lm_dataset, tmp_path / "c", seed=7, data_seed=1)
    assert sorted(one) == sorted(two) == list(range(16))  # whole first epochs: the orders are comparable
    assert one != two
    assert one == one_again  # the model seed does not move the data order once data_seed is set


# ------------------------------------------------------------------------------ exactness, proven
class WrappedLM(torch.nn.Module):
    """A GPT-2 inside the user's own module: no `loss_function`, so R8 cannot see the label shift."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, labels=None, attention_mask=None):
        output = self.inner(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
        return {"loss": output.loss, "logits": output.logits}


def test_a_wrapped_language_model_falls_back_to_the_surprise_estimate_with_one_warning(
        tokenizer, lm_dataset, tmp_path, caplog):
    trainer = R8Trainer(model=WrappedLM(make_model(tokenizer)), args=training_args(tmp_path, max_steps=6,
                        per_device_train_batch_size=8), train_dataset=lm_dataset.select(range(32)), r8=r8_config())
    trainer.train()
    catalog = trainer.r8_catalog
    assert catalog.seen.all()
    assert np.isnan(catalog.last_loss).all()  # nothing cataloged as exact: the unshifted losses were wrong
    warnings = r8_warnings(caplog)
    assert len(warnings) == 1 and "model's own loss" in warnings[0] and "surprise estimate" in warnings[0]
    assert trainer.r8_example_losses.agreement.verdict is False


@pytest.mark.parametrize("accumulation", [1, 2])
def test_an_unwrapped_language_model_is_proven_exact_without_a_warning(tokenizer, lm_dataset, tmp_path, caplog,
                                                                       accumulation):
    trainer = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=4,
                        per_device_train_batch_size=4, gradient_accumulation_steps=accumulation),
                        train_dataset=lm_dataset.select(range(32)), r8=r8_config())
    trainer.train()
    assert trainer.r8_example_losses.agreement.verdict is True  # proven on the first batches (with num_items_in_batch)
    seen = trainer.r8_catalog.seen
    assert seen.sum() == 16 * accumulation and np.isfinite(trainer.r8_catalog.last_loss[seen]).all()
    assert r8_warnings(caplog) == []


def test_an_moe_model_adding_its_router_loss_is_proven_exact(lm_dataset, tmp_path, caplog):
    from hf_r8.demo.offline import tiny_mixtral
    from tests.trainer_setup import VOCAB_SIZE

    model = tiny_mixtral(VOCAB_SIZE, output_router_logits=True)
    model.router_aux_loss_coef = 0.1  # its loss = token mean + 0.1 * router aux loss: a few percent more
    trainer = R8Trainer(model=model, args=training_args(tmp_path, max_steps=3, per_device_train_batch_size=8),
                        train_dataset=lm_dataset.select(range(24)), r8=r8_config())
    trainer.train()
    assert trainer.r8_example_losses.agreement.verdict is True
    assert np.isfinite(trainer.r8_catalog.last_loss).all() and r8_warnings(caplog) == []


def test_loss_agreement_is_proven_by_agreeing_batches_and_refuted_by_one():
    def recomputed(*batch_losses):
        return ExampleLosses(torch.zeros(2), tuple(torch.tensor(value) for value in batch_losses))

    agreement = LossAgreement(batches=2)
    assert agreement.accepts(recomputed(2.0), torch.tensor(2.0 + 1e-6))
    assert agreement.accepts(recomputed(3.0), torch.tensor(float("nan")))  # proves nothing: still unproven
    assert agreement.accepts(recomputed(5.0), None) and agreement.verdict is None  # no model loss to compare
    assert agreement.accepts(recomputed(1.5, 4.0), torch.tensor(4.0))  # another normalisation that matches
    assert agreement.verdict is True and agreement.accepts(recomputed(1.0), torch.tensor(9.0))

    refuted = LossAgreement(batches=3)
    assert refuted.accepts(recomputed(2.0), torch.tensor(2.0))
    assert not refuted.accepts(recomputed(2.0, 2.2), torch.tensor(2.1))
    assert refuted.verdict is False and refuted.disagreement == pytest.approx((2.0, 2.1))
    assert not refuted.accepts(recomputed(2.0), torch.tensor(2.0))  # refuted for good

    with_auxiliary = LossAgreement(batches=1)  # a model loss holding more than the per-example losses
    assert with_auxiliary.accepts(recomputed(2.0), torch.tensor(2.5), auxiliary_loss=torch.tensor(0.5))
    assert with_auxiliary.verdict is True


# ------------------------------------------------------------------------- resume on another train set
def test_resuming_on_a_train_set_of_another_size_starts_a_new_catalog(tokenizer, lm_dataset, tmp_path, caplog):
    common = dict(max_steps=10, per_device_train_batch_size=8, save_strategy="steps", save_steps=6)
    first = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path / "a", **common),
                      train_dataset=lm_dataset.select(range(32)), r8=r8_config())
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-6"
    assert (checkpoint / "r8_epoch_plan.npz").is_file()  # the plan of epoch 2, which a resume would replay
    caplog.clear()
    resumed = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path / "b", **common),
                        train_dataset=lm_dataset.select(range(64)), r8=r8_config())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 10
    assert resumed.r8_catalog.size == 64 and resumed.r8_catalog.seen.any()
    warnings = r8_warnings(caplog)
    assert len(warnings) == 1 and "32" in warnings[0] and "64" in warnings[0]


def test_an_r8callback_passed_to_r8trainer_is_the_one_used(tokenizer, lm_dataset, tmp_path):
    mine = R8Callback(r8_config())
    trainer = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=4),
                        train_dataset=lm_dataset.select(range(32)), callbacks=[mine])
    trainer.train()
    assert trainer.r8_callback is mine and trainer.r8_config is mine.config
    assert [callback for callback in trainer.callback_handler.callbacks if isinstance(callback, R8Callback)] == [mine]
    assert mine.controller is not None
    with pytest.raises(ValueError, match="got r8= and an R8Callback"):
        R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=4),
                  train_dataset=lm_dataset, callbacks=[R8Callback()], r8=r8_config())


class PushStarts(Exception):
    """Raised at `on_push_begin`: the test stops where the upload would begin (there is no Hub here)."""


class FilesWhenThePushBegins(TrainerCallback):
    def on_push_begin(self, args, state, control, **kwargs):
        self.files = sorted(path.name for path in (Path(args.output_dir) / f"checkpoint-{state.global_step}").iterdir())
        raise PushStarts


def test_a_checkpoint_pushed_to_the_hub_already_holds_the_catalog(tokenizer, lm_dataset, tmp_path):
    watcher = FilesWhenThePushBegins()
    trainer = R8Trainer(model=make_model(tokenizer), args=training_args(tmp_path, max_steps=4, save_strategy="steps",
                                                                        save_steps=4),
                        train_dataset=lm_dataset.select(range(32)), r8=r8_config(), callbacks=[watcher])
    # Turned on after construction: the Trainer's __init__ would create the Hub repository.
    trainer.args.push_to_hub, trainer.args.hub_strategy = True, "checkpoint"
    trainer.push_in_progress = None  # what creating the repository sets
    with pytest.raises(PushStarts):
        trainer.train()
    assert {"r8_catalog.npz", "trainer_state.json"} <= set(watcher.files)
