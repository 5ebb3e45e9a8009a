"""The open-loop dispatcher's rules (loadgen/driver/dispatcher.py) on a fake clock: exact counts, no waiting.

The dispatcher runs on this process's gevent hub, as in a run, with a FakeClock
(tests/support/fake_clock.py): its sleeps end at once at the instant asked for, after the calls scheduled
until then (answers, stops, stalls of the host) have run. So every figure here is exact: which arrivals
were started, at which instant, which were dropped at the in-flight cap, how many a stop left unsent.
"""

from __future__ import annotations

import time

import gevent
import numpy as np
import pytest
from gevent.event import Event

from loadgen.driver.dispatcher import Dispatcher, MonotonicClock
from loadgen.outcome import Outcome
from loadgen.patterns.schedule import schedule, schedule_offsets
from loadgen.scenario import OpenLoop
from tests.support.fake_clock import FakeClock

T0 = 1000.0
START_T = T0 + 0.05  # the run starts 50 ms after the clock's first reading


class Harness:
    """A dispatcher on a fake clock, whose requests take `service_s` of fake time each."""

    def __init__(self, clock: FakeClock | None = None, service_s: float = 0.0,
                 max_in_flight: int = 1000) -> None:
        gevent.sleep(0)  # the hub runs, as it does under Locust (a request greenlet returns to it)
        self.clock = FakeClock(T0) if clock is None else clock
        self.service_s = service_s
        self.sent: list[tuple[float, float]] = []  # (intended_t, sent_t) as send() was called
        self.outcomes: list[Outcome] = []
        self.dropped: list[float] = []
        self.unsent_reports: list[int] = []
        self.dispatcher = Dispatcher(self.send, self.outcomes.append, self.dropped.append, max_in_flight,
                                     on_unsent=self.unsent_reports.append, clock=self.clock)

    def send(self, intended_t: float) -> Outcome:
        sent_t = self.clock.now()
        self.sent.append((intended_t, sent_t))
        if self.service_s:
            answered = Event()
            self.clock.call_at(sent_t + self.service_s, answered.set)
            answered.wait()
        return Outcome(intended_t, sent_t, self.clock.now())

    def run(self, pattern: OpenLoop, **share) -> None:
        """Dispatch `pattern` from START_T, then let the requests still out be answered."""
        self.dispatcher.run(START_T, schedule(pattern, **share))
        self.clock.run_until(self.clock.now() + 10.0)
        assert self.dispatcher.in_flight == 0

    @property
    def intended(self) -> list[float]:
        return [intended_t for intended_t, _ in self.sent]

    @property
    def lags(self) -> list[float]:
        return [sent_t - intended_t for intended_t, sent_t in self.sent]


def instants(pattern: OpenLoop) -> list[float]:
    """The schedule's intended instants, as the dispatcher computes them."""
    return (START_T + schedule_offsets(pattern)).tolist()


# -- on time: never early, no lag, and how the wait is split between the timer and the spin ---------------

@pytest.mark.parametrize(("rate", "spin_s"), [
    (100, 200e-6),  # 10 ms apart: the timer wakes 200 us before each arrival and the rest is spun
    (20_000, 5e-6),  # 50 us apart: the spin is a tenth of the wait
    (100_000, None),  # 10 us apart: closer than arming the timer is worth, all spun
])
def test_each_arrival_starts_at_its_instant_exactly(rate: int, spin_s: float | None) -> None:
    pattern = OpenLoop(rate=rate, duration=100 / rate)
    run = Harness()
    run.run(pattern)
    assert run.intended == instants(pattern)
    assert run.lags == [0.0] * 100  # sent at the intended instant: never early, never late
    assert [o.intended_t for o in run.outcomes] == run.intended and run.dropped == []
    sleeps = run.clock.sleeps[1:]  # the first is the 50 ms before the run starts
    if spin_s is None:
        assert sleeps == []
    else:
        assert len(sleeps) == 99
        assert [until for _, until in sleeps] == pytest.approx(
            [t - spin_s for t in run.intended[1:]], abs=1e-9)


@pytest.mark.parametrize("late_s", [-0.003, 0.0001, 0.001])
def test_a_timer_that_wakes_early_is_spun_out_and_one_that_wakes_late_is_lag(late_s: float) -> None:
    """The timer is armed 200 us ahead: a wake-up up to that late costs nothing, past it the rest is lag
    (sent_t - intended_t); one that comes early (by 3 ms) is spun to the instant, never sent early."""
    pattern = OpenLoop(rate=100, duration=0.5)
    run = Harness(FakeClock(T0, wake_late_s=late_s))
    run.run(pattern)
    assert run.intended == instants(pattern)
    assert run.lags == pytest.approx([max(0.0, late_s - 200e-6)] * 50, abs=1e-9)


