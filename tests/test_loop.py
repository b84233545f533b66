"""`R8Loop`: every index in the first epoch, balanced quartiles after, the LR reacting to reported
losses, a reported NaN rolling back through the user's save/load callables, and, with rollback off,
what R8Callback does: the guard keeps a NaN from the controller, or, with the guard off too, nothing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from hf_r8 import R8Config, R8Loop
from hf_r8.control.config import RangeTestConfig


def _config() -> R8Config:
    config = R8Config.from_preset("default")
    config.dashboard = False
    return config


def test_first_epoch_visits_every_index_once_then_batches_balance_the_quartiles():
    difficulty = np.linspace(0.1, 4.0, 64)  # example i's loss: a fixed, known difficulty
    seen: list[list[np.ndarray]] = []
    with R8Loop(64, batch_size=8, config=_config(), num_epochs=3) as loop:
        for _ in loop.epochs():
            seen.append([])
            for indices, lr in loop.batches():
                assert lr > 0
                seen[-1].append(indices)
                losses = torch.tensor(difficulty[indices])
                loop.report(losses.mean(), per_example_losses=losses)
    first = np.concatenate(seen[0])
    assert sorted(first.tolist()) == list(range(64))
    quartile_of = np.searchsorted(np.quantile(difficulty, [0.25, 0.5, 0.75]), difficulty, side="right")
    for batch in seen[1]:
        assert np.bincount(quartile_of[batch], minlength=4).tolist() == [2, 2, 2, 2]
    assert loop.catalog.seen.all() and loop.step == 24


def test_the_lr_follows_the_reported_losses():
    config = _config()
    config.warmup_steps = 0
    lrs = []
    with R8Loop(800, batch_size=4, config=config, base_lr=1e-3) as loop:
        for _ in loop.epochs():
            for step, (_, lr) in enumerate(loop.batches()):
                lrs.append(lr)
                loop.report(5.0 * 0.99 ** step)  # a steady, certain fall: the LR may grow
    assert lrs[79] > 1e-3 and any(event.action == "increase" for event in loop.events)
    # the last fifth of these 200 steps: a constant base LR gets the default's end-of-run anneal, said once, down
    # to the floor (base / 100)
    assert [event.step for event in loop.events if event.rule == "anneal"] == [160]
    assert lrs[-1] == pytest.approx(lrs[79] / 100 / (lrs[79] / 1e-3), rel=1e-6)


def test_a_per_example_loss_tensor_reported_as_the_loss_stands_for_its_mean():
    with R8Loop(16, batch_size=4, config=_config()) as loop:
        for _ in loop.epochs():
            for _indices, _lr in loop.batches():
                loop.report(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert loop.controller.loss.rolling[-1] == pytest.approx(3.0)
    with R8Loop(16, batch_size=4, config=_config()) as loop, pytest.raises(ValueError, match="tensor of 0 values"):
        next(loop.epochs())
        next(loop.batches())
        loop.report(torch.tensor([]))


def test_with_save_and_load_the_loop_runs_the_range_test_and_restores_the_state():
    saved, loaded = [], []
    config = _config()
    config.range_test = RangeTestConfig()  # the default's test: 15 of this run's 160 steps
    lrs = []
    with R8Loop(640, batch_size=4, config=config, base_lr=1e-4, save=lambda: saved.append(len(lrs)) or "state",
                load=loaded.append) as loop:
        for _ in loop.epochs():
            for step, (_, lr) in enumerate(loop.batches()):
                lrs.append(lr)
                # during the test: the loss falls once the LR passes 1e-2 (gain 100)
                loop.report(1.0 if step < 15 and lr > 1e-2 else 1.5)
    assert saved[0] == 0 and loaded == ["state"], "saved before the first batch, loaded once at the test's end"
    sweep = config.range_test
    assert lrs[:14] == pytest.approx([1e-4 * sweep.gain_min * (sweep.gain_max / sweep.gain_min) ** (i / 13)
                                      for i in range(14)])
    rebase = next(event for event in loop.events if event.rule == "range_test")
    assert rebase.step == 15 and rebase.new_value > 3, rebase.reason
    assert lrs[15] == pytest.approx(1e-4 * rebase.new_value)


def test_a_reported_nan_rolls_back_through_the_users_callables():
    config = _config()
    config.rollback.every_steps, config.rollback.healthy_steps = 10, 5
    weights = {"w": 1.0}
    saved, loaded = [], []

    def save() -> dict:
        saved.append(dict(weights))
        return dict(weights)

    def load(state: dict) -> None:
        loaded.append(state)
        weights.update(state)

    lrs, quartiles_after_rollback = [], []
    with R8Loop(256, batch_size=4, config=config, save=save, load=load) as loop:
        for _ in loop.epochs():
            for step, (indices, lr) in enumerate(loop.batches(), start=1):
                lrs.append(lr)
                if step == 31:
                    quartiles_after_rollback = loop.catalog.quartiles()[indices].tolist()
                weights["w"] += 1.0
                loop.report(float("nan") if step == 30 else 3.0 - 0.01 * step)
                if step == 40:
                    break
    assert saved and loaded == [saved[-1]] and weights["w"] < 40  # the weights went back to a healthy state
    assert loop.rollback.rollbacks == 1 and not loop.stopped
    assert lrs[30] < 0.75 * lrs[29]  # the step after the NaN restarts lower
    assert quartiles_after_rollback == [0, 0, 0, 0]  # ... on the lowest-loss examples
    assert any(event.rule == "rollback" and "restored the snapshot of step" in event.reason for event in loop.events)


def test_without_a_state_to_return_to_a_nan_stops_the_loop():
    with R8Loop(64, batch_size=4, config=_config()) as loop:
        for _ in loop.epochs():
            for _ in loop.batches():
                loop.report(float("nan"))
    assert loop.stopped and loop.step == 1
    assert "no state to roll back to" in loop.events[-1].reason


def _train_a_linear_model(config: R8Config, nan_at: int, skip_nonfinite: bool,
                          ) -> tuple[R8Loop, torch.nn.Linear, list[float]]:
    """A real model and loop: a linear regression on 64 examples, 3 epochs of 8 batches; the batch of step
    `nan_at` has a NaN loss (an overflow, say). With `skip_nonfinite`, the loop leaves out the optimizer step of
    a non-finite loss, as R8Loop's docstring says to. Returns the loop, the model and the losses reported."""
    torch.manual_seed(0)
    inputs = torch.randn(64, 4)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    reported = []
    with R8Loop(64, batch_size=8, config=config, base_lr=0.05, num_epochs=3) as loop:
        for _ in loop.epochs():
            for indices, lr in loop.batches():
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = torch.from_numpy(indices)
                losses = (model(inputs[batch]) - targets[batch]).pow(2).squeeze(1)
                if loop.step + 1 == nan_at:
                    losses = losses * float("nan")
                loss = losses.mean()
                loss.backward()
                if torch.isfinite(loss) or not skip_nonfinite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loop.report(loss.detach(), per_example_losses=losses.detach())
                reported.append(loss.item())
    return loop, model, reported


