"""The open-loop dispatcher: starts each request at its intended time (the driver stage, open loop).

One dispatcher greenlet per process walks the schedule (offsets from the run start, fixed in
advance) and, at each intended instant, starts the request in its own greenlet. It wakes on a
timerfd armed for the exact instant (loadgen/lowlevel/timerfd.py): gevent's own sleeps round to whole
milliseconds, and that error would land in every open-loop latency.

Measurement rules kept here:
- an arrival whose instant has passed is started at once and keeps its intended time, so the
  waiting counts in its latency (no coordinated omission) and shows as lag;
- an arrival that finds `max_in_flight` requests outstanding is dropped and counted, never
  queued or delayed silently;
- an arrival still ahead of the dispatcher when it is stopped (the run ended, or was stopped, while
  the dispatcher was behind: a host stall longer than the run's backstop) is counted as unsent when its
  instant had come by the stop, so every arrival due in the run window is exactly one of started,
  dropped or unsent. Arrivals after the stop instant were never due and are not counted.

A dispatcher can also be given an end (`end_at`): arrivals from that instant on belong to another
dispatcher (a distributed run reshuffled its shares) and it returns, counting nothing, when it
reaches the first of them.

It reads the time and waits through a Clock: by default the real one (MonotonicClock: time.monotonic
and the timerfd, then a spin); tests/test_dispatcher_units.py gives it a fake one to check the rules
above without wall time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
from gevent.event import Event
from gevent.hub import get_hub
from greenlet import getcurrent, greenlet

from loadgen.lowlevel.timerfd import TimerFD, reduce_timer_slack
from loadgen.outcome import Outcome

__all__ = ["Alarm", "Clock", "Dispatcher", "MonotonicClock"]

# Closer than this to the intended instant, arming the timer costs more than it saves.
_EARLY_S = 15e-6
# A core that went idle takes ~90 us (p50; ~170 us p99, measured on these VMs) to wake, so the
# timer fires up to this much before the instant and the rest is spun. The spin is capped at a
# tenth of the wait, so it costs at most ~10 % of a core at any rate, and nothing at high rates,
# where the core never idles deeply.
_SPIN_S = 200e-6
_SPIN_FRACTION = 0.1


class Alarm(Protocol):
    """A one-shot alarm that one greenlet sleeps on (the dispatcher's, for one run)."""

    def sleep_until(self, t: float) -> None:
        """Block the calling greenlet (the others run) until about `t`, or until `set` says otherwise.
        It may return a little early or late: the caller spins the rest or counts the lateness."""

    def set(self, t: float) -> None:
        """Move the alarm to `t`: a sleep in progress ends then (at once for an instant past)."""

    def close(self) -> None:
        """Release what the alarm holds."""


class Clock(Protocol):
    """Where a dispatcher reads the time (monotonic seconds) and waits for an instant."""

    def now(self) -> float:
        """The current instant."""

    def spin_until(self, t: float) -> None:
        """Return at `t` or just after, never before (the real clock busy-waits the last microseconds)."""

    def alarm(self) -> Alarm:
        """A new alarm, for the calling greenlet's sleeps; closed by whoever asked for it."""


class MonotonicClock:
    """The real clock: time.monotonic(), sleeps on a timerfd on the gevent hub, and a spin to the instant."""

    now = staticmethod(time.monotonic)

    @staticmethod
    def spin_until(t: float) -> None:
        monotonic = time.monotonic
        while monotonic() < t:  # never early, even by microseconds
            pass

    def alarm(self) -> _TimerAlarm:
        return _TimerAlarm()


class _TimerAlarm:
    """A TimerFD armed for absolute instants, watched by the hub of the greenlet that made it."""

    def __init__(self) -> None:
        reduce_timer_slack()
        self._timer = TimerFD()
        self._hub = get_hub()
        self._watcher = self._hub.loop.io(self._timer.fileno(), 1)

    def sleep_until(self, t: float) -> None:
        self._timer.arm(t)
        self._hub.wait(self._watcher)
        self._timer.consume()

    def set(self, t: float) -> None:
        self._timer.arm(t)

    def close(self) -> None:
        self._watcher.close()
        self._timer.close()


class Dispatcher:
    """Walks `schedule` from `start_t`, calling `send(intended_t)` in a greenlet per arrival
    (`send(intended_t, row)` for a schedule of (offsets, rows) chunks: a trace's rows).

    `on_outcome` receives every Outcome; `on_dropped` every intended time that was dropped;
    `on_unsent` the count of arrivals left unsent when it was stopped (once, when it returns).
    Instants (`start_t`, `stop(at_t)`, `end_at`, `deadline`) are readings of `clock`, by default time.monotonic().
    """

    def __init__(
        self,
        send: Callable[..., Outcome],
        on_outcome: Callable[[Outcome], None],
        on_dropped: Callable[[float], None],
        max_in_flight: int,
        on_unsent: Callable[[int], None] | None = None,
        clock: Clock | None = None,
        deadline: float = float("inf"),
    ) -> None:
        self._clock: Clock = MonotonicClock() if clock is None else clock
        self._send = send
        self._on_outcome = on_outcome
        self._on_dropped = on_dropped
        self._on_unsent = on_unsent
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.peak_in_flight = 0
        self.unsent = 0
        """Arrivals due by the stop instant that were never started."""
        self._stop = Event()
        self._stop_t = float("inf")  # arrivals due before this instant and not started are unsent
        self._end_t = float("inf")  # arrivals from this instant on are not this dispatcher's
        self.deadline = deadline  # no arrival is started from this instant on (a stop at it)
        self._waiting_for = float("inf")
        self._alarm: Alarm | None = None
        self._idle = Event()
        self._idle.set()

    def stop(self, at_t: float | None = None) -> None:
        """Start no further arrivals (in-flight requests go on); those due by `at_t` (monotonic; default
        now) and not started count as unsent."""
        if not self._stop.is_set():
            self._stop_t = self._clock.now() if at_t is None else at_t
            self._stop.set()
        if self._alarm is not None:
            self._alarm.set(0.0)  # wake the dispatcher now rather than at the next arrival

    @property
    def stopped(self) -> bool:
        """Whether `stop` was called (an end by `end_at` is no stop)."""
        return self._stop.is_set()

    def end_at(self, end_t: float) -> None:
        """Leave the arrivals from `end_t` (monotonic) on to another dispatcher: return on reaching one."""
        self._end_t = min(self._end_t, end_t)
        if self._alarm is not None and self._waiting_for >= self._end_t:
            self._alarm.set(self._end_t)  # waiting for an arrival that is no longer ours: stop waiting

    def run(self, start_t: float, schedule: Iterable[np.ndarray | tuple[np.ndarray, np.ndarray]]) -> None:
        """Dispatch every arrival of `schedule` (chunks of offsets in seconds, or of (offsets, rows): each
        arrival is then sent with its row) unless stopped first.

        However it returns (stopped, or its greenlet killed: a kill counts as a stop at that instant),
        the arrivals it had not reached that were due by the stop are counted as unsent.
        """
        now, spin_until, deadline = self._clock.now, self._clock.spin_until, self.deadline
        alarm = self._alarm = self._clock.alarm()
        sleep_until = alarm.sleep_until
        chunks = iter(schedule)
        arrivals: list[float] = []
        handled = 0  # arrivals[:handled] were started or dropped
        try:
            for chunk in chunks:
                offsets, rows = chunk if isinstance(chunk, tuple) else (chunk, None)
                arrivals, handled = (start_t + offsets).tolist(), 0
                each_row = rows.tolist() if rows is not None else [None] * len(arrivals)
                for intended_t, row in zip(arrivals, each_row):
                    if intended_t >= self._end_t or self._stop.is_set():
                        return
                    t = now()
                    if t >= deadline:  # resumed past the run's backstop: the rest is unsent
                        self.stop(deadline)
                        return
                    wait = intended_t - t
                    if wait > 0.0:  # not yet due (behind schedule, it starts at once)
                        if wait > _EARLY_S:
                            self._waiting_for = intended_t
                            sleep_until(min(intended_t - min(_SPIN_S, wait * _SPIN_FRACTION), self._end_t))
                            self._waiting_for = float("inf")
                            if intended_t >= self._end_t or self._stop.is_set():
                                return
                            if now() >= deadline:  # the sleep outlasted the backstop (a stall)
                                self.stop(deadline)
                                return
                        spin_until(intended_t)  # never early, even by microseconds
                    handled += 1
                    self._start(intended_t, row)
        finally:
            self._alarm = None
            alarm.close()
            self._count_unsent(start_t, arrivals[handled:], chunks)

    def _count_unsent(self, start_t: float, rest: list[float], chunks: Iterable[np.ndarray]) -> None:
        """Count the arrivals of `rest` and of the chunks after it that were due by the stop (and ours)."""
        if not self._stop.is_set():
            self._stop_t = self._clock.now()  # ended otherwise than by stop(): by a kill, at this instant
        limit = min(self._stop_t, self._end_t)
        count = sum(1 for intended_t in rest if intended_t < limit)
        if not rest or rest[-1] < limit:
            for chunk in chunks:
                offsets = chunk[0] if isinstance(chunk, tuple) else chunk
                due = int(np.count_nonzero(start_t + offsets < limit))
                count += due
                if due < len(offsets):
                    break
        self.unsent += count
        if count and self._on_unsent is not None:
            self._on_unsent(count)

    def _start(self, intended_t: float, row: int | None) -> None:
        if self.in_flight >= self.max_in_flight:
            self._on_dropped(intended_t)
            return
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self._idle.clear()
        # Run the request greenlet now, not on the hub's next turn: it sends at once and the
        # dispatcher resumes when it first blocks (spawning instead cost ~50 us more lag).
        hub = get_hub()
        request = greenlet(self._one, parent=hub)
        hub.loop.run_callback(getcurrent().switch)
        request.switch(intended_t, row)

    def _one(self, intended_t: float, row: int | None) -> None:
        try:
            self._on_outcome(self._send(intended_t) if row is None else self._send(intended_t, row))
        except BaseException:  # noqa: BLE001 - an error here must not reach the hub
            get_hub().handle_error(getcurrent(), *sys.exc_info())
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or `timeout` passes (False)."""
        return self._idle.wait(timeout)
