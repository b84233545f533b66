"""Each path of the windowed decision engine, driven directly."""

from __future__ import annotations

from hf_r8.control.config import DecisionConfig
from hf_r8.control.decision import Decision, DecisionEngine
from hf_r8.control.signals import LossStep, WindowSummary

CONFIG = DecisionConfig(cooldown_steps=0)


def window(mean, previous, cv=0.01, slope=-0.1, slope_t=-1.0):
    rate = 0.0 if previous is None else (previous - mean) / previous
    return LossStep(True, mean, mean, 0.0, 1.0, WindowSummary(mean, mean * cv, cv, slope, slope_t, previous, rate))


def test_first_window_holds():
    assert DecisionEngine().on_step(window(5.0, None), CONFIG).decision is Decision.HOLD


def test_increase_needs_improvement_stability_and_a_falling_slope():
    assert DecisionEngine().on_step(window(4.0, 5.0), CONFIG).decision is Decision.INCREASE
    assert DecisionEngine().on_step(window(4.0, 5.0, cv=0.4), CONFIG).decision is Decision.HOLD
    assert DecisionEngine().on_step(window(4.0, 5.0, slope=0.1), CONFIG).decision is Decision.HOLD


def test_instability_forces_a_decrease():
    verdict = DecisionEngine().on_step(window(4.0, 5.0, cv=0.6), CONFIG)
    assert verdict.decision is Decision.DECREASE and "unstable" in verdict.reason


def test_window_spike_brakes_even_during_cooldown():
    engine = DecisionEngine(steps_since_adjustment=0)
    verdict = engine.on_step(window(7.0, 5.0), DecisionConfig(cooldown_steps=20))
    assert verdict.decision is Decision.SPIKE_DECREASE and "window loss spike" in verdict.reason
    again = engine.on_step(window(9.0, 7.0), DecisionConfig(cooldown_steps=20, spike_cooldown_steps=10))
    assert again.decision is Decision.HOLD  # the next brake waits for spike_cooldown_steps


def test_cooldown_holds_ordinary_decisions():
    engine = DecisionEngine(steps_since_adjustment=3)
    verdict = engine.on_step(window(4.0, 5.0), DecisionConfig(cooldown_steps=20))
    assert verdict.decision is Decision.HOLD and verdict.reason.startswith("cooldown")


def test_plateau_counts_windows_and_resets_on_progress():
    engine = DecisionEngine()
    config = DecisionConfig(cooldown_steps=0, patience_windows=3)
    assert engine.on_step(window(5.0, 5.0), config).decision is Decision.HOLD
    assert engine.plateau_windows == 1
    engine.on_step(window(4.9, 5.0, slope=0.1), config)  # 2% better but slope up: progress, not a plateau
    assert engine.plateau_windows == 0
    verdicts = [engine.on_step(window(5.0, 5.0), config).decision for _ in range(3)]
    assert verdicts == [Decision.HOLD, Decision.HOLD, Decision.DECREASE]


def test_steps_between_windows_return_nothing_unless_a_brake_fires():
    engine = DecisionEngine()
    assert engine.on_step(LossStep(True, 1.0, 1.0, 0.5, 1.01, None), CONFIG) is None
    assert engine.on_step(None, CONFIG) is None
    assert engine.on_step(LossStep(True, 1.0, 1.3, 4.0, 1.5, None), CONFIG).decision is Decision.SPIKE_DECREASE


def test_spike_steps_2_brakes_on_the_second_spike_in_a_row_only():
    config = DecisionConfig(cooldown_steps=0, spike_steps=2)
    engine, spike = DecisionEngine(), LossStep(True, 1.0, 1.3, 4.0, 1.5, None)
    normal = LossStep(True, 1.0, 1.0, 0.5, 1.01, None)
    assert [engine.on_step(step, config) for step in (spike, normal, spike, normal)] == [None] * 4
    assert engine.on_step(spike, config) is None  # one outlying batch
    verdict = engine.on_step(spike, config)  # and the next batch's loss, on the weights after its update
    assert verdict.decision is Decision.SPIKE_DECREASE and verdict.reason.startswith("loss spike (2 in a row)")


def test_near_zero_losses_late_in_a_classification_run_do_not_brake_or_decrease():
    """A digits-like run: the loss falls from 2.3 to ~0.03, then batches with one hard example read 0.1.
    Relative to a level of 0.03 they are 3x spikes and a window CV above 0.5; against the progress made
    (2.3 -> 0.03) they are noise."""
    from hf_r8.control.signals import LossStatistics

    config = DecisionConfig()
    statistics, engine = LossStatistics(window=10, ema_beta=0.9), DecisionEngine()
    falling = [2.3 * 0.8 ** step for step in range(30)]  # down to ~0.003 x 2.3
    noisy_tail = [0.03, 0.02, 0.1, 0.025, 0.03, 0.12, 0.02, 0.03, 0.028, 0.09] * 6
    verdicts = [engine.on_step(statistics.update(loss), config) for loss in falling + noisy_tail]
    late = [verdict for verdict in verdicts[30:] if verdict is not None]
    assert not [v for v in late if v.decision is Decision.SPIKE_DECREASE or v.reason.startswith("unstable")], late
    # the same losses against the level alone (no setback, the plain cv) do brake: the test can fail
    blind = DecisionConfig(spike_min_setback=0.0, instability_threshold=0.5)
    statistics, engine = LossStatistics(window=10, ema_beta=0.9), DecisionEngine()
    for loss in falling:
        engine.on_step(statistics.update(loss), blind)
    statistics.first_loss = statistics.ema.value  # no progress on record: the level is the only scale
    blind_verdicts = [engine.on_step(statistics.update(loss), blind) for loss in noisy_tail]
    assert [v for v in blind_verdicts if v is not None and
            (v.decision is Decision.SPIKE_DECREASE or v.reason.startswith("unstable"))]


def test_a_real_spike_after_progress_still_brakes():
    from hf_r8.control.signals import LossStatistics

    config = DecisionConfig()
    statistics, engine = LossStatistics(window=10, ema_beta=0.9), DecisionEngine()
    for step in range(40):
        engine.on_step(statistics.update(2.3 * 0.95 ** step + 0.01 * (step % 3)), config)
    verdict = engine.on_step(statistics.update(2.0), config)  # gives back most of the progress at once
    assert verdict is not None and verdict.decision is Decision.SPIKE_DECREASE
