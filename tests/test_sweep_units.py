"""Unit tests of the sweep's pure parts: plans (ladders, adaptive growth and bisection), stability, verdict."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from loadgen.recorder import HistogramSet, Interval, Recorder, record_many
from loadgen.sweep import (
    StepResult,
    Window,
    adaptive,
    geometric,
    ladder,
    linear,
    measured_recorder,
    stability,
    verdict,
)
from loadgen.sweep.plan import adaptive_bound, adaptive_users, adaptive_users_bound, efficient
from loadgen.sweep.step import windows_of


@dataclass
class Fake:
    offered_rps: float
    achieved_rps: float
    slo_met: bool | None = None
    generator_bound: bool = False


def drive(plan, respond) -> list[float]:
    """Run a plan against `respond(load) -> outcome`; return the loads it asked for."""
    loads = [next(plan)]
    while True:
        try:
            loads.append(plan.send(respond(loads[-1])))
        except StopIteration:
            return loads


def capacity(limit: float, p99_limit_rps: float | None = None):
    """A server that serves up to `limit` req/s; the SLO holds below `p99_limit_rps` when given."""
    def respond(load: float) -> Fake:
        slo = None if p99_limit_rps is None else load <= p99_limit_rps
        return Fake(load, min(load, limit), slo)
    return respond


def test_ladders() -> None:
    assert list(ladder([100, 200, 400])) == [100.0, 200.0, 400.0]
    assert linear(50, 160, 30) == [50.0, 80.0, 110.0, 140.0]
    assert geometric(50, 200, 1.5) == [50.0, 75.0, 112.5, 168.75, 200.0]
    assert geometric(100, 400, 2) == [100.0, 200.0, 400.0]
    with pytest.raises(ValueError):
        geometric(100, 50, 2)
    with pytest.raises(ValueError):
        geometric(100, 400, 1.0)


def test_ladder_ignores_results() -> None:
    assert drive(ladder([10, 20, 30]), lambda load: Fake(load, 1.0, False, True)) == [10.0, 20.0, 30.0]


def test_adaptive_grows_then_bisects_to_the_capacity() -> None:
    loads = drive(adaptive(50, 1000, 1.5), capacity(100))
    assert loads[:3] == [50.0, 75.0, 112.5]  # 112.5 falls behind: growth stops
    # A load within 5 % above the capacity still counts as kept up (achieved >= 95 % of offered).
    good = max(load for load in loads if load <= 100 / 0.95)
    bad = min(load for load in loads if load > 100 / 0.95)
    assert bad - good <= 0.05 * good  # converged to within the tolerance
    assert good == pytest.approx(100, rel=0.05)
    assert len(loads) <= adaptive_bound(50, 1000, 1.5)


def test_adaptive_stops_when_throughput_stops_growing() -> None:
    """Closed-loop style: no offered rate, throughput flat from 4 on."""
    loads = drive(adaptive(1, 64, 2), lambda load: Fake(0.0, min(load, 4.0) * 10))
    assert loads[:4] == [1.0, 2.0, 4.0, 8.0]
    assert all(4 <= load <= 8 for load in loads[3:])


def test_adaptive_bisects_on_the_slo() -> None:
    loads = drive(adaptive(50, 1000, 2), capacity(10_000, p99_limit_rps=130))
    good = max(load for load in loads if load <= 130)
    bad = min(load for load in loads if load > 130)
    assert (bad - good) <= 0.05 * good
    assert good > 120


def test_adaptive_treats_a_generator_bound_step_as_bad() -> None:
    loads = drive(adaptive(50, 1000, 2), lambda load: Fake(load, load, None, generator_bound=load >= 200))
    assert max(loads) == 200.0
    assert all(load < 200 for load in loads[loads.index(200.0) + 1:])


def test_adaptive_ends_at_max_when_all_good() -> None:
    assert drive(adaptive(50, 120, 1.5), capacity(10_000)) == [50.0, 75.0, 112.5, 120.0]


def test_adaptive_first_step_bad_ends() -> None:
    assert drive(adaptive(50, 1000, 1.5), capacity(10)) == [50.0]


@pytest.mark.parametrize(
    ("windows", "stable"),
    [
        ([Window(100, 10.0), Window(102, 10.4), Window(98, 9.8)], True),
        ([Window(50, 5.0), Window(100, 10.0), Window(102, 10.4), Window(98, 9.8)], True),  # only the last 3
        ([Window(100, 10.0), Window(100, 40.0), Window(100, 80.0)], False),  # queue growing
        ([Window(100, 10.0), Window(80, 10.0), Window(60, 10.0)], False),  # throughput falling
        ([Window(100, 10.0), Window(100, 10.0)], False),  # too few windows to tell
    ],
)
def test_stability(windows: list[Window], stable: bool) -> None:
    assert stability(windows, tolerance=0.10)["stable"] is stable


def test_stability_tolerance_is_a_setting() -> None:
    windows = [Window(100, 10.0), Window(100, 13.0), Window(100, 10.0)]  # p99 18 % off its mean
    assert not stability(windows, tolerance=0.10)["stable"]
    assert stability(windows, tolerance=0.20)["stable"]


def _interval(start: float, latencies_us: list[int]) -> Interval:
    figures = HistogramSet(ok=len(latencies_us), sent=len(latencies_us), completed_in_window=len(latencies_us))
    record_many(figures.latency, latencies_us)
    return Interval(start, start + 1.0, figures)


def test_measured_recorder_drops_the_warmup() -> None:
    recorder = Recorder(start_t=10.0, window_end_t=14.0)
    for k, value in enumerate([900_000, 10_000, 10_000, 10_000, 10_000]):  # a slow warm-up second
        recorder.merge_interval(_interval(10.0 + k, [value] * 50))
    measured = measured_recorder(recorder, 1.0)
    assert measured.start_t == 11.0
    assert measured.cumulative.ok == 200
    assert measured.cumulative.percentiles_ms("latency")["max"] == pytest.approx(10.0, rel=1e-3)
    # The interval after the window (the drain) keeps its latencies but is no stability window.
    assert len(windows_of(measured)) == 3


def step(index: int, offered: float, achieved: float, *, bound: bool = False, slo: bool | None = None,
         p99: float = 10.0) -> StepResult:
    return StepResult(index=index, load=offered, offered_rps=offered, achieved_rps=achieved,
                      latency_ms={"p99": p99}, errors=0, dropped=0, generator_bound=bound, stable=True, slo_met=slo)


def test_generator_bound_step_is_never_the_saturation_point() -> None:
    steps = [step(1, 100, 100), step(2, 200, 180), step(3, 400, 390, bound=True)]
    judged = verdict(steps, has_slo=False)
    assert judged["saturation_rps"] == 180
    assert judged["saturation_step"] == 2
    assert judged["generator_bound_steps"] == [3]
    assert any("scale the generator out" in note for note in judged["notes"])
    assert judged["knee"]["step"] == 1
    assert judged["saturated"] is True
    assert judged["max_rps_meeting_slo"] is None and judged["slo_met"] is True


def test_verdict_with_slo() -> None:
    steps = [step(1, 50, 50, slo=True), step(2, 80, 80, slo=True), step(3, 120, 99, slo=False, p99=400)]
    judged = verdict(steps, has_slo=True)
    assert judged["max_rps_meeting_slo"] == 80
    assert judged["slo_met"] is True
    assert judged["saturation_rps"] == 99
    failing = verdict([step(1, 50, 50, slo=False)], has_slo=True)
    assert failing["slo_met"] is False and failing["max_rps_meeting_slo"] is None


def test_verdict_not_saturated_is_a_lower_bound() -> None:
    judged = verdict([step(1, 50, 50), step(2, 100, 100)], has_slo=False)
    assert judged["saturated"] is False
    assert any("lower bound" in note for note in judged["notes"])


def test_verdict_all_generator_bound() -> None:
    judged = verdict([step(1, 50, 50, bound=True)], has_slo=True)
    assert judged["saturation_rps"] is None and judged["slo_met"] is False


def workers(count: int, per_user_rps: float = 50.0):
    """Closed loop against `count` identical workers, no think time: throughput min(users, count) x rate."""
    def respond(users: float) -> Fake:
        return Fake(0.0, min(users, count) * per_user_rps)
    return respond


@pytest.mark.parametrize("count", [1, 3, 4, 5, 7, 8, 12, 40])
@pytest.mark.parametrize("factor", [1.5, 2.0])
def test_adaptive_users_finds_the_worker_count(count: int, factor: float) -> None:
    loads = drive(adaptive_users(1, 64, factor), workers(count))
    assert all(load == int(load) for load in loads)
    assert len(loads) == len(set(loads))  # never a count twice
    assert len(loads) <= adaptive_users_bound(1, 64, factor)
    steps = [step(k + 1, load, workers(count)(load).achieved_rps) for k, load in enumerate(loads)]
    for s in steps:
        s.offered_rps = 0.0
    knee = verdict(steps, has_slo=False)["knee"]["load"]
    good = [load for load in loads if efficient(load, workers(count)(load).achieved_rps, 50.0)]
    assert knee == max(good)  # the verdict's knee is the plan's last good count
    if count <= 8:
        assert knee == count  # N workers saturate at N users
    else:
        assert count <= knee <= count / 0.9
        bad = min(load for load in loads if load > knee)
        assert bad - knee <= max(1, 0.05 * knee)  # bisected to the tolerance


def test_adaptive_users_exact_knee_for_small_counts() -> None:
    assert drive(adaptive_users(1, 16, 2), workers(4)) == [1.0, 2.0, 4.0, 8.0, 6.0, 5.0]
    assert drive(adaptive_users(1, 16, 2), workers(5)) == [1.0, 2.0, 4.0, 8.0, 6.0, 5.0]
    assert drive(adaptive_users(2, 16, 2), workers(1)) == [2.0, 4.0, 3.0]  # 2 already past: 3 is no better
    assert drive(adaptive_users(1, 6, 2), workers(100)) == [1.0, 2.0, 4.0, 6.0]  # every count good: up to max


def test_adaptive_users_stops_on_the_slo_and_on_the_generator() -> None:
    def slo_until(users_ok: int):
        return lambda users: Fake(0.0, users * 50.0, users <= users_ok)
    loads = drive(adaptive_users(1, 64, 2), slo_until(11))
    assert max(load for load in loads if load <= 11) == 11 and min(load for load in loads if load > 11) == 12
    loads = drive(adaptive_users(1, 64, 2), lambda users: Fake(0.0, users * 50.0, None, users >= 8))
    assert 7.0 in loads and all(load <= 8 for load in loads)
    assert drive(adaptive_users(1, 64, 2), lambda users: Fake(0.0, 50.0, None, True)) == [1.0]


def test_adaptive_users_rejects_bad_settings() -> None:
    for start, stop, factor in ((0, 8, 2), (8, 4, 2), (1, 8, 1.0), (1.5, 8, 2)):
        with pytest.raises(ValueError):
            next(adaptive_users(start, stop, factor))


def test_closed_loop_verdict_knee_is_where_users_stop_adding_throughput() -> None:
    ladder_steps = [step(k + 1, users, min(users, 4) * 50.0) for k, users in enumerate([1, 2, 4, 8, 16])]
    for s in ladder_steps:
        s.offered_rps = 0.0
    judged = verdict(ladder_steps, has_slo=False)
    assert judged["knee"]["load"] == 4 and judged["knee"]["achieved_rps"] == 200.0
    assert judged["saturated"] is True and judged["saturation_rps"] == 200.0
    scaling = verdict(ladder_steps[:3], has_slo=False)
    assert scaling["knee"]["load"] == 4 and scaling["saturated"] is False  # still scaling: a lower bound
    assert efficient(10, 450.0, 50.0) and not efficient(10, 440.0, 50.0)  # 90 % of 50 req/s a user
