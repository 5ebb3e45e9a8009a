"""Unit tests of servers/calibration/timing.py against hand-computed done instants."""

from __future__ import annotations

import math

import pytest

from servers.calibration.timing import TimingConfig, TimingModel

T0 = 100.0


def test_fixed_delay_adds_to_arrival() -> None:
    model = TimingModel(TimingConfig(delay_ms=20), T0)
    assert model.done_at(100.5) == pytest.approx(100.52)
    assert model.done_at(100.5) == pytest.approx(100.52)  # no state: same arrival, same answer


def test_zero_config_answers_at_arrival() -> None:
    model = TimingModel(TimingConfig(), T0)
    assert model.done_all([1.0, 2.5, 2.5]) == [1.0, 2.5, 2.5]


@pytest.mark.parametrize(
    ("arrival", "released"),
    [
        (100.5, 100.5),  # before the first window: k = 0 never stalls
        (100.99, 100.99),
        (101.0, 101.25),  # window start is inside [t0 + S, t0 + S + T)
        (101.1, 101.25),
        (101.25, 101.25),  # window end is outside
        (101.3, 101.3),
        (102.125, 102.25),  # second window
        (105.2, 105.25),
        (99.0, 99.0),  # before t0
    ],
)
def test_stall_windows_release_at_window_end(arrival: float, released: float) -> None:
    model = TimingModel(TimingConfig(stall_every_s=1.0, stall_for_s=0.25), T0)
    assert model.released_at(arrival) == pytest.approx(released)


def test_stall_then_delay() -> None:
    model = TimingModel(TimingConfig(delay_ms=20, stall_every_s=1.0, stall_for_s=0.25), T0)
    assert model.done_all([100.5, 101.1, 101.3]) == pytest.approx([100.52, 101.27, 101.32])


def test_one_worker_queues_fifo() -> None:
    model = TimingModel(TimingConfig(service_ms=10), T0)
    # Three at once: 10, 20, 30 ms; one after the queue drained starts at its arrival.
    assert model.done_all([0.0, 0.0, 0.0, 0.1]) == pytest.approx([0.01, 0.02, 0.03, 0.11])


def test_two_workers_share_the_queue() -> None:
    model = TimingModel(TimingConfig(service_ms=10, workers=2), T0)
    arrivals = [0.0, 0.0, 0.0, 0.0, 0.005, 0.05]
    assert model.done_all(arrivals) == pytest.approx([0.01, 0.01, 0.02, 0.02, 0.03, 0.06])


def test_stall_releases_a_burst_into_the_workers() -> None:
    model = TimingModel(TimingConfig(service_ms=100, workers=2, stall_every_s=1.0, stall_for_s=0.5), T0)
    # All three are held until 101.5; two start then, the third waits for a free worker.
    assert model.done_all([101.0, 101.2, 101.4]) == pytest.approx([101.6, 101.6, 101.7])


def test_valid_config_has_no_problems() -> None:
    assert TimingConfig(delay_ms=5, stall_every_s=2, stall_for_s=0.5).problems() == []
    assert TimingConfig(service_ms=3, workers=4).problems() == []


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (TimingConfig(delay_ms=-1), "delay_ms must be a finite number >= 0"),
        (TimingConfig(delay_ms=math.nan), "delay_ms must be a finite number >= 0"),
        (TimingConfig(service_ms=math.inf), "service_ms must be a finite number >= 0"),
        (TimingConfig(stall_every_s=1, stall_for_s=1), "must be shorter than stall_every_s"),
        (TimingConfig(stall_every_s=1), "give both or neither"),
        (TimingConfig(stall_for_s=1), "give both or neither"),
        (TimingConfig(delay_ms=1, service_ms=1), "not both"),
        (TimingConfig(service_ms=1, workers=0), "workers must be an integer >= 1"),
        (TimingConfig(workers=3), "workers only applies with service_ms"),
    ],
)
def test_invalid_config_is_reported(config: TimingConfig, fragment: str) -> None:
    assert any(fragment in problem for problem in config.problems())
    with pytest.raises(ValueError, match=fragment):
        TimingModel(config, T0)


def test_every_problem_is_reported_at_once() -> None:
    problems = TimingConfig(delay_ms=-1, service_ms=-2, workers=0).problems()
    assert len(problems) == 3
