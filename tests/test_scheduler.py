"""`AdaptiveScheduler` outside the Trainer: the same LR trajectory as R8Callback on the same signals,
state round trip, reward-only driving, momentum only where the optimizer has it; torch's `LRScheduler`
contract: SequentialLR and ChainedScheduler, `step(epoch)`, `close()`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.optim.lr_scheduler import ChainedScheduler, ExponentialLR, LinearLR, LRScheduler, SequentialLR
from transformers import Trainer, TrainingArguments

from hf_r8 import AdaptiveScheduler, R8Callback, R8Config
from hf_r8.control.config import MomentumConfig


def _quiet(config: R8Config) -> R8Config:
    config.dashboard = config.run_files = config.report = False
    return config


def _lrs_after_each_step(optimizer: torch.optim.Optimizer, scheduler: AdaptiveScheduler,
                         signals: list[dict[str, float | None]], container: LRScheduler | None = None) -> list[float]:
    """A loop: step, record the LR used, report the signals; with a `container` (a SequentialLR or
    ChainedScheduler holding `scheduler`, or `scheduler` itself), give them with `set_metrics` and step it."""
    used = []
    for signal in signals:
        optimizer.step()
        used.append(optimizer.param_groups[0]["lr"])
        if container is None:
            scheduler.step_loss(signal["loss"], grad_norm=signal["grad_norm"])
        else:
            scheduler.set_metrics(signal["loss"], grad_norm=signal["grad_norm"])
            container.step()
    return used


@pytest.mark.integration
def test_same_lr_trajectory_as_the_callback_on_the_same_signals(model, lm_dataset, tmp_path, monkeypatch):
    from hf_r8.control.engine import Engine

    config = _quiet(R8Config.from_preset("aggressive"))
    callback = R8Callback(config)
    seen = []
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=4,
                             learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                             save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset, callbacks=[callback])
    original_observe = Engine.observe

    def observe_and_record(engine, observation):
        seen.append(observation)
        original_observe(engine, observation)

    monkeypatch.setattr(Engine, "observe", observe_and_record)
    trainer.train()
    monkeypatch.undo()
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert len({round(lr, 12) for lr in logged}) > 2  # the controller did move the LR

    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.zeros(3)
    optimizer = torch.optim.SGD([parameter], lr=3e-3)  # the constant schedule's base LR
    scheduler = AdaptiveScheduler(optimizer, config, total_steps=60)
    signals = [{"loss": observation.loss, "grad_norm": observation.grad_norm} for observation in seen]
    assert [observation.step for observation in seen] == list(range(1, len(seen) + 1))
    assert _lrs_after_each_step(optimizer, scheduler, signals) == pytest.approx(logged[:len(signals)], rel=1e-12)


def _signals(steps: int, seed: int = 0) -> list[dict[str, float | None]]:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(steps, generator=generator).tolist()
    return [{"loss": 5.0 * math.exp(-step / 40) + 0.05 * noise[step], "grad_norm": 1.0 + noise[step]}
            for step in range(steps)]


def test_state_round_trip_continues_the_same_trajectory():
    config = _quiet(R8Config.from_preset("aggressive"))

    def fresh() -> tuple[torch.optim.Optimizer, AdaptiveScheduler]:
        parameter = torch.nn.Parameter(torch.zeros(3))
        parameter.grad = torch.zeros(3)
        optimizer = torch.optim.AdamW([parameter], lr=1e-3)
        return optimizer, AdaptiveScheduler(optimizer, config, total_steps=120)

    signals = _signals(120)
    optimizer, scheduler = fresh()
    straight = _lrs_after_each_step(optimizer, scheduler, signals)
    optimizer, scheduler = fresh()
    first = _lrs_after_each_step(optimizer, scheduler, signals[:50])
    saved_scheduler, saved_optimizer = scheduler.state_dict(), optimizer.state_dict()
    optimizer, scheduler = fresh()
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    assert first + _lrs_after_each_step(optimizer, scheduler, signals[50:]) == straight
    assert len(set(straight)) > 2
    assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]


def test_reward_alone_drives_the_lr_and_momentum_goes_only_where_the_optimizer_has_it():
    config = _quiet(R8Config.from_preset("reward_rl"))
    config.momentum = MomentumConfig(rule="reward")
    weights, plain = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    weights.grad, plain.grad = torch.zeros(3), torch.zeros(3)
    adam = torch.optim.AdamW([weights], lr=1e-3)
    adagrad = torch.optim.Adagrad([plain], lr=1e-3)  # neither betas nor momentum
    schedulers = [AdaptiveScheduler(adam, config), AdaptiveScheduler(adagrad, config)]
    for step in range(80):
        for optimizer, scheduler in zip((adam, adagrad), schedulers, strict=True):
            optimizer.step()
            scheduler.observe(reward=0.1 + step / 100)  # a steadily rising reward, no loss at all
    assert adam.param_groups[0]["lr"] > 1e-3 and adagrad.param_groups[0]["lr"] > 1e-3
    assert adam.param_groups[0]["betas"][0] != 0.9  # the reward momentum rule moved beta1
    assert "momentum" not in adagrad.param_groups[0] and "betas" not in adagrad.param_groups[0]
    assert any(event.rule.startswith("reward") for event in schedulers[0].events)


def test_tensor_and_nan_losses_are_taken_as_they_are():
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.zeros(3)
    optimizer = torch.optim.SGD([parameter], lr=1e-2, momentum=0.9)
    scheduler = AdaptiveScheduler(optimizer, _quiet(R8Config.from_preset("default")), total_steps=100)
    for signal in _signals(30):
        optimizer.step()
        scheduler.step_loss(torch.tensor(signal["loss"]), grad_norm=torch.tensor(signal["grad_norm"]))
    before = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step_loss(torch.tensor(float("nan")))
    optimizer.step()
    assert optimizer.param_groups[0]["lr"] < before  # a NaN loss is a spike: the brake, not a missing value
    assert scheduler.controller.metrics()["nonfinite_losses"] == 1


def _sgd_with_scheduler(config: R8Config, total_steps: int | None = 100) -> tuple[torch.optim.SGD, AdaptiveScheduler]:
    """SGD with momentum on one parameter with a zero gradient (steps move nothing): only the LR is watched."""
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.zeros(3)
    optimizer = torch.optim.SGD([parameter], lr=1e-2, momentum=0.9)
    return optimizer, AdaptiveScheduler(optimizer, config, total_steps=total_steps)


def test_per_example_losses_and_rewards_stand_for_their_mean():
    config = _quiet(R8Config.from_preset("default"))
    trajectories = []
    for per_example in (True, False):
        optimizer, scheduler = _sgd_with_scheduler(config)
        used = []
        for step, signal in enumerate(_signals(100)):
            losses = torch.tensor([signal["loss"] - 0.5, signal["loss"], signal["loss"] + 0.8])
            rewards = torch.tensor([[0.1, 0.3], [step / 50, 0.2]])
            optimizer.step()
            used.append(optimizer.param_groups[0]["lr"])
            if per_example:
                scheduler.step_loss(losses, reward=rewards)
            else:
                scheduler.step_loss(losses.mean(), reward=rewards.mean())
        trajectories.append(used)
    assert trajectories[0] == trajectories[1] and len(set(trajectories[0])) > 2
    optimizer.step()
    scheduler.step_loss(torch.tensor([1.0, float("nan")]))
    optimizer.step()
    assert scheduler.controller.metrics()["nonfinite_losses"] == 1  # one NaN example: a NaN step loss


@pytest.mark.parametrize(("signals", "message"), [
    ({"loss": torch.tensor([])}, r"loss=tensor of 0 values: must be a number, a tensor of one or more values"),
    ({"loss": 1.0, "reward": torch.zeros(0, 2)}, r"reward=tensor of 0 values"),
    ({"loss": 1.0, "grad_norm": torch.ones(2)}, r"grad_norm=tensor of 2 values: must be one value"),
], ids=["empty loss", "empty reward", "two gradient norms"])
def test_an_empty_signal_or_several_gradient_norms_are_refused_before_the_step(signals, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=1e-2)
    scheduler = AdaptiveScheduler(optimizer, _quiet(R8Config.from_preset("default")))
    with pytest.raises(ValueError, match=message):
        scheduler.step_loss(**signals)
    assert scheduler.last_epoch == 0  # refused before the step: the scheduler did not move


def test_a_wrong_optimizer_type_is_refused():
    with pytest.raises(TypeError, match="optimizer=.*must be a torch.optim.Optimizer"):
        AdaptiveScheduler(object())


def test_set_metrics_then_step_is_step_loss():
    config = _quiet(R8Config.from_preset("aggressive"))
    optimizer, scheduler = _sgd_with_scheduler(config)
    direct = _lrs_after_each_step(optimizer, scheduler, _signals(100))
    optimizer, scheduler = _sgd_with_scheduler(config)
    split = _lrs_after_each_step(optimizer, scheduler, _signals(100), container=scheduler)
    assert direct == split and len(set(direct)) > 2


def _regression(lr: float, with_scheduler: bool, steps: int = 300) -> tuple[float, AdaptiveScheduler | None]:
    """A plain PyTorch loop: an MLP fits sum(x**2) from batches of 32; the held-out mean squared error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = AdaptiveScheduler(optimizer, total_steps=steps) if with_scheduler else None
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=data)
        loss = (model(x) - x.pow(2).sum(dim=1, keepdim=True)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step_loss(loss.detach())
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return (model(x) - x.pow(2).sum(dim=1, keepdim=True)).pow(2).mean().item(), scheduler


def test_a_plain_loop_started_100x_too_low_finds_its_way_up():
    plain, _ = _regression(1e-4, with_scheduler=False)
    adapted, scheduler = _regression(1e-4, with_scheduler=True)
    rebase = next(event for event in scheduler.events if event.rule == "range_test")
    # 15 test steps; a loss reaches the scheduler one step later, so the 16th update is the one dropped
    assert rebase.step == 16 and rebase.new_value > 10, rebase.reason
    assert adapted < plain / 5, (adapted, plain)
    assert scheduler.controller.specs[0].initial_gain == rebase.new_value
    restored = AdaptiveScheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4), total_steps=300)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.controller.specs[0].initial_gain == rebase.new_value
    assert restored.get_last_lr() == scheduler.get_last_lr()


