"""The control law, driven by hand-made loss / grad-norm / reward sequences with exact expectations."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_r8.control.config import (
    BlendConfig,
    BoundsConfig,
    CyclicalConfig,
    DecisionConfig,
    ExplorationConfig,
    GradNormConfig,
    LossDecayConfig,
    MoEConfig,
    MomentumConfig,
    PlateauConfig,
    R8Config,
    RewardConfig,
    SignalConfig,
    TrendConfig,
    VarianceConfig,
)
from hf_r8.control.controller import Controller, GroupSpec, Observation
from hf_r8.control.rules import Proposal, blend

BASE_LR = 1e-3


def make(rules, *, groups=None, window=5, shift=0.0, **sections) -> Controller:
    """A controller with fixed weights (shift 0) unless a test is about blending."""
    config = R8Config(rules=rules, signals=sections.pop("signals", SignalConfig(window=window)),
                      blend=sections.pop("blend", BlendConfig(stability_shift=shift)), **sections)
    return Controller(config, groups or [GroupSpec(BASE_LR, momentum=0.9)], total_steps=1000)


def feed(controller, losses=None, grad_norms=None, rewards=None, start=1):
    """Observe a sequence; returns the gain of group 0 after each step, and all events."""
    length = len(next(seq for seq in (losses, grad_norms, rewards) if seq is not None))
    gains, events = [], []
    for offset in range(length):
        events += controller.observe(Observation(
            start + offset,
            loss=None if losses is None else losses[offset],
            grad_norm=None if grad_norms is None else grad_norms[offset],
            reward=None if rewards is None else rewards[offset],
        ))
        gains.append(controller.lr_gain(0))
    return gains, events


def test_all_rules_off_is_the_identity():
    controller = make([])
    feed(controller, losses=[5.0, 1.0, float("nan"), 100.0, 3.0] * 10, grad_norms=[1.0, 50.0] * 25)
    for schedule_lr in (0.0, 1e-7, 3e-4, BASE_LR):
        assert controller.compose_lr(0, schedule_lr) == schedule_lr
    assert controller.momentum(0) is None


def test_trend_rule_multiplies_by_up_then_down():
    controller = make(["trend"], signals=SignalConfig(window=5, ema_beta=0.5))
    gains, events = feed(controller, losses=[4.0, 2.0, 3.0, 3.0])
    # step 2: EMA 4 -> 3 (improved) x1.02; step 3: EMA 3 -> 3 x0.98; step 4: again x0.98.
    assert gains == pytest.approx([1.0, 1.02, 1.02 * 0.98, 1.02 * 0.98 * 0.98], rel=1e-12)
    assert [event.action for event in events] == ["trend_up", "trend_down"]


def test_variance_rule_damps_by_relative_variance():
    controller = make(["variance"], variance=VarianceConfig(base=1.0, scale=4.0))
    gains, _ = feed(controller, losses=[1.0, 3.0])
    # rolling window [1, 3]: mean 2, std 1, cv 0.5 -> 1 / (1 + 4 * 0.25) = 0.5
    assert gains == pytest.approx([1.0, 0.5], rel=1e-12)


def test_loss_decay_rule():
    controller = make(["loss_decay"], loss_decay=LossDecayConfig(k=0.1))
    gains, _ = feed(controller, losses=[10.0])
    assert gains == pytest.approx([1.0 / (1.0 + 0.1 * 10.0)], rel=1e-12)


def test_grad_norm_rule_shrinks_on_jump_and_respects_cooldown():
    controller = make(["grad_norm"], grad_norm=GradNormConfig(min_samples=3, jump_ratio=2.5, shrink_factor=0.8,
                                                              cooldown_steps=10))
    gains, events = feed(controller, grad_norms=[1.0, 1.0, 1.0, 5.0, 5.0])
    assert gains == pytest.approx([1.0, 1.0, 1.0, 0.8, 0.8], rel=1e-12)
    assert [event.action for event in events] == ["grad_norm_jump"]


def test_grad_norm_rule_with_jump_steps_2_waits_for_jumps_in_a_row():
    """Once most examples are fit, a batch holding one that is not has a norm several times the average: with
    jump_steps 2 such a batch alone does not shrink the gain, the next batch's norm jumping as well does."""
    norms = [1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 6.0, 1.0]
    single = GradNormConfig(min_samples=3, jump_ratio=2.5, cooldown_steps=0)
    _, events = feed(make(["grad_norm"], grad_norm=single), grad_norms=norms)
    assert [event.step for event in events] == [4, 7]  # by default every outlying batch shrinks
    in_a_row = GradNormConfig(min_samples=3, jump_ratio=2.5, cooldown_steps=0, jump_steps=2)
    gains, events = feed(make(["grad_norm"], grad_norm=in_a_row), grad_norms=norms)
    assert events == [] and gains == [1.0] * len(norms)
    gains, events = feed(make(["grad_norm"], grad_norm=in_a_row), grad_norms=[1.0, 1.0, 1.0, 5.0, 5.0])
    assert gains == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.8], rel=1e-12)
    assert events[0].reason.endswith("on 2 steps in a row")


