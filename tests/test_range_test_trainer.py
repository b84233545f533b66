"""The default's LR range test in a real Trainer run: the Trainer never sees its sweep, a checkpoint never holds
its weights, and a fault inside it is a fault, not the curve."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback

from hf_r8 import R8Callback, R8Config
from hf_r8.demo.offline import tiny_gpt2
from tests.trainer_setup import as_saved_by_version_2, training_args

pytestmark = pytest.mark.integration

STEPS = 150  # the shortest run the default tests (15 sweep steps)


class Fetches(torch.utils.data.Dataset):
    """`items`, remembering the order in which they are fetched."""

    def __init__(self, items):
        self.items, self.fetched = items, []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        self.fetched.append(index)
        return self.items[index]


class Seen(TrainerCallback):
    """What the Trainer's other callbacks see: evaluations, saves, and the LR each optimizer step uses."""

    def __init__(self):
        self.evaluations, self.saves, self.used = [], [], []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(
            lambda optimizer, *_: self.used.append(optimizer.param_groups[0]["lr"]))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append((state.global_step, metrics["eval_loss"]))

    def on_save(self, args, state, control, **kwargs):
        self.saves.append(state.global_step)


def _model(tokenizer, seed=1):
    return tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, seed=seed)


def test_the_trainer_never_sees_the_sweep(tokenizer, lm_dataset, tmp_path):
    arguments = dict(max_steps=STEPS, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=10,
                     eval_strategy="steps", eval_steps=5, save_strategy="steps", save_steps=5, save_total_limit=2,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", logging_steps=5)
    stock_data, r8_data = Fetches(lm_dataset), Fetches(lm_dataset)
    stock = Trainer(model=_model(tokenizer), args=training_args(tmp_path / "stock", **arguments),
                    train_dataset=stock_data, eval_dataset=lm_dataset.select(range(16)))
    stock.train()
    r8, seen = R8Callback(), Seen()
    trainer = Trainer(model=_model(tokenizer), args=training_args(tmp_path / "r8", **arguments),
                      train_dataset=r8_data, eval_dataset=lm_dataset.select(range(16)),
                      callbacks=[r8, seen, EarlyStoppingCallback(early_stopping_patience=3)])
    output = trainer.train()
    sweep = [event for event in r8.events if event.rule == "range_test"]
    assert [event.action for event in sweep] == ["rebase"], "this test would prove nothing without a sweep"
    assert re.search(r"\b1[0-5] sweep steps before training", sweep[0].reason)  # 15, or fewer where it blew up

    # No evaluation, save or early stop on sweep weights: the first is at step 5 of training, every loss sane.
    assert seen.evaluations[0][0] == 5 and seen.saves[0] == 5
    untrained = math.log(len(tokenizer))
    assert max(loss for _, loss in seen.evaluations) < untrained + 0.5
    assert trainer.state.global_step == STEPS  # early stopping judged training's evaluations only
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "learning_rate" in entry]
    assert logs[0]["step"] == 5 and max(entry["loss"] for entry in logs) < untrained + 0.5
    assert output.training_loss < untrained + 0.5
    assert "r8/range_test/chosen_gain" in logs[0] and "r8/range_test/chosen_gain" not in logs[1]
    # Every optimizer step the Trainer counts is training's: the warmup starts at step 1, after the sweep.
    assert len(seen.used) == trainer.state.global_step
    assert seen.used[0] < seen.used[9] and max(seen.used) <= 1e-3 * r8.controller.specs[0].initial_gain * 20
    # The data order is the stock Trainer's: the sweep read the first batches of a pass of its own.
    assert r8_data.fetched[-len(stock_data.fetched):] == stock_data.fetched