def test_sequential_lr_warms_up_with_linear_lr_then_the_scheduler_drives_from_its_milestone():
    config = _quiet(R8Config.from_preset("aggressive"))
    warmup, steps = 10, 150  # 150 steps of its own: the range test runs, from the milestone
    signals = _signals(warmup + steps)
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([parameter], lr=1e-2)
    adaptive = AdaptiveScheduler(optimizer, config, total_steps=steps)
    sequential = SequentialLR(optimizer, [LinearLR(optimizer, start_factor=0.1, total_iters=warmup), adaptive],
                              milestones=[warmup])
    parameter.grad = torch.ones(3)  # the weights move (until the range test drops the gradient at its end)
    weights = []
    optimizer.register_step_post_hook(lambda *_: weights.append(parameter.detach().clone()))
    used = _lrs_after_each_step(optimizer, adaptive, signals, sequential)

    alone = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=1e-2)
    linear, warmup_lrs = LinearLR(alone, start_factor=0.1, total_iters=warmup), []
    for _ in range(warmup):
        alone.step()
        warmup_lrs.append(alone.param_groups[0]["lr"])
        linear.step()
    assert used[:warmup] == warmup_lrs
    assert used[warmup:] == _lrs_after_each_step(*_sgd_with_scheduler(config, steps), signals[warmup:])
    assert len(set(used[warmup:])) > 2
    rebase = next(event for event in adaptive.events if event.rule == "range_test")
    assert not torch.equal(weights[warmup - 1], torch.zeros(3))  # a snapshot taken at construction would differ
    assert torch.equal(weights[warmup + rebase.step - 1], weights[warmup - 1])