def test_a_shrink_no_other_jump_confirms_is_undone_exactly():
    """One outlying batch: the shrink acts at once, and comes back once confirm_steps steps pass without a jump."""
    provisional = GradNormConfig(min_samples=3, jump_ratio=2.5, shrink_factor=0.8, cooldown_steps=0, confirm_steps=3)
    gains, events = feed(make(["grad_norm"], grad_norm=provisional), grad_norms=[1.0, 1.0, 1.0, 5.0] + [1.0] * 4)
    assert gains == pytest.approx([1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 1.0, 1.0], rel=1e-12)
    assert [(event.step, event.action) for event in events] == [(4, "grad_norm_jump"), (7, "grad_norm_jump_undone")]
    assert "one outlying batch" in events[1].reason


def test_a_shrink_another_jump_confirms_is_kept():
    """Jumps that recur say the LR is too high: the first shrink stays, the last one, followed by none, is given
    back; a jump inside the cooldown confirms without shrinking again."""
    provisional = GradNormConfig(min_samples=3, jump_ratio=2.5, shrink_factor=0.8, cooldown_steps=1, confirm_steps=3)
    norms = [1.0, 1.0, 1.0, 5.0, 6.0, 1.0, 1.0, 1.0, 1.0]
    gains, events = feed(make(["grad_norm"], grad_norm=provisional), grad_norms=norms)
    assert gains == pytest.approx([1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], rel=1e-12)
    assert [event.action for event in events] == ["grad_norm_jump"]
    norms = [1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 9.0, 1.0, 1.0, 1.0, 1.0]
    gains, events = feed(make(["grad_norm"], grad_norm=provisional), grad_norms=norms)
    assert gains[-1] == pytest.approx(0.8, rel=1e-12)
    assert [(event.step, event.action) for event in events] == [
        (4, "grad_norm_jump"), (7, "grad_norm_jump"), (10, "grad_norm_jump_undone")]


def test_a_provisional_shrink_is_not_blended_so_its_undo_restores_the_gain():
    """With the stability shift on, a blended shrink would weigh more in an unstable run than its undo does later."""
    provisional = GradNormConfig(min_samples=3, jump_ratio=2.5, shrink_factor=0.8, cooldown_steps=0, confirm_steps=2)
    controller = make(["grad_norm"], grad_norm=provisional, shift=0.5)
    gains, _ = feed(controller, losses=[5.0, 1.0, 5.0, 1.0, 5.0, 1.0], grad_norms=[1.0, 1.0, 1.0, 5.0, 1.0, 1.0])
    assert gains == pytest.approx([1.0, 1.0, 1.0, 0.8, 0.8, 1.0], rel=1e-12)


def test_confirm_steps_0_keeps_every_shrink():
    kept = GradNormConfig(min_samples=3, jump_ratio=2.5, shrink_factor=0.8, cooldown_steps=0, confirm_steps=0)
    gains, events = feed(make(["grad_norm"], grad_norm=kept), grad_norms=[1.0, 1.0, 1.0, 5.0] + [1.0] * 40)
    assert gains[-1] == pytest.approx(0.8, rel=1e-12) and len(events) == 1


def test_a_grad_norm_rule_state_saved_before_jumps_were_counted_or_shrinks_confirmed_loads():
    controller = make(["grad_norm"])
    state = json.loads(json.dumps(controller.state_dict()))
    del state["groups"][0]["rules"]["grad_norm"]["jumps_in_row"]
    del state["groups"][0]["rules"]["grad_norm"]["collapses_in_row"]
    del state["groups"][0]["rules"]["grad_norm"]["unconfirmed_for"]
    restored = make(["grad_norm"])
    restored.load_state_dict(state)
    assert restored.state_dict() == controller.state_dict()