def test_with_rollback_off_the_guard_keeps_a_nan_from_the_controller_and_training_goes_on():
    config = _config()
    config.rollback.enabled = False  # the non-finite guard stays on (its default)
    loop, model, reported = _train_a_linear_model(config, nan_at=10, skip_nonfinite=True)
    assert not loop.stopped and loop.step == 24, "every batch of the 3 epochs"
    guard = [event for event in loop.events if event.rule in ("guard", "rollback")]
    assert [(event.step, event.rule, event.action) for event in guard] == [(10, "guard", "nonfinite_loss")]
    assert loop.controller.metrics()["nonfinite_losses"] == 0  # the controller never saw the NaN
    assert loop.rollback.rollbacks == 0
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    assert reported[-1] < 0.5 * reported[0], "training went on and learned"


def test_with_rollback_and_the_guard_off_a_nan_reaches_the_controller_and_its_step_is_applied():
    config = _config()
    config.rollback.enabled = config.rollback.guard_nonfinite = False  # no protection, as asked
    loop, model, _ = _train_a_linear_model(config, nan_at=10, skip_nonfinite=False)
    assert not loop.stopped and loop.step == 24
    assert not any(event.rule in ("guard", "rollback") for event in loop.events)
    # The NaN step was applied: the weights are NaN, and so is every loss after it, which the controller sees.
    assert not torch.isfinite(model.weight).all()
    assert loop.controller.metrics()["nonfinite_losses"] == 24 - 9
    brake = next(event for event in loop.events if event.rule == "decision")
    assert (brake.step, brake.action, brake.reason) == (10, "spike_decrease", "non-finite loss")  # the brake