def test_after_its_phase_in_sequential_lr_the_scheduler_leaves_the_lr_to_the_next_one():
    config = _quiet(R8Config.from_preset("aggressive"))
    signals = _signals(60)
    optimizer, adaptive = _sgd_with_scheduler(config, total_steps=None)
    sequential = SequentialLR(optimizer, [adaptive, ExponentialLR(optimizer, gamma=0.9)], milestones=[40])
    used = _lrs_after_each_step(optimizer, adaptive, signals, sequential)
    plain = _lrs_after_each_step(*_sgd_with_scheduler(config, total_steps=None), signals[:40])
    assert used[:40] == plain and plain[-1] != 1e-2  # the gain had moved the LR before the milestone
    exponential = [1e-2]  # restarted at base_lrs, then scaled as ExponentialLR scales: to the last bit
    for _ in range(19):
        exponential.append(exponential[-1] * 0.9)
    assert used[40:] == exponential


@pytest.mark.parametrize("adaptive_first", [True, False], ids=["adaptive first", "exponential first"])
def test_in_a_chained_scheduler_the_gain_multiplies_the_lr_the_other_scheduler_sets(adaptive_first):
    config = _quiet(R8Config.from_preset("aggressive"))
    signals = _signals(100)
    optimizer, adaptive = _sgd_with_scheduler(config, total_steps=None)  # no anneal: it reads the schedule
    exponential = ExponentialLR(optimizer, gamma=0.98)
    chained = ChainedScheduler([adaptive, exponential] if adaptive_first else [exponential, adaptive])
    used = _lrs_after_each_step(optimizer, adaptive, signals, chained)
    optimizer.step()
    assert adaptive.get_last_lr() == [optimizer.param_groups[0]["lr"]]  # what the step used
    plain = _lrs_after_each_step(*_sgd_with_scheduler(config, total_steps=None), signals)
    assert len(set(plain)) > 2
    assert used == pytest.approx([lr * 0.98 ** step for step, lr in enumerate(plain)], rel=1e-12)