def test_grad_norm_rule_grows_when_the_norm_level_collapses_for_collapse_steps_in_a_row():
    config = GradNormConfig(min_samples=3, collapse_ratio=0.3, collapse_steps=3, grow_factor=1.1, cooldown_steps=0)
    gains, events = feed(make(["grad_norm"], grad_norm=config), grad_norms=[1.0, 1.0, 1.0] + [0.01] * 3)
    # logs: fast EMA (beta .5) -2.30, -3.45, -4.03; slow (beta .95) -0.23, -0.45, -0.63; ln 0.3 = -1.20:
    # a collapse at steps 4, 5 and 6, the third in a row grows
    assert gains == pytest.approx([1.0] * 5 + [1.1], rel=1e-12)
    assert events[0].action == "grad_norm_collapse" and "on 3 steps in a row" in events[0].reason
    one_small_batch = feed(make(["grad_norm"], grad_norm=config), grad_norms=[1.0, 1.0, 1.0, 0.01] + [1.0] * 20)
    assert one_small_batch[1] == []


def test_a_jump_does_not_make_the_typical_batches_after_it_a_collapse():
    """A plain slow EMA takes a jump at its size: 200 lifted it to 10.95, and the norms of 1 after it read as a
    collapse from step 18 on (fast EMA 1.78 < 0.3 x 7.95). The geometric mean takes it at its log: x1.30."""
    config = GradNormConfig(min_samples=3, collapse_steps=1, cooldown_steps=0, confirm_steps=0)
    _, events = feed(make(["grad_norm"], grad_norm=config), grad_norms=[1.0] * 10 + [200.0] + [1.0] * 30)
    assert [event.action for event in events] == ["grad_norm_jump"]


def test_a_controller_state_saved_before_geometric_means_loads_with_them_fresh():
    controller = make(["grad_norm"])
    feed(controller, grad_norms=[1.0, 2.0] * 10)
    state = json.loads(json.dumps(controller.state_dict()))
    del state["grad_log_fast"], state["grad_log_slow"]
    restored = make(["grad_norm"])
    restored.load_state_dict(state)
    assert restored.grad_log_fast.count == restored.grad_log_slow.count == 0
    assert restored.grad_slow.state_dict() == controller.grad_slow.state_dict()


def test_cyclical_rule_follows_cosine_warm_restarts():
    controller = make(["cyclical"], cyclical=CyclicalConfig(T0=4, T_mult=2, eta_min_scale=0.1))
    gains, _ = feed(controller, losses=[1.0] * 6)

    def level(position, length):
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * position / length))

    expected = [level(0, 4), level(1, 4), level(2, 4), level(3, 4), level(0, 8), level(1, 8)]
    assert gains == pytest.approx(expected, rel=1e-12)


def improving_losses(steps, rate_per_step=0.02):
    return [10.0 * (1.0 - rate_per_step) ** t for t in range(steps)]


def test_decision_engine_increases_on_steady_improvement_with_cooldown():
    controller = make(["decision"])
    gains, events = feed(controller, losses=improving_losses(30))
    # the first window (step 5) falls without noise: certain -> INCREASE; cooldown of 20 steps; INCREASE at 25
    assert [(event.step, event.action) for event in events] == [(5, "increase"), (25, "increase")]
    assert gains[4] == pytest.approx(1.1, rel=1e-12)
    assert gains[-1] == pytest.approx(1.1 ** 2, rel=1e-12)
    assert all(event.reason.startswith("improving") for event in events)


def test_a_small_but_certain_fall_increases_only_with_significance_on():
    losses = [10.0 - 0.001 * t for t in range(10)]  # 0.05% per window: far below increase_threshold
    with_t = make(["decision"])
    assert [event.action for event in feed(with_t, losses=losses)[1]] == ["increase"]
    without_t = make(["decision"], decision=DecisionConfig(significant_fall_t=None))
    assert feed(without_t, losses=losses)[1] == []


def test_decision_engine_decreases_after_plateau_patience():
    controller = make(["decision"], decision=DecisionConfig(patience_windows=2))
    gains, events = feed(controller, losses=[3.0, 3.01] * 20)
    # plateau windows at 10 and 15 -> DECREASE at 15; cooldown holds 20..30; plateau at 35, 40 -> DECREASE
    assert [(event.step, event.action) for event in events] == [(15, "decrease"), (40, "decrease")]
    assert gains[-1] == pytest.approx(0.7 ** 2, rel=1e-12)