@pytest.mark.parametrize(("arguments", "message"), [
    ({"num_samples": 0, "batch_size": 4}, "catalog size=0"),
    ({"num_samples": 10, "batch_size": 0}, "batch_size=0"),
    ({"num_samples": 10, "batch_size": 2, "base_lr": float("nan")}, "base_lr=nan"),
    ({"num_samples": 10, "batch_size": 2, "num_epochs": 0}, "num_epochs=0"),
])
def test_bad_arguments_name_the_field(arguments, message):
    with pytest.raises(ValueError, match=message):
        R8Loop(**arguments, config=_config())


def _difficulty_run_one_epoch(loop: R8Loop, stop_after: int | None = None, spikes: tuple[int, ...] = ()) -> list:
    """Report each example's fixed difficulty (50x at the `spikes` steps); the (indices, LR) of each batch."""
    difficulty = np.linspace(0.1, 4.0, loop.catalog.size)
    batches = []
    for indices, lr in loop.batches():
        batches.append((indices.tolist(), lr))
        losses = torch.tensor(difficulty[indices]) * (0.995 ** loop.step)
        if loop.step + 1 in spikes:
            losses = losses * 50.0
        loop.report(losses.mean(), per_example_losses=losses)
        if len(batches) == stop_after:
            break
    return batches


def _difficulty_run(loop: R8Loop, stop_after: int | None = None, spikes: tuple[int, ...] = ()) -> list:
    batches = []
    for _ in loop.epochs():
        left = None if stop_after is None else stop_after - len(batches)
        batches += _difficulty_run_one_epoch(loop, left, spikes)
        if len(batches) == stop_after:
            break
    return batches


def _through_torch_save(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only=True, torch's default


def test_a_loop_resumed_from_its_state_dict_goes_on_exactly_as_one_never_stopped():
    config = _config()
    config.warmup_steps = 0
    config.rollback.every_steps, config.rollback.healthy_steps = 8, 4
    weights = {"w": 0}

    def loop() -> R8Loop:  # 7 epochs of 24 batches: room for a range test of 15 steps
        return R8Loop(96, batch_size=4, config=config, num_epochs=7, save=lambda: dict(weights), load=weights.update)

    with loop() as straight:
        reference = _difficulty_run(straight, spikes=(60,))
    assert [event.rule for event in straight.events if event.action in ("rebase", "spike")] == \
        ["range_test", "rollback"], "the run has a range test, then a spike (judged against the level before it)"

    with loop() as first:
        head = _difficulty_run(first, stop_after=41)  # inside the second epoch, after the range test
        saved = _through_torch_save(first.state_dict())
    with loop() as resumed:
        resumed.load_state_dict(saved)
        tail = _difficulty_run(resumed, spikes=(60,))
    assert head + tail == reference
    assert list(resumed.events) == list(straight.events)
    assert resumed.catalog.equals(straight.catalog) and resumed.step == straight.step

    # The state save() returned is not in the state dict: a resumed loop snapshots as soon as it may, and a
    # rollback goes back to a snapshot of its own.
    with loop() as resumed:
        resumed.load_state_dict(saved)
        _difficulty_run(resumed, spikes=(60, 61))
    cut = next(event for event in resumed.events if event.action == "cut")
    restored_step = int(cut.reason.split("restored the snapshot of step ")[1].split()[0])
    assert 41 < restored_step < 60 and not resumed.stopped


def test_a_loop_saved_at_the_top_of_an_epoch_resumes_at_its_first_batch():
    with R8Loop(16, batch_size=4, config=_config(), num_epochs=3) as straight:
        reference = _difficulty_run(straight)
    with R8Loop(16, batch_size=4, config=_config(), num_epochs=3) as first:
        head = []
        epochs = first.epochs()
        for epoch in epochs:
            if epoch == 1:  # epochs() has moved on, batches() not yet
                saved = _through_torch_save(first.state_dict())
                break
            head += _difficulty_run_one_epoch(first)
    with R8Loop(16, batch_size=4, config=_config(), num_epochs=3) as resumed:
        resumed.load_state_dict(saved)
        tail = _difficulty_run(resumed)
    assert len(tail) == 8 and head + tail == reference


def test_a_state_dict_of_another_dataset_or_batch_size_is_refused():
    with R8Loop(96, batch_size=8, config=_config()) as first:
        _difficulty_run(first, stop_after=3)
        saved = first.state_dict()
    with R8Loop(64, batch_size=8, config=_config()) as other, pytest.raises(ValueError, match="96 examples"):
        other.load_state_dict(saved)
    with R8Loop(96, batch_size=4, config=_config()) as other, pytest.raises(ValueError, match="batch_size=8"):
        other.load_state_dict(saved)