def test_arrivals_due_during_a_stall_start_at_once_and_keep_their_intended_instants() -> None:
    """The host takes the process away from 0.3025 s to 0.5025 s: the arrivals due meanwhile (0.305 s to
    0.5 s) are all started when it comes back, in order, each lagging by the time it waited; none is
    dropped or moved, and the later ones are on time again."""
    pattern = OpenLoop(rate=200, duration=1.0)
    run = Harness()
    run.clock.call_at(START_T + 0.3025, lambda: run.clock.stall(0.2))
    run.run(pattern)
    assert run.intended == instants(pattern) and run.dropped == [] and run.unsent_reports == []
    offsets = schedule_offsets(pattern)
    waited = (offsets > 0.3025) & (offsets < 0.5025)
    assert np.count_nonzero(waited) == 40
    lags = np.array(run.lags)
    np.testing.assert_allclose(lags[waited], 0.5025 - offsets[waited], atol=1e-9)
    assert np.all(lags[~waited] == 0.0)


# -- the in-flight cap -----------------------------------------------------------------------------------

def test_arrivals_that_find_the_cap_reached_are_dropped_never_delayed() -> None:
    """1000 arrivals/s of requests that take 4.5 ms, at most 3 in flight: of every five arrivals the
    first three start (on time) and the next two find three out and are dropped, counted by instant."""
    pattern = OpenLoop(rate=1000, duration=0.1)
    run = Harness(service_s=0.0045, max_in_flight=3)
    run.run(pattern)
    every = instants(pattern)
    assert run.dropped == [t for i, t in enumerate(every) if i % 5 in (3, 4)]
    assert run.intended == [t for i, t in enumerate(every) if i % 5 in (0, 1, 2)]
    assert run.lags == [0.0] * 60
    assert run.dispatcher.peak_in_flight == 3 and len(run.outcomes) == 60
    assert run.dispatcher.unsent == 0


# -- stop: what was due and not started is unsent, what was not yet due is nothing ----------------------

def test_a_stop_on_time_wakes_the_dispatcher_at_once_and_leaves_nothing_unsent() -> None:
    pattern = OpenLoop(rate=100, duration=2.0)
    run = Harness()
    run.clock.call_at(START_T + 0.5025, run.dispatcher.stop)
    run.dispatcher.run(START_T, schedule(pattern))
    assert run.clock.now() == START_T + 0.5025  # not at the next arrival (0.51 s)
    assert run.intended == instants(pattern)[:51]
    assert run.dispatcher.unsent == 0 and run.unsent_reports == []


@pytest.mark.parametrize(("stop_at_s", "unsent"), [
    (None, 139),  # stopped when the stall ends (1.5025 s): every arrival of the run not started is unsent
    (0.5025, 40),  # stopped as of 0.5025 s: only those due by then (0.305 s to 0.5 s)
])
def test_a_stall_that_outlasts_the_run_leaves_the_arrivals_due_by_the_stop_unsent(stop_at_s, unsent) -> None:
    """200 arrivals/s for 1 s; the host stalls from 0.3025 s for 1.2 s and the run is stopped when it comes
    back: the 61 arrivals up to 0.3 s were sent, and each of the others due by the stop is unsent."""
    pattern = OpenLoop(rate=200, duration=1.0)
    run = Harness()
    at_t = None if stop_at_s is None else START_T + stop_at_s

    def stall_then_stop() -> None:
        run.clock.stall(1.2)
        run.dispatcher.stop(at_t)

    run.clock.call_at(START_T + 0.3025, stall_then_stop)
    run.dispatcher.run(START_T, schedule(pattern))
    assert run.intended == instants(pattern)[:61]
    assert run.dispatcher.unsent == unsent and run.unsent_reports == [unsent]
    assert run.dropped == []


def test_a_host_resumed_past_the_deadline_leaves_the_rest_unsent_without_a_stop() -> None:
    """200 arrivals/s for 1 s, the deadline (the run's backstop) at 2 s; the host stalls from 0.3025 s for
    3 s and nothing calls stop: on resuming the dispatcher finds the deadline passed and starts none of the
    late arrivals (no burst after the run's end); all 139 not started are unsent, as of the deadline."""
    pattern = OpenLoop(rate=200, duration=1.0)
    run = Harness()
    run.dispatcher.deadline = START_T + 2.0
    run.clock.call_at(START_T + 0.3025, lambda: run.clock.stall(3.0))
    run.dispatcher.run(START_T, schedule(pattern))
    assert run.intended == instants(pattern)[:61]
    assert run.dispatcher.unsent == 139 and run.unsent_reports == [139] and run.dropped == []