def test_decision_engine_brakes_on_a_single_step_spike():
    controller = make(["decision"])
    gains, events = feed(controller, losses=[1.0, 1.02] * 10 + [3.0])
    assert events[-1].action == "spike_decrease" and events[-1].step == 21
    assert gains[-1] == pytest.approx(0.5 * gains[-2], rel=1e-12)


def test_decision_engine_with_spike_steps_2_brakes_on_spikes_in_a_row_not_on_one():
    controller = make(["decision"], window=50,  # no window closes: the single-step brake alone
                      decision=DecisionConfig(spike_steps=2))
    gains, events = feed(controller, losses=[1.0, 1.02] * 10 + [3.0] + [1.0, 1.02] * 3 + [3.0, 6.0])
    brakes = [event for event in events if event.action == "spike_decrease"]
    assert [event.step for event in brakes] == [29]  # step 21 alone was one batch; 28 and 29 are the weights
    assert brakes[0].reason.startswith("loss spike (2 in a row)")
    assert gains[-1] == pytest.approx(0.5 * gains[-2], rel=1e-12)


def test_nan_loss_brakes_but_never_enters_the_statistics():
    controller = make(["decision", "variance"])
    feed(controller, losses=[2.0, 2.1] * 5)
    ema_before = controller.loss.ema.value
    window_before = list(controller.loss.rolling)
    gains, events = feed(controller, losses=[float("nan"), float("inf")], start=11)
    assert controller.loss.ema.value == ema_before
    assert list(controller.loss.rolling) == window_before
    assert controller.loss.nonfinite_count == 2
    assert events[0].action == "spike_decrease" and events[0].reason == "non-finite loss"
    assert all(math.isfinite(gain) and gain > 0 for gain in gains)


def test_warmup_hands_off_to_adaptation():
    config = R8Config(rules=["trend"], blend=BlendConfig(stability_shift=0.0), signals=SignalConfig(window=5))
    controller = Controller(config, [GroupSpec(BASE_LR)], total_steps=100, warmup_steps=10)
    gains, _ = feed(controller, losses=improving_losses(15))
    assert gains[:10] == [1.0] * 10
    assert gains[10] == pytest.approx(1.02, rel=1e-12)


def test_gain_and_lr_stay_within_bounds():
    controller = make(["trend"], trend=TrendConfig(up_factor=1.5), bounds=BoundsConfig(lr_max=4e-3))
    gains, _ = feed(controller, losses=improving_losses(50, 0.05))
    assert max(gains) == pytest.approx(4.0)
    assert controller.compose_lr(0, BASE_LR) == pytest.approx(4e-3)


def test_auto_bounds_are_base_over_100_and_base_times_20():
    controller = make([])
    assert controller.lr_bounds(0) == pytest.approx((BASE_LR / 100, BASE_LR * 20))
    assert controller.gain_bounds[0] == pytest.approx((0.01, 20.0))


def test_rate_limit_caps_each_step():
    controller = make(["trend"], trend=TrendConfig(up_factor=3.0), bounds=BoundsConfig(max_change_per_step=0.25))
    gains, _ = feed(controller, losses=[4.0, 2.0])
    assert gains[-1] == pytest.approx(1.25, rel=1e-12)


def test_compose_never_lifts_the_schedule_above_itself_below_the_floor():
    controller = make([])
    assert controller.compose_lr(0, 1e-6) == 1e-6  # warmup start stays the schedule's
    controller.groups[0].lr_gain = 0.01
    assert controller.compose_lr(0, 1e-4) == pytest.approx(1e-5)  # the gain may not push below lr_min


def test_moe_router_groups_get_gentler_factors_and_tighter_bounds():
    groups = [GroupSpec(BASE_LR), GroupSpec(BASE_LR, is_router=True)]
    controller = make(["decision"], groups=groups, moe=MoEConfig(enabled=True))
    feed(controller, losses=improving_losses(10))
    assert controller.lr_gain(0) == pytest.approx(1.1, rel=1e-12)
    assert controller.lr_gain(1) == pytest.approx(1.05, rel=1e-12)
    assert controller.gain_bounds[1] == pytest.approx((0.1, 2.0))
    assert controller.gain_bounds[0] == pytest.approx((0.01, 20.0))


