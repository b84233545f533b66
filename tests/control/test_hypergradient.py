"""The hypergradient rule moves the gain both ways on a window of update alignments, holds on noise, and
resumes where it was."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from hf_r8.control.config import BlendConfig, HypergradientConfig, R8Config
from hf_r8.control.controller import Controller, GroupSpec, Observation
from hf_r8.control.hypergradient import measures_update_alignment

WINDOW, RATE = 5, 0.05


def controller(*rules: str, window: int = WINDOW) -> Controller:
    config = R8Config(rules=list(rules), hypergradient=HypergradientConfig(window=window, significance=3.0, rate=RATE),
                      blend=BlendConfig(stability_shift=0.0))
    return Controller(config, [GroupSpec(1e-3)], total_steps=1000)


def feed(controller: Controller, alignments: list[float | None], start: int = 1) -> tuple[list[float], list]:
    gains, events = [], []
    for step, alignment in enumerate(alignments, start=start):
        events += controller.observe(Observation(step, loss=2.0, update_alignment=alignment))
        gains.append(controller.lr_gain(0))
    return gains, events


def test_steps_that_keep_going_the_same_way_raise_the_gain_once_the_window_agrees():
    aligned = [0.30, 0.32, 0.28, 0.31, 0.29, 0.30, 0.33]
    gains, events = feed(controller("hypergradient"), aligned)
    assert gains == pytest.approx([1.0] * (WINDOW - 1) + [(1 + RATE) ** k for k in (1, 2, 3)], rel=1e-12)
    assert [(event.step, event.action) for event in events] == [(WINDOW, "hypergradient_up")]
    assert "standard errors over 5 steps" in events[0].reason


def test_steps_that_overshoot_lower_it_at_the_same_rate():
    gains, events = feed(controller("hypergradient"), [-0.2, -0.25, -0.22, -0.18, -0.21, -0.2])
    assert gains[-1] == pytest.approx((1 + RATE) ** -2, rel=1e-12)
    assert [event.action for event in events] == ["hypergradient_down"]


def final_gains(mean: float, seeds: int = 16, steps: int = 500) -> list[float]:
    """The gain after `steps` alignments drawn around `mean` (spread 0.3), one run per seed, at the default window."""
    window = HypergradientConfig().window
    finals = []
    for seed in range(seeds):
        rng = random.Random(seed)
        gains, _ = feed(controller("hypergradient", window=window), [rng.gauss(mean, 0.3) for _ in range(steps)])
        finals.append(gains[-1])
    return finals


def test_noise_around_zero_barely_moves_the_gain_and_a_small_steady_lean_does():
    noise = final_gains(0.0)
    assert all(0.5 < gain < 2.0 for gain in noise) and 0.8 < statistics.median(noise) < 1.25
    assert statistics.median(final_gains(0.05)) > 2.0  # a lean a sixth of the noise, 500 steps long


def test_a_direction_change_is_an_event_and_holding_ends_it():
    rule_gains, events = feed(controller("hypergradient"), [0.3, 0.31, 0.29, 0.3, 0.3, -0.3, -0.31, -0.29, -0.3, -0.3,
                                                            -0.3, -0.31])
    assert [event.action for event in events] == ["hypergradient_up", "hypergradient_down"]
    assert rule_gains[-1] < rule_gains[WINDOW - 1]


def test_steps_without_a_measurement_or_with_a_non_finite_one_are_left_out():
    running = controller("hypergradient")
    gains, _ = feed(running, [0.3, None, math.nan, 0.31, math.inf, 0.29, 0.3, 0.3])
    assert gains[-1] == pytest.approx(1 + RATE, rel=1e-12)
    assert running.group_rules[0]["hypergradient"].alignments == [0.3, 0.31, 0.29, 0.3, 0.3]


def test_a_resumed_rule_goes_on_as_an_uninterrupted_one():
    alignments = [0.3, 0.31, 0.29, 0.3, 0.3, 0.28, -0.3, 0.32]
    uninterrupted, _ = feed(controller("hypergradient"), alignments)
    first = controller("hypergradient")
    feed(first, alignments[:4])
    resumed = controller("hypergradient")
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    gains, _ = feed(resumed, alignments[4:], start=5)
    assert gains == pytest.approx(uninterrupted[4:], rel=1e-12)


def test_only_a_config_running_the_rule_asks_for_the_measurement():
    assert not measures_update_alignment(R8Config())
    assert measures_update_alignment(R8Config(rules=["decision", "hypergradient"]))


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("window", 2, "an integer >= 3"),
    ("significance", 0.0, "> 0.0"),
    ("rate", 0.0, r"in \(0.0, 1.0\]"),
    ("rate", 1.5, r"in \(0.0, 1.0\]"),
])
def test_bad_settings_are_refused_naming_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=rf"hypergradient.{field}.*{allowed}"):
        HypergradientConfig(**{field: value})