def test_a_stall_that_ends_before_the_deadline_sends_every_late_arrival() -> None:
    """The same stall, ended at 1.5025 s with the deadline at 2 s: every late arrival is started (with its
    lag), none unsent."""
    pattern = OpenLoop(rate=200, duration=1.0)
    run = Harness()
    run.dispatcher.deadline = START_T + 2.0
    run.clock.call_at(START_T + 0.3025, lambda: run.clock.stall(1.2))
    run.run(pattern)
    assert run.intended == instants(pattern) and run.dispatcher.unsent == 0


def test_unsent_arrivals_are_counted_across_schedule_chunks() -> None:
    """10 000 arrivals/s for 2 s come in three chunks of the schedule; stopped as of 1.5 s after a stall
    at 0.10005 s, every arrival from 0.1001 s to 1.4999 s is unsent, the chunks not yet reached too."""
    pattern = OpenLoop(rate=10_000, duration=2.0)
    run = Harness()

    def stall_then_stop() -> None:
        run.clock.stall(5.0)
        run.dispatcher.stop(START_T + 1.5)

    run.clock.call_at(START_T + 0.10005, stall_then_stop)
    run.dispatcher.run(START_T, schedule(pattern))
    assert len(run.sent) == 1001
    assert run.dispatcher.unsent == 15_000 - 1001


def test_a_killed_dispatcher_counts_as_stopped_at_that_instant() -> None:
    pattern = OpenLoop(rate=200, duration=1.0)
    run = Harness()
    dispatching = gevent.spawn(run.dispatcher.run, START_T, schedule(pattern))

    def stall_then_kill() -> None:
        run.clock.stall(0.2)
        dispatching.kill(block=False)

    run.clock.call_at(START_T + 0.3025, stall_then_kill)
    dispatching.join()
    assert len(run.sent) == 61
    assert run.dispatcher.unsent == 40  # due by the kill (0.5025 s) and not started: 0.305 s to 0.5 s


# -- end_at: handing the rest of the schedule to other dispatchers --------------------------------------

def test_a_share_ended_at_an_instant_and_its_successors_send_the_schedule_once() -> None:
    """Share 0/1 ends at 0.4025 s (it returns on reaching its first arrival from then on, without waiting
    for it); shares 0/2 and 1/2 from 0.4025 s send the rest: the schedule exactly once, nothing unsent."""
    pattern = OpenLoop(arrival="poisson", rate=300, duration=0.8, seed=3)
    first = Harness()
    first.dispatcher.end_at(START_T + 0.4025)
    first.dispatcher.run(START_T, schedule(pattern))
    assert first.clock.now() == first.intended[-1]  # returned on reaching the next arrival, not waiting
    assert first.intended == [t for t in instants(pattern) if t < START_T + 0.4025]
    assert first.dispatcher.unsent == 0
    later = [Harness() for _ in range(2)]
    for k, run in enumerate(later):
        run.run(pattern, share=(k, 2), start_s=0.4025)
        assert run.dispatcher.unsent == 0
    sent = first.intended + later[0].intended + later[1].intended
    assert sorted(sent) == instants(pattern) and len(first.intended) > 100


def test_end_at_during_a_wait_returns_at_the_end_not_at_the_next_arrival() -> None:
    pattern = OpenLoop(rate=1, duration=5.0)
    run = Harness()
    run.clock.call_at(START_T + 0.5, lambda: run.dispatcher.end_at(START_T + 0.7))
    run.dispatcher.run(START_T, schedule(pattern))
    assert run.clock.now() == START_T + 0.7
    assert run.intended == [START_T] and run.dispatcher.unsent == 0


def test_arrivals_past_the_end_are_not_unsent_when_a_stall_outlasts_it() -> None:
    """Ended at 0.6025 s and stopped after a stall (0.3025 s to 1.5025 s): only the arrivals due before the
    end (0.305 s to 0.6 s) are this dispatcher's unsent; the later ones were another's."""
    pattern = OpenLoop(rate=200, duration=1.0)
    run = Harness()
    run.dispatcher.end_at(START_T + 0.6025)

    def stall_then_stop() -> None:
        run.clock.stall(1.2)
        run.dispatcher.stop()

    run.clock.call_at(START_T + 0.3025, stall_then_stop)
    run.dispatcher.run(START_T, schedule(pattern))
    assert len(run.sent) == 61 and run.dispatcher.unsent == 60


# -- the real clock -------------------------------------------------------------------------------------

def test_the_real_clock_never_returns_from_a_spin_before_the_instant() -> None:
    clock = MonotonicClock()
    for step in range(200):
        t = clock.now() + step * 1e-6
        clock.spin_until(t)
        assert time.monotonic() >= t