def test_moe_profile_covers_every_group_when_no_router_group_exists():
    controller = make(["decision"], groups=[GroupSpec(BASE_LR), GroupSpec(BASE_LR)], moe=MoEConfig(enabled=True))
    feed(controller, losses=improving_losses(10))
    assert controller.lr_gain(0) == controller.lr_gain(1) == pytest.approx(1.05, rel=1e-12)


@pytest.mark.parametrize(
    ("rule", "losses", "expected"),
    [
        ("inverse", [1.0], 0.5),
        ("exp", [1.0], 1.0 - math.exp(-1.0)),
        ("normalized", [1.0, 3.0], 0.5),
        ("normalized", [2.0, 2.0], 0.9),
    ],
)
def test_loss_driven_momentum_rules(rule, losses, expected):
    momentum = MomentumConfig(rule=rule, min=0.5 if rule == "normalized" else 0.0,
                              max=0.9 if rule == "normalized" else 0.999)
    controller = make([], momentum=momentum)
    feed(controller, losses=losses)
    assert controller.momentum(0) == pytest.approx(expected, rel=1e-12)


def test_relative_momentum_rises_with_window_improvement():
    controller = make([], window=2, momentum=MomentumConfig(rule="relative", relative_gain=0.1))
    feed(controller, losses=[2.0, 2.0, 1.0, 1.0])
    assert controller.momentum(0) == pytest.approx(0.9 * (1 + 0.1 * 0.5), rel=1e-12)


def test_reward_momentum_goes_up_then_down():
    controller = make([], momentum=MomentumConfig(rule="reward"), reward=RewardConfig(trend_window=4))
    feed(controller, rewards=[0.0, 1.0, 2.0, 3.0])  # the trend test starts with the 4th reward
    assert controller.momentum(0) == pytest.approx(0.91, rel=1e-12)
    feed(controller, rewards=[2.0, 1.0], start=5)  # windows 1,2,3,2 and 2,3,2,1: no clear slope, momentum holds
    assert controller.momentum(0) == pytest.approx(0.91, rel=1e-12)
    feed(controller, rewards=[0.0, -1.0], start=7)  # 3,2,1,0 and 2,1,0,-1: falling
    assert controller.momentum(0) == pytest.approx(0.91 * 0.99 * 0.99, rel=1e-12)


def test_momentum_is_never_written_to_an_optimizer_without_one():
    controller = make([], groups=[GroupSpec(BASE_LR, momentum=None)], momentum=MomentumConfig(rule="inverse"))
    feed(controller, losses=[1.0, 2.0])
    assert controller.momentum(0) is None


@pytest.mark.parametrize(("reward", "expected"), [(0.0, 1.0), (0.5, 1.5), (1.0, 2.0), (3.0, 2.0), (-1.0, 0.01)])
def test_reward_scaling_maps_center_plus_minus_span_to_0_and_2x(reward, expected):
    controller = make([], reward=RewardConfig(rules=["scaling"], ema_beta=0.0, center=0.0, span=1.0))
    gains, _ = feed(controller, rewards=[reward])  # no loss at all: reward alone drives the LR
    assert gains[-1] == pytest.approx(expected, rel=1e-12)


def test_reward_trend_acts_on_significant_slopes_only():
    trend = make([], reward=RewardConfig(rules=["trend"], up_factor=1.03, down_factor=0.9, trend_window=4))
    gains, events = feed(trend, rewards=[0.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0])
    # Rising from the 4th reward (the first full test) while the window's slope is clear, then flat: hold.
    assert gains == pytest.approx([1.0, 1.0, 1.0, 1.03, 1.03**2, 1.03**3, 1.03**3, 1.03**3], rel=1e-12)
    gains, events2 = feed(trend, rewards=[3.0, 2.0, 1.0, 0.0], start=9)
    assert gains == pytest.approx([1.03**3, 1.03**3 * 0.9, 1.03**3 * 0.9**2, 1.03**3 * 0.9**3], rel=1e-12)
    # An event marks each change of direction; the factor applies every step.
    assert [event.action for event in events + events2] == ["reward_up", "reward_down"]
    assert "standard errors above flat over the last 4 rewards" in events[0].reason