def test_a_chained_scheduler_saved_as_plain_data_resumes_the_same_trajectory():
    config = _quiet(R8Config.from_preset("aggressive"))
    signals = _signals(100)

    def fresh() -> tuple[torch.optim.Optimizer, AdaptiveScheduler, ChainedScheduler]:
        optimizer, adaptive = _sgd_with_scheduler(config, total_steps=None)
        return optimizer, adaptive, ChainedScheduler([ExponentialLR(optimizer, gamma=0.98), adaptive])

    optimizer, adaptive, chained = fresh()
    straight = _lrs_after_each_step(optimizer, adaptive, signals, chained)
    optimizer, adaptive, chained = fresh()
    first = _lrs_after_each_step(optimizer, adaptive, signals[:40], chained)
    saved_chained, saved_optimizer = json.dumps(chained.state_dict()), optimizer.state_dict()
    optimizer, adaptive, chained = fresh()
    optimizer.load_state_dict(saved_optimizer)
    chained.load_state_dict(json.loads(saved_chained))
    assert first + _lrs_after_each_step(optimizer, adaptive, signals[40:], chained) == straight
    assert len(set(straight)) > 2 and adaptive.events  # the gain moved, and the events came back with the state


def test_step_with_an_epoch_warns_as_torch_does_and_only_restarts_the_schedule_at_base_lrs():
    config = _quiet(R8Config.from_preset("aggressive"))
    signals = _signals(100)
    optimizer, scheduler = _sgd_with_scheduler(config)
    used = []
    for signal in signals:
        optimizer.step()
        used.append(optimizer.param_groups[0]["lr"])
        scheduler.set_metrics(signal["loss"], grad_norm=signal["grad_norm"])
        with pytest.warns(UserWarning, match=r"The epoch parameter in `scheduler.step\(\)`"):
            scheduler.step(epoch=0)
        assert scheduler.last_epoch == 0 and scheduler.get_last_lr() == [1e-2]
    # Alone, the schedule is base_lrs: restarting it changes nothing, and the controller counts its own steps.
    assert used == _lrs_after_each_step(*_sgd_with_scheduler(config), signals)
    assert len(set(used)) > 2


def test_close_removes_the_optimizer_hook_and_refuses_later_steps():
    config = _quiet(R8Config.from_preset("aggressive"))
    optimizer, scheduler = _sgd_with_scheduler(config)
    with scheduler:
        assert len(optimizer._optimizer_step_pre_hooks) == 1
        _lrs_after_each_step(optimizer, scheduler, _signals(40))
    assert not optimizer._optimizer_step_pre_hooks
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.step()
    assert optimizer.param_groups[0]["lr"] == 0.5  # nothing writes the LR any more
    with pytest.raises(RuntimeError, match=r"step\(\): the scheduler is closed"):
        scheduler.step_loss(1.0)
    scheduler.close()


def test_a_state_saved_by_hf_r8_0_1_with_its_six_value_packing_resumes_with_its_signals():
    config = _quiet(R8Config.from_preset("aggressive"))
    optimizer, scheduler = _sgd_with_scheduler(config)
    optimizer.step()
    scheduler.step_loss(2.5, reward=0.75, grad_norm=1.25)
    state = scheduler.state_dict()
    engine = {key: value for key, value in state.pop("engine").items() if key != "version"}
    state = {**{key: value for key, value in state.items() if key != "version"}, **engine}  # unversioned: flat
    loss, has_loss, grad_norm, has_grad_norm, reward, has_reward = state["staged"]["values"][:6]
    state["staged"] = {"step": state["staged"]["step"],  # hf_r8 <= 0.1: no version, its own order
                       "values": [loss, has_loss, reward, has_reward, grad_norm, has_grad_norm]}
    _, resumed = _sgd_with_scheduler(config)
    resumed.load_state_dict(state)
    observation = resumed._stage.take()
    assert (observation.loss, observation.reward, observation.grad_norm) == (2.5, 0.75, 1.25)
