"""Plain statistics: EMA, windows, slope, z-score, and the exclusion of non-finite values."""

from __future__ import annotations

import math

import pytest

from hf_r8.control.signals import (
    Ema,
    LossStatistics,
    coefficient_of_variation,
    least_squares_slope,
    mean_and_std,
    relative_improvement,
)


def test_mean_std_slope_and_cv():
    assert mean_and_std([1.0, 3.0]) == (2.0, 1.0)
    assert mean_and_std([1e300, -1e300]) == (0.0, 1e300)  # rescaled, no overflow
    assert least_squares_slope([5.0, 4.0, 3.0, 2.0]) == pytest.approx(-1.0)
    assert least_squares_slope([1.0]) == 0.0
    assert coefficient_of_variation(2.0, 1.0) == 0.5
    assert math.isfinite(coefficient_of_variation(0.0, 1.0))
    assert relative_improvement(4.0, 3.0) == 0.25
    assert relative_improvement(0.0, 3.0) == 0.0


def test_ema():
    ema = Ema(0.9)
    assert ema.update(10.0) == 10.0
    assert ema.update(0.0) == pytest.approx(9.0)


def test_windows_close_and_compare_with_the_previous_one():
    stats = LossStatistics(window=3, ema_beta=0.5)
    closed = [stats.update(x).closed_window for x in [4.0, 4.0, 4.0, 3.0, 3.0, 3.0]]
    assert closed[:2] == [None, None] and closed[3:5] == [None, None]
    first, second = closed[2], closed[5]
    assert first.previous_mean is None and first.improvement_rate == 0.0
    assert second.mean == 3.0 and second.improvement_rate == pytest.approx(0.25)


def test_z_score_and_spike_ratio_are_measured_before_the_new_loss_enters():
    stats = LossStatistics(window=10, ema_beta=0.0)
    for loss in [1.0, 3.0]:
        stats.update(loss)
    step = stats.update(5.0)
    assert step.z_score == pytest.approx(3.0)  # (5 - 2) / 1
    assert step.spike_ratio == pytest.approx(5.0 / 3.0)


def test_non_finite_values_never_enter():
    stats = LossStatistics(window=4, ema_beta=0.5)
    stats.update(2.0)
    for bad in (float("nan"), float("inf"), -float("inf"), None):
        step = stats.update(bad)
        assert not step.finite
    assert stats.ema.value == 2.0 and list(stats.rolling) == [2.0]
    assert stats.nonfinite_count == 4


def test_slope_t_statistic_measures_how_certain_a_trend_is():
    from hf_r8.control.signals import MAX_CV, slope_t_statistic

    assert slope_t_statistic([5.0, 4.0, 3.0, 2.0]) == -MAX_CV  # noiseless fall: certain
    assert slope_t_statistic([2.0, 2.0, 2.0]) == 0.0
    noisy_flat = slope_t_statistic([1.0, 1.2, 0.9, 1.1, 1.0, 1.05])
    assert abs(noisy_flat) < 1.0
    falling = slope_t_statistic([1.0, 0.97, 0.95, 0.91, 0.90, 0.86])
    assert falling < -10.0


def test_slope_t_statistic_does_not_overflow_on_huge_values():
    from hf_r8.control.signals import slope_t_statistic

    huge = [0.0, 0.0, 8.98e307, 8.98e307, 1e300]
    assert -1e6 <= slope_t_statistic(huge) <= 1e6
    assert slope_t_statistic([v * 1e300 for v in (1.0, 0.97, 0.95, 0.91, 0.90, 0.86)]) == pytest.approx(
        slope_t_statistic([1.0, 0.97, 0.95, 0.91, 0.90, 0.86]))