def test_reward_trend_ignores_a_noisy_flat_reward():
    trend = make([], reward=RewardConfig(rules=["trend"], trend_window=16))
    gains, events = feed(trend, rewards=[0.3 + 0.2 * (-1) ** i for i in range(40)])
    assert gains[-1] == 1.0 and events == []


def test_reward_variance_rule():
    variance = make([], reward=RewardConfig(rules=["variance"], ema_beta=0.5, span=1.0, variance_scale=1.0))
    gains, _ = feed(variance, rewards=[0.0, 2.0])
    assert gains[-1] == pytest.approx(0.5, rel=1e-12)  # var([0, 2]) = 1


def test_reward_ema_smoothing():
    controller = make([], reward=RewardConfig(rules=["scaling"], ema_beta=0.5))
    feed(controller, rewards=[1.0, 0.0])
    assert controller.reward.ema.value == pytest.approx(0.5)
    assert controller.lr_gain(0) == pytest.approx(1.5, rel=1e-12)


def test_exploration_sigma_rises_on_plateau_and_falls_on_instability():
    plateau = make([], exploration=ExplorationConfig(enabled=True, sigma_init=1e-3))
    _, events = feed(plateau, losses=[2.0] * 10)
    assert plateau.sigma == pytest.approx(1.5e-3, rel=1e-12)
    assert events[-1].quantity == "sigma" and "plateau" in events[-1].reason
    unstable = make([], exploration=ExplorationConfig(enabled=True, sigma_init=1e-3))
    feed(unstable, losses=[1.0, 10.0] * 5)
    assert unstable.sigma == pytest.approx(1e-3 * 0.5 * 0.5, rel=1e-12)  # two unstable windows
    capped = make([], exploration=ExplorationConfig(enabled=True, sigma_init=8e-3, sigma_max=1e-2))
    feed(capped, losses=[2.0] * 30)
    assert capped.sigma == 1e-2


def test_blend_shifts_weight_toward_damping_when_unstable():
    proposals = [Proposal("trend", 1.1), Proposal("variance", 0.9)]
    config = BlendConfig(stability_shift=0.5)
    unstable = math.exp(0.5 * math.log(1.1) + 1.5 * math.log(0.9))
    stable = math.exp(1.5 * math.log(1.1) + 0.5 * math.log(0.9))
    assert blend(proposals, config, instability=1.0) == pytest.approx(unstable)
    assert blend(proposals, config, instability=0.0) == pytest.approx(stable)
    assert blend(proposals, config, instability=0.5) == pytest.approx(1.1 * 0.9)
    weighted = BlendConfig(stability_shift=0.0, weights={"trend": 2.0})
    assert blend(proposals, weighted, instability=0.3) == pytest.approx(1.1 ** 2 * 0.9)
    brake = [Proposal("decision", 0.5, blendable=False)]
    assert blend(brake, config, instability=0.0) == pytest.approx(0.5)


def test_several_rules_active_at_once_blend_in_log_space():
    controller = make(["trend", "variance"], signals=SignalConfig(window=5, ema_beta=0.5),
                      variance=VarianceConfig(scale=4.0))
    gains, _ = feed(controller, losses=[3.0, 1.0])
    # trend x1.02 (EMA 3 -> 2) times variance level 1/(1 + 4 * 0.25)
    assert gains[-1] == pytest.approx(1.02 * 0.5, rel=1e-12)


def test_state_dict_round_trips_exactly_through_json():
    def build():
        return make(["decision", "trend", "grad_norm", "plateau", "cyclical", "variance"], shift=0.5,
                    momentum=MomentumConfig(rule="normalized"), exploration=ExplorationConfig(enabled=True),
                    reward=RewardConfig(rules=["trend", "scaling"]))

    losses = [5.0 * 0.98 ** t + 0.1 * (t % 3) for t in range(60)]
    grads = [1.0 + 0.3 * (t % 4) for t in range(60)]
    rewards = [0.01 * t for t in range(60)]
    original = build()
    feed(original, losses[:30], grads[:30], rewards[:30])
    restored = build()
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.state_dict() == original.state_dict()
    gains_a, events_a = feed(original, losses[30:], grads[30:], rewards[30:], start=31)
    gains_b, events_b = feed(restored, losses[30:], grads[30:], rewards[30:], start=31)
    assert gains_a == gains_b and events_a == events_b
    assert restored.state_dict() == original.state_dict()


