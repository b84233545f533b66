"""The update alignment measured on the device (the hypergradient rule's signal), and the rule in real runs: a
Trainer with `R8Callback` and a hand-written loop with `AdaptiveScheduler`."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from hf_r8 import AdaptiveScheduler, R8Callback, R8Config, R8Loop
from hf_r8.runtime.update_alignment import update_alignment
from tests.trainer_setup import training_args

HYPERGRADIENT_ONLY = {"rules": ["hypergradient"], "range_test": {"enabled": False}, "anneal": {"enabled": False},
                      "rollback": {"enabled": False}}


def quadratic_step(optimizer: torch.optim.Optimizer, weight: torch.nn.Parameter) -> None:
    """One step on loss = |w|^2 / 2 (gradient w)."""
    optimizer.zero_grad()
    (0.5 * weight.pow(2).sum()).backward()
    optimizer.step()


def gradient_now(weight: torch.nn.Parameter) -> None:
    weight.grad = None
    (0.5 * weight.pow(2).sum()).backward()


def test_it_is_the_cosine_of_the_gradient_with_adams_last_update():
    torch.manual_seed(0)
    first, second = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.AdamW([{"params": [first]}, {"params": [second], "eps": 1e-3}], lr=1e-2)
    for weight in (first, second):
        weight.grad = torch.randn_like(weight)
    assert update_alignment(optimizer) is None  # no update yet
    optimizer.step()
    grads = [torch.randn_like(first), torch.randn_like(second)]
    first.grad, second.grad = grads
    directions = [optimizer.state[weight]["exp_avg"] / (optimizer.state[weight]["exp_avg_sq"].sqrt() + eps)
                  for weight, eps in ((first, 1e-8), (second, 1e-3))]
    expected = torch.nn.functional.cosine_similarity(torch.cat([g.reshape(-1) for g in grads]),
                                                     torch.cat([d.reshape(-1) for d in directions]), dim=0)
    assert update_alignment(optimizer).item() == pytest.approx(expected.item(), rel=1e-5)


def test_its_sign_says_whether_the_last_step_fell_short_or_overshot():
    for lr, sign in ((1e-3, 1.0), (3.0, -1.0)):  # |w| = 1: a step of ~lr either keeps w's sign or flips it
        weight = torch.nn.Parameter(torch.ones(4))
        optimizer = torch.optim.Adam([weight], lr=lr)
        quadratic_step(optimizer, weight)
        gradient_now(weight)
        assert update_alignment(optimizer).item() == pytest.approx(sign, abs=1e-3)


def test_sgd_is_measured_against_its_momentum_and_plain_sgd_not_at_all():
    weight = torch.nn.Parameter(torch.ones(4))
    with_momentum = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    quadratic_step(with_momentum, weight)
    gradient_now(weight)
    assert update_alignment(with_momentum).item() == pytest.approx(1.0, abs=1e-6)
    plain = torch.optim.SGD([weight], lr=0.1)
    quadratic_step(plain, weight)
    gradient_now(weight)
    assert update_alignment(plain) is None


@pytest.mark.integration
def test_a_trainer_run_started_far_too_low_raises_its_lr(model, lm_dataset, tmp_path):
    r8 = R8Callback(R8Config.from_dict(HYPERGRADIENT_ONLY))
    trainer = Trainer(model=model, args=training_args(tmp_path, learning_rate=1e-6, max_steps=40),
                      train_dataset=lm_dataset, callbacks=[r8])
    trainer.train()
    rule = r8.controller.group_rules[0]["hypergradient"]
    assert len(rule.alignments) == rule.config.hypergradient.window and all(-1 <= a <= 1 for a in rule.alignments)
    ups = [event for event in r8.events if event.action == "hypergradient_up"]
    assert ups and r8.controller.lr_gain(0) > 1.0
    assert [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry][-1] > 1e-6


def test_a_hand_written_loop_measures_it_in_the_schedulers_optimizer_hook():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16))
    optimizer = torch.optim.AdamW([weight], lr=1e-5)
    scheduler = AdaptiveScheduler(optimizer, R8Config.from_dict(HYPERGRADIENT_ONLY), total_steps=60)
    for _ in range(60):
        optimizer.zero_grad()
        loss = 0.5 * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
        scheduler.step_loss(loss)
    assert any(event.action == "hypergradient_up" for event in scheduler.events)
    assert optimizer.param_groups[0]["lr"] > 1e-5


def test_an_optimizer_with_nothing_to_measure_against_is_said_once(caplog):
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = AdaptiveScheduler(optimizer, R8Config.from_dict(HYPERGRADIENT_ONLY), total_steps=10)
    with caplog.at_level("WARNING", logger="hf_r8"):
        for _ in range(4):
            quadratic_step(optimizer, weight)
            scheduler.step_loss(0.5 * float(weight.detach().pow(2).sum()))
    said = [record.getMessage() for record in caplog.records if "hypergradient" in record.getMessage()]
    assert said == ["hf_r8: the hypergradient rule holds the gain: SGD keeps no Adam moments or momentum buffer to "
                    "measure the update alignment against"]
    assert scheduler.controller.lr_gain(0) == 1.0


def test_r8_loop_refuses_the_rule_it_cannot_feed():
    with pytest.raises(ValueError, match="rules: 'hypergradient' reads the optimizer's last update"):
        R8Loop(num_samples=8, batch_size=2, config=R8Config.from_dict(HYPERGRADIENT_ONLY))
