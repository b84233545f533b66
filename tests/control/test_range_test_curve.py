"""The LR range test's curve and choice, driven by hand-made losses (the sweep in a real Trainer run is in
tests/test_range_test.py)."""

from __future__ import annotations

import pytest

from hf_r8.control.config import RangeTestConfig
from hf_r8.control.range_test import LRRangeTest, no_range_test_reason, range_test_length


def test_gains_sweep_exponentially_from_min_to_max():
    test = LRRangeTest(RangeTestConfig(gain_min=0.01, gain_max=100.0), steps=6)
    assert [test.gain(i) for i in range(6)] == pytest.approx([0.01, 0.1, 1.0, 10.0, 100.0, 100.0])


def test_choice_is_the_denoised_minimum_over_backoff_and_losses_credit_the_previous_gain():
    test = LRRangeTest(RangeTestConfig(gain_min=0.01, gain_max=100.0, smoothing=0.0, backoff=2.0, keep_band=1.0,
                                       significance=0.0), steps=6)
    for index, loss in enumerate([5.0, 5.0, 4.0, 2.0, 2.0, 3.0]):
        test.observe(index, loss)
    # credited to gains 0.01 .. 100; centered means 4.5, 3.67, 2.67, 2.33, 2.5: the lowest is at gain(3) = 10
    gain, loss = test.best()
    assert gain == pytest.approx(10.0) and loss == pytest.approx(7.0 / 3.0)
    assert test.chosen_gain() == pytest.approx(5.0)


def test_the_denoised_curve_is_centered_and_not_shifted_to_higher_gains():
    test = LRRangeTest(RangeTestConfig(gain_min=1.0, gain_max=1e4), steps=6)
    for index, loss in enumerate([9.0, 6.0, 5.0, 1.0, 5.0, 6.0]):
        test.observe(index, loss)
    assert [loss for _, loss in test.denoised()] == pytest.approx([5.5, 4.0, 11.0 / 3.0, 4.0, 5.5])
    assert test.best()[0] == pytest.approx(test.gain(2)), "the dip's own gain, where a causal EMA lags past it"


def test_one_fault_is_left_out_and_only_faults_in_a_row_are_the_blow_up():
    test = LRRangeTest(RangeTestConfig(smoothing=0.0, divergence_ratio=4.0), steps=20)
    verdicts = [test.observe(index, loss) for index, loss in enumerate([5.0, 4.0, float("nan"), 3.0, 90.0, 2.5])]
    assert verdicts == [True, True, False, True, False, True]  # the NaN and the outlier: updates not applied
    assert not test.diverged and test.faults == 2 and [loss for _, loss in test.history] == [4.0, 3.0, 2.5]
    for index, loss in enumerate([float("nan"), 50.0, float("inf")], start=6):
        assert not test.observe(index, loss)
    assert test.diverged and test.finished and test.divergence_gain == test.gain(5)  # the first fault's gain


def test_the_loss_after_a_skipped_update_is_credited_to_the_last_update_applied():
    # steps 2 and 4 are faults whose updates are not applied: the losses of steps 3 and 5 are measured on the
    # weights of the updates of steps 1 and 3
    test = LRRangeTest(RangeTestConfig(smoothing=0.0, divergence_ratio=4.0), steps=20)
    for index, loss in enumerate([5.0, 4.0, float("nan"), 3.0, 90.0, 2.5]):
        test.observe(index, loss)
    assert [gain for gain, _ in test.history] == pytest.approx([test.gain(0), test.gain(1), test.gain(3)])
    # a host that applies every update (a loop that reads the loss after its step) credits the step before
    applied = LRRangeTest(RangeTestConfig(smoothing=0.0, divergence_ratio=4.0), steps=20, skips_faults=False)
    for index, loss in enumerate([5.0, 4.0, float("nan"), 3.0, 90.0, 2.5]):
        applied.observe(index, loss)
    assert [gain for gain, _ in applied.history] == pytest.approx([test.gain(0), test.gain(2), test.gain(4)])


def test_a_test_that_cannot_conclude_keeps_the_users_lr_and_says_so():
    test = LRRangeTest(RangeTestConfig(), steps=10)
    for index in range(4):
        test.observe(index, float("nan"))
    assert test.finished and test.diverged and test.chosen_gain() == 1.0
    assert "no conclusion from 0 losses (3 are needed): the LR set is kept" in test.summary("restored")


def test_runaway_loss_ends_the_test_early():
    test = LRRangeTest(RangeTestConfig(smoothing=0.0, divergence_ratio=4.0, divergence_patience=1), steps=20)
    for index, loss in enumerate([5.0, 4.0, 3.0, 2.0, 9.0]):
        test.observe(index, loss)
    assert test.diverged and test.finished and test.observed == 3


def _swept(losses: list[float], **config) -> LRRangeTest:
    test = LRRangeTest(RangeTestConfig(gain_min=0.01, gain_max=10_000.0, smoothing=0.0, divergence_ratio=100.0,
                                       **config), steps=len(losses))
    for index, loss in enumerate(losses):
        test.observe(index, loss)
    return test