def test_load_state_dict_rejects_a_different_optimizer():
    state = make([]).state_dict()
    other = make([], groups=[GroupSpec(BASE_LR), GroupSpec(BASE_LR)])
    with pytest.raises(ValueError, match="parameter groups"):
        other.load_state_dict(state)


every_rule = R8Config(
    rules=["decision", "trend", "variance", "loss_decay", "grad_norm", "cyclical", "plateau"],
    reward=RewardConfig(rules=["scaling", "trend", "variance"]),
    exploration=ExplorationConfig(enabled=True),
    signals=SignalConfig(window=4),
    plateau=PlateauConfig(patience=3, cooldown=1),
    grad_norm=GradNormConfig(min_samples=2, cooldown_steps=0),
    cyclical=CyclicalConfig(T0=5),
)
wild = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                 st.floats(min_value=-1e12, max_value=1e12), st.sampled_from([0.0, -1.0, 1e300, -1e300]))


@settings(max_examples=150, deadline=None)
@given(signals=st.lists(st.tuples(wild, wild, wild), min_size=1, max_size=80),
       momentum_rule=st.sampled_from(["inverse", "exp", "relative", "normalized", "reward"]),
       router=st.booleans())
def test_gains_and_momentum_stay_bounded_for_any_signals(signals, momentum_rule, router):
    config = replace(every_rule, momentum=MomentumConfig(rule=momentum_rule, min=0.1, max=0.95),
                     moe=MoEConfig(enabled=router))
    controller = Controller(config, [GroupSpec(BASE_LR, 0.9), GroupSpec(BASE_LR, None, is_router=True)],
                            total_steps=200)
    for step, (loss, grad_norm, reward) in enumerate(signals, start=1):
        controller.observe(Observation(step, loss, grad_norm, reward))
        for index in range(2):
            gain_min, gain_max = controller.gain_bounds[index]
            gain = controller.lr_gain(index)
            assert math.isfinite(gain) and gain_min <= gain <= gain_max
            lr = controller.compose_lr(index, BASE_LR)
            lr_min, lr_max = controller.lr_bounds(index)
            assert math.isfinite(lr) and lr_min <= lr <= lr_max
        momentum = controller.momentum(0)
        assert momentum is not None and math.isfinite(momentum) and 0.1 <= momentum <= 0.95
        assert controller.momentum(1) is None
        assert 1e-5 <= controller.sigma <= 1e-2


def test_plateau_rule_drops_after_patience_then_cools_down():
    controller = make(["plateau"], plateau=PlateauConfig(patience=3, big_drop=0.5, cooldown=2, min_rel_improve=1e-3),
                      signals=SignalConfig(window=5, ema_beta=0.0))
    gains, events = feed(controller, losses=[2.0] * 10)
    # best set at step 1; steps 2-4 bring no new best -> drop at 4; 5-6 cool down; 7-9 -> drop at 9
    assert [event.step for event in events] == [4, 9]
    assert gains[3] == pytest.approx(0.5) and gains[-1] == pytest.approx(0.25)
    assert events[0].action == "plateau_drop"


def test_kl_above_its_limit_brakes_and_stops_the_reward_trend_raising_the_lr():
    controller = make([], reward=RewardConfig(rules=["trend"], up_factor=1.05, down_factor=0.9, trend_window=4,
                                              kl_limit=0.5))
    gains, events = [], []
    for step, (reward, kl) in enumerate([(0.0, 0.1), (1.0, 0.1), (2.0, 0.1), (3.0, 0.2), (4.0, 0.6), (5.0, 0.7),
                                         (6.0, 0.3)], start=1):
        events += controller.observe(Observation(step, reward=reward, kl=kl))
        gains.append(controller.lr_gain(0))
    # Rising reward lifts the gain at step 4; over the KL limit (steps 5-6) it is braked instead; then it rises again.
    assert gains == pytest.approx([1.0, 1.0, 1.0, 1.05, 1.05 * 0.9, 1.05 * 0.81, 1.05**2 * 0.81], rel=1e-12)
    assert [event.action for event in events] == ["reward_up", "kl_brake"]
    assert events[1].reason == "KL 0.6 above reward.kl_limit=0.5"


