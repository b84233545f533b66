"""A `train()` that raises, wherever the exception comes from, leaves nothing of R8 behind.

No callback event follows a `train()` that raised, so R8 ends its run where the exception leaves `train()`
(`compat.guard_train`): the taps are removed from the Trainer, the live dashboard's refresh thread is stopped and
every finished step's row is on disk, as after an exception inside `training_step`.
"""

from __future__ import annotations

import threading

import pytest
import torch
from rich.live import _RefreshThread
from transformers import Trainer, TrainerCallback

from hf_r8 import R8Callback
from hf_r8.integrations.taps import _TAPPED_METHODS
from hf_r8.ui.run_log import METRICS_FILE, RUN_DIR, read_jsonl
from tests.trainer_setup import training_args

pytestmark = pytest.mark.integration

CRASH_STEP = 25


class RaisesInStepEnd(TrainerCallback):
    """Another user's callback, listed after R8, that fails at the end of a step."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == CRASH_STEP:
            raise RuntimeError("another callback failed")


class InterruptedBetweenSteps(TrainerCallback):
    """Ctrl-C while the next step starts (a notebook's interrupt)."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == CRASH_STEP:
            raise KeyboardInterrupt


class FailingItems(torch.utils.data.Dataset):
    """`items`, whose `__getitem__` raises after `good_items` fetches (a corrupt shard, a lost file)."""

    def __init__(self, items, good_items):
        self.items, self.good_items, self.fetched = items, good_items, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        self.fetched += 1
        if self.fetched > self.good_items:
            raise OSError("the data loader lost its file")
        return self.items[index]


def _dashboard_threads() -> list[threading.Thread]:
    """rich's refresh threads still running 5 s after the run ended (a stopped Live's thread finishes the redraw
    it may be in, at most one refresh interval: it is not joined, so it is given that time on a loaded machine)."""
    threads = [thread for thread in threading.enumerate() if isinstance(thread, _RefreshThread)]
    for thread in threads:
        thread.join(timeout=5.0)
    return [thread for thread in threads if thread.is_alive()]


@pytest.mark.parametrize("where", ["another callback", "interrupt between steps", "evaluation", "data loader"])
def test_a_run_that_raises_anywhere_leaves_no_debris(where, model, lm_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # a terminal: the dashboard draws live, from a refresh thread
    batch = 4
    train_dataset, eval_dataset, callbacks, error = lm_dataset, None, [], RuntimeError
    arguments = {}
    if where == "another callback":
        callbacks = [RaisesInStepEnd()]
    elif where == "interrupt between steps":
        callbacks, error = [InterruptedBetweenSteps()], KeyboardInterrupt
    elif where == "evaluation":
        eval_dataset = FailingItems(lm_dataset, good_items=0)
        arguments = {"eval_strategy": "steps", "eval_steps": CRASH_STEP}
        error = OSError
    else:
        train_dataset, error = FailingItems(lm_dataset, good_items=(CRASH_STEP + 1) * batch + 2), OSError
    r8 = R8Callback()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=40, per_device_train_batch_size=batch,
                                                      **arguments),
                      train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=[r8, *callbacks])
    with pytest.raises(error):
        trainer.train()
    finished = trainer.state.global_step
    assert finished == CRASH_STEP, "this test would prove nothing if the run had not raised where it meant to"
    assert not set(_TAPPED_METHODS) & set(vars(trainer)), "the Trainer is left wrapped"
    assert not _dashboard_threads(), "the dashboard still redraws a run that ended"
    assert not r8._outputs.live
    rows = read_jsonl(tmp_path / RUN_DIR / METRICS_FILE, merge_by_step=True)
    assert [row["step"] for row in rows] == list(range(1, finished + 1))  # every finished step is on disk

    # The Trainer trains again as if nothing had happened: tapped once, no second dashboard left running.
    trainer.callback_handler.callbacks = [callback for callback in trainer.callback_handler.callbacks
                                          if callback not in callbacks]
    if isinstance(train_dataset, FailingItems):
        train_dataset.good_items = 10**9
    trainer.args.eval_strategy = "no"
    trainer.train()
    assert not set(_TAPPED_METHODS) & set(vars(trainer))
    assert not _dashboard_threads()