def test_a_checkpoint_saved_inside_an_old_sweep_is_refused(model, lm_dataset, tmp_path, caplog):
    Trainer(model=model, args=training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3),
            train_dataset=lm_dataset, callbacks=[R8Callback()]).train()
    checkpoint = tmp_path / "checkpoint-3"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    entry = state["stateful_callbacks"]["R8Callback"]  # one instance: its entry itself, not a list
    old_entry = as_saved_by_version_2(entry["attributes"]["r8_state"])
    entry["attributes"]["r8_state"] = {**old_entry, "range_test_running": True}  # hf_r8 0.1, inside its sweep
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))

    def resumed(config):
        trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=6), train_dataset=lm_dataset,
                          callbacks=[R8Callback(config)])
        trainer.train(resume_from_checkpoint=str(checkpoint))
        return trainer

    with pytest.raises(ValueError, match="inside its LR range test: its weights are the sweep's.*Restart the run"):
        resumed(None)
    with caplog.at_level("WARNING"):
        assert resumed({"range_test": {"enabled": False}}).state.global_step == 6
    assert "resuming from them at gain 1, as range_test.enabled: false asks" in caplog.text


class FaultAt(torch.nn.Module):
    """A real GPT-2 whose training loss is NaN at one training forward (a bad batch), real otherwise."""

    def __init__(self, inner, forward):
        super().__init__()
        self.inner, self.forward_with_fault, self.forwards = inner, forward, 0

    def forward(self, input_ids, labels=None, attention_mask=None):
        output = self.inner(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
        if self.training and labels is not None:
            self.forwards += 1
            if self.forwards == self.forward_with_fault:
                return {"loss": output.loss * math.nan, "logits": output.logits}
        return output


def test_one_bad_batch_inside_the_sweep_is_skipped_and_the_choice_is_the_clean_one(tokenizer, lm_dataset,
                                                                                   tmp_path):
    def chosen(model, folder):
        r8 = R8Callback(R8Config(dashboard=False, report=False))
        Trainer(model=model, args=training_args(tmp_path / folder, max_steps=STEPS, logging_steps=50),
                train_dataset=lm_dataset, callbacks=[r8]).train()
        (rebase,) = [event for event in r8.events if event.rule == "range_test"]
        return rebase

    def curve_gains(folder):
        record = json.loads((tmp_path / folder / "r8" / "r8_range_test.json").read_text())
        return [gain for gain, _ in record["curve"]]

    def faults(rebase):
        found = re.search(r"(\d+) faulty losses left out", rebase.reason)
        return int(found.group(1)) if found else 0

    clean = chosen(_model(tokenizer), "clean")
    faulty = chosen(FaultAt(_model(tokenizer), forward=4), "faulty")
    assert faults(faulty) == faults(clean) + 1, (faulty.reason, clean.reason)  # the NaN, left out
    # Not x0.01 for "diverged after 4 steps": within one sweep step (x2.7) of the clean run's choice.
    assert clean.new_value / 3 <= faulty.new_value <= clean.new_value * 3
    # Forward 4 is sweep step 3: its loss measures update 2's weights, and update 3 is skipped, so the next loss
    # measures update 2's weights again and is credited to update 2's gain; update 3's gain is not on the curve.
    clean_gains, faulty_gains = curve_gains("clean"), curve_gains("faulty")
    assert faulty_gains[:4] == pytest.approx(clean_gains[:3] + clean_gains[4:5])


def test_a_second_train_continues_at_the_gain_the_first_found(tokenizer, lm_dataset, tmp_path):
    r8 = R8Callback(R8Config(dashboard=False, report=False))
    trainer = Trainer(model=_model(tokenizer), args=training_args(tmp_path, max_steps=STEPS, learning_rate=1e-4,
                                                                  logging_steps=50),
                      train_dataset=lm_dataset, callbacks=[r8])
    trainer.train()
    (first,) = [event for event in r8.events if event.rule == "range_test"]
    assert first.action == "rebase" and first.new_value > 3, "this test would prove nothing if the first kept the LR"
    trainer.train()  # the same Trainer and callback, on the trained model
    second = [event for event in r8.events if event.rule == "range_test"][1:]
    assert [(event.action, event.new_value) for event in second] == [("reuse", first.new_value)]
    assert [spec.initial_gain for spec in r8.controller.specs] == [first.new_value] * 2