def test_rising_router_aux_loss_damps_router_groups_only():
    controller = make([], groups=[GroupSpec(BASE_LR), GroupSpec(BASE_LR, is_router=True)],
                      moe=MoEConfig(aux_loss_rise=0.05, aux_loss_cooldown_steps=5, decrease_factor=0.85))
    events = []
    for step in range(1, 21):  # balanced routing: a flat aux loss, nothing happens
        events += controller.observe(Observation(step, router_aux_loss=2.0))
    assert events == [] and controller.lr_gain(1) == 1.0
    for step in range(21, 31):  # imbalance grows: the router group is damped, at most once per cooldown
        events += controller.observe(Observation(step, router_aux_loss=2.0 + 0.2 * (step - 20)))
    damps = [event for event in events if event.action == "router_damp"]
    assert damps and all(event.group == 1 for event in damps)
    assert [b.step - a.step for a, b in zip(damps, damps[1:], strict=False)] == [5] * (len(damps) - 1)
    assert controller.lr_gain(1) == pytest.approx(0.85 ** len(damps), rel=1e-12) and controller.lr_gain(0) == 1.0
    assert "above its slow EMA" in damps[0].reason
    restored = make([], groups=[GroupSpec(BASE_LR), GroupSpec(BASE_LR, is_router=True)],
                    moe=MoEConfig(aux_loss_rise=0.05, aux_loss_cooldown_steps=5))
    restored.load_state_dict(controller.state_dict())
    assert restored.aux_slow.value == controller.aux_slow.value and restored.groups[1] == controller.groups[1]
    assert restored.state_dict() == controller.state_dict()
    # Up to hf_r8 0.3 the cooldown was a field of the group, not the state of a rule.
    older = controller.state_dict()
    rule_state = older["groups"][1]["rules"].pop("moe_aux_loss")
    older["groups"][1]["steps_since_aux_rule"] = rule_state["steps_since_damp"]
    restored.load_state_dict(older)
    assert restored.group_rules[1]["moe_aux_loss"].steps_since_damp == rule_state["steps_since_damp"]
    assert "moe_aux_loss" not in restored.group_rules[0]  # a router rule, in router groups only


# The flat layout of a parameter group in version 1 of the controller state, before the rules were classes.
VERSION_1_GROUP_KEYS = {"running_gain", "lr_gain", "momentum", "engine", "steps_since_grad_rule", "plateau_best",
                        "plateau_steps", "plateau_cooldown", "cycle_position", "cycle_length", "trend_direction",
                        "reward_direction", "kl_braking", "steps_since_aux_rule"}


def test_a_version_1_state_with_flat_rule_keys_resumes_exactly():
    def build():
        return make(["decision", "trend", "grad_norm", "plateau", "cyclical"], shift=0.5,
                    reward=RewardConfig(rules=["trend"], kl_limit=0.5))

    losses = [5.0 * 0.98 ** t + 0.1 * (t % 3) for t in range(60)]
    grads = [1.0 + 0.3 * (t % 4) for t in range(60)]
    rewards = [0.01 * t for t in range(60)]
    original = build()
    feed(original, losses[:30], grads[:30], rewards[:30])
    state = json.loads(json.dumps(original.state_dict()))
    flat_groups = []
    for group in state["groups"]:
        flat = {key: value for key, value in group.items() if key != "rules"}
        flat["steps_since_aux_rule"] = 0  # every group had the router rule's cooldown then
        for rule_state in group["rules"].values():
            flat.update(rule_state)
        flat.pop("jumps_in_row")  # the grad_norm rule's counts of jumps and collapses in a row came after
        flat.pop("collapses_in_row")  # version 1,
        flat.pop("unconfirmed_for")  # and so did its pending shrink
        flat_groups.append(flat)
    assert set(flat_groups[0]) == VERSION_1_GROUP_KEYS  # else this is not the old layout
    restored = build()
    restored.load_state_dict({**state, "version": 1, "groups": flat_groups})
    assert restored.state_dict() == original.state_dict()
    assert (feed(restored, losses[30:], grads[30:], rewards[30:], start=31)
            == feed(original, losses[30:], grads[30:], rewards[30:], start=31))


def test_a_state_of_an_unknown_version_is_refused():
    state = make([]).state_dict()
    with pytest.raises(ValueError, match=r"controller state is version 7, newer than this hf_r8 reads \(2\)"):
        make([]).load_state_dict({**state, "version": 7})
    with pytest.raises(ValueError, match="controller state without a version"):
        make([]).load_state_dict({key: value for key, value in state.items() if key != "version"})