def test_a_suggestion_within_the_keep_band_keeps_the_users_lr():
    # a clear valley at gain ~17 (credited): the suggestion, ~1.7, is within the band of 3
    test = _swept([6.0, 6.0, 6.01, 5.99, 6.0, 6.0, 5.5, 4.5, 3.0, 2.5, 9.0, 40.0, 80.0, 90.0, 99.0])
    assert test.has_valley() and 1 / 3 <= test.suggested_gain() <= 3
    assert test.chosen_gain() == 1.0


def test_a_clear_valley_far_above_the_users_lr_raises_it_to_the_minimum_over_backoff():
    # flat (noise 0.01) until gain ~100, then a deep valley at ~400: the user's LR is far too low
    test = _swept([6.0, 6.01, 5.99, 6.0, 6.01, 5.99, 6.0, 6.0, 6.0, 5.8, 5.0, 3.0, 2.0, 9.0, 30.0])
    assert test.has_valley()
    assert test.chosen_gain() == pytest.approx(test.best()[0] / 10) and test.chosen_gain() > 10


def test_a_curve_flat_within_its_noise_is_judged_by_where_it_blows_up():
    # a pre-trained model: flat within noise (spread ~0.1) until it blows up; its lowest point is noise
    losses = [3.86, 4.08, 3.75, 4.01, 3.90, 3.94, 4.03, 3.90, 3.93, 3.95, 3.85, 3.75, 3.90, 10.0, 20.0]
    test = _swept(losses)
    assert not test.has_valley()
    blow_up = test.blow_up_gain()
    assert blow_up == pytest.approx(test.gain(12)), "the first loss far above the level (10.0), credited"
    assert test.suggested_gain() == pytest.approx(blow_up / 10)
    assert _swept(losses, significance=0.0).suggested_gain() == pytest.approx(test.best()[0] / 10), \
        "without the noise test the noisy minimum would be taken"


def test_the_users_lr_is_lowered_only_where_the_curve_shows_it_too_high():
    # the valley's lowest point at gain ~2 (suggestion ~0.2, out of the keep band): the LR set is below the
    # minimum, and "minimum / 10" is no evidence against it
    below_the_minimum = [6.0, 6.0, 6.01, 5.99, 6.0, 3.0, 3.0, 3.0, 40.0, 80.0, 90.0, 99.0, 99.0, 99.0, 99.0]
    test = _swept(below_the_minimum)
    assert test.has_valley() and test.best()[0] == pytest.approx(test.gain(5)) and test.suggested_gain() < 1 / 3
    assert not test.blew_up_by_the_lr_set() and test.chosen_gain() == 1.0
    assert "does not show the LR set too high (range_test.keep_unless_too_high): kept" in test.summary("restored")
    assert _swept(below_the_minimum, keep_unless_too_high=False).chosen_gain() == pytest.approx(test.gain(5) / 10)
    # past a valley at ~0.7, still short of the blow-up (~6): kept as well
    past_the_valley = [6.0, 6.0, 6.01, 5.99, 6.0, 3.0, 2.5, 9.0, 40.0, 80.0, 90.0, 99.0, 99.0, 99.0, 99.0]
    test = _swept(past_the_valley)
    assert test.best()[0] == pytest.approx(test.gain(4)) and test.blow_up_gain() > 1
    assert test.chosen_gain() == 1.0
    # blown up from gain ~0.7, below the LR set: lowered
    blown_below = [6.0, 6.0, 6.01, 5.99, 6.0, 9.0, 40.0, 80.0, 90.0, 99.0, 99.0, 99.0, 99.0, 99.0, 99.0]
    test = _swept(blown_below)
    assert test.blow_up_gain() == pytest.approx(test.gain(4)) and test.blow_up_gain() < 1
    assert test.blew_up_by_the_lr_set()
    assert test.chosen_gain() == pytest.approx(test.gain(4) / 10)


def test_a_flat_curve_that_never_rises_keeps_the_users_lr():
    assert _swept([4.0, 4.1, 3.9, 4.0, 4.05, 3.95, 4.0, 4.1, 3.9, 4.0]).chosen_gain() == 1.0


@pytest.mark.parametrize(("total_steps", "expected"), [
    (None, None), (100, None), (149, None), (150, 15), (600, 24), (1000, 40), (10_000, 100), (100_000, 100)])
def test_the_default_test_is_sized_to_the_run(total_steps, expected):
    assert range_test_length(RangeTestConfig(), total_steps) == expected


def test_a_fixed_length_is_used_as_is_and_a_disabled_test_has_none():
    assert range_test_length(RangeTestConfig(steps=30), 100) == 30
    assert range_test_length(RangeTestConfig(steps=30), 20) is None
    assert range_test_length(RangeTestConfig(enabled=False), 10_000) is None


def test_a_run_without_a_test_is_told_why():
    assert no_range_test_reason(RangeTestConfig(), 600) is None
    assert no_range_test_reason(RangeTestConfig(enabled=False), 600).startswith("off (range_test.enabled: false)")
    assert no_range_test_reason(RangeTestConfig(), 100) == (
        "skipped: a run of 100 steps is too short (15 test steps would be over 10% of it), so the LR set is kept "
        "(and not annealed at the end)")
    assert "steps=30 leaves no room in a run of 20 steps" in no_range_test_reason(RangeTestConfig(steps=30), 20)
    assert "length is unknown" in no_range_test_reason(RangeTestConfig(), None)
