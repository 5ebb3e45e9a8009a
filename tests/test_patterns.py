"""Arrival schedules: exact counts, constant spacing from the start, Poisson goodness of fit, ramps."""

import numpy as np
import pytest
from scipy import stats

from loadgen.patterns.profile import RateProfile
from loadgen.patterns.schedule import profile_of, replan, schedule, schedule_offsets
from loadgen.scenario import OpenLoop, Stage


def test_constant_is_start_plus_i_over_rate() -> None:
    offsets = schedule_offsets(OpenLoop(rate=500, duration=10))
    assert len(offsets) == 5000
    np.testing.assert_allclose(offsets, np.arange(5000) / 500, atol=1e-9)


def test_poisson_gaps_are_exponential_at_the_seed() -> None:
    offsets = schedule_offsets(OpenLoop(rate=500, duration=20, arrival="poisson", seed=11))
    gaps = np.diff(offsets)
    result = stats.kstest(gaps, "expon", args=(0, 1 / 500))
    assert result.pvalue > 0.01
    assert abs(len(offsets) - 10000) < 4 * np.sqrt(10000)


def test_poisson_is_reproducible_by_seed() -> None:
    a = schedule_offsets(OpenLoop(rate=100, duration=5, arrival="poisson", seed=3))
    b = schedule_offsets(OpenLoop(rate=100, duration=5, arrival="poisson", seed=3))
    c = schedule_offsets(OpenLoop(rate=100, duration=5, arrival="poisson", seed=4))
    np.testing.assert_array_equal(a, b)
    assert len(a) != len(c) or not np.array_equal(a, c)


def test_ramp_follows_the_integrated_rate() -> None:
    pattern = OpenLoop(rate=0, stages=[Stage(duration=10, ramp_to=100), Stage(duration=5, rate=100)])
    offsets = schedule_offsets(pattern)
    profile = profile_of(pattern)
    assert profile.expected_count == pytest.approx(1000.0)
    for t in (2.0, 5.0, 10.0, 12.5):
        assert abs((offsets < t).sum() - profile.count_by(t)) <= 1
    np.testing.assert_allclose(np.diff(offsets[offsets > 10.0]), 0.01, atol=1e-9)


def test_poisson_ramp_counts_per_window() -> None:
    pattern = OpenLoop(arrival="poisson", seed=5, rate=100, stages=[Stage(duration=20, ramp_to=1000)])
    offsets = schedule_offsets(pattern)
    profile = profile_of(pattern)
    for lo, hi in ((0, 5), (5, 10), (15, 20)):
        expected = profile.count_by(hi) - profile.count_by(lo)
        got = ((offsets >= lo) & (offsets < hi)).sum()
        assert abs(got - expected) < 5 * np.sqrt(expected)


def test_shares_partition_the_schedule() -> None:
    pattern = OpenLoop(rate=300, duration=3, arrival="poisson", seed=2)
    whole = schedule_offsets(pattern)
    parts = [np.concatenate(list(schedule(pattern, share=(k, 3)))) for k in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), whole)


def test_step_profile_invert_and_count() -> None:
    profile = RateProfile.from_stages(0.0, [(1.0, 10.0, None), (1.0, 20.0, None)])
    np.testing.assert_allclose(profile.invert(np.array([0.0, 5.0, 10.0, 20.0])), [0.0, 0.5, 1.0, 1.5])
    assert profile.count_by(1.5) == pytest.approx(20.0)
    assert profile.mean_rate == pytest.approx(15.0)


@pytest.mark.parametrize("arrival", ["constant", "poisson"])
def test_replan_keeps_the_arrivals_before_the_instant_and_holds_the_new_rate_after(arrival: str) -> None:
    """A live rate change: the schedule before `at_s` is the old one, arrival for arrival; after it the new
    rate (constant arrivals: exactly 1/rate apart), and a second change re-plans the first's rest."""
    pattern = OpenLoop(rate=200, duration=5, arrival=arrival, seed=7)
    changed = replan(pattern, 2.345, 400)
    old, new = schedule_offsets(pattern), schedule_offsets(changed)
    np.testing.assert_array_equal(new[new < 2.345], old[old < 2.345])
    assert changed.total_duration == pytest.approx(5.0) and profile_of(changed).rate_at(3.0) == 400
    assert profile_of(changed).count_by(5.0) == pytest.approx(200 * 2.345 + 400 * (5 - 2.345))
    if arrival == "constant":
        np.testing.assert_allclose(np.diff(new[new >= 2.345]), 1 / 400, atol=1e-9)
        assert len(new) == 1531
    again = replan(changed, 3.0, 100)
    twice = schedule_offsets(again)
    np.testing.assert_array_equal(twice[twice < 3.0], new[new < 3.0])
    assert profile_of(again).count_by(5.0) == pytest.approx(200 * 2.345 + 400 * 0.655 + 100 * 2)


def test_replan_cuts_a_ramp_where_it_stood() -> None:
    pattern = OpenLoop(rate=100, stages=[Stage(duration=2, ramp_to=300), Stage(duration=2, rate=50)])
    changed = replan(pattern, 1.0, 10)
    profile = profile_of(changed)
    assert profile.rate_at(0.5) == pytest.approx(150) and profile.rate_at(2.5) == 10
    assert profile.count_by(1.0) == pytest.approx(profile_of(pattern).count_by(1.0))


@pytest.mark.parametrize(("at_s", "rate", "problem"), [(1.0, 0.0, "rate must be > 0"),
                                                       (5.0, 100.0, "outside the run"),
                                                       (-1.0, 100.0, "outside the run")])
def test_replan_refuses_what_it_cannot_plan(at_s: float, rate: float, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        replan(OpenLoop(rate=200, duration=5), at_s, rate)
