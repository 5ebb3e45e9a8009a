"""A fake Clock for the dispatcher (loadgen/driver/dispatcher.py): time moves only when the code waits.

The dispatcher runs on this process's gevent hub as it does in a run, but its sleeps take no wall time:
a sleep ends by moving the clock to the instant it was for, after running, in time order, the calls
scheduled up to then (`call_at`: a request's answer, a stop, a stall of the host). After each such call
the greenlets it woke run, as the hub would run them, before time moves on. A spin moves the clock to
its instant and runs nothing, as a real spin holds the loop.

`wake_late_s` makes every alarm go off that much after its instant (negative: before it), as a real
timer wakes late by the host's wake-up latency.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import gevent


class FakeClock:
    def __init__(self, t: float = 1000.0, wake_late_s: float = 0.0) -> None:
        self.t = t
        self.wake_late_s = wake_late_s
        self.sleeps: list[tuple[float, float]] = []
        """(from, until): every sleep, the instant it began and the instant asked for."""
        self.spins: list[tuple[float, float]] = []
        """(from, until): every spin that had time to cover."""
        self._calls: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def spin_until(self, t: float) -> None:
        if t > self.t:
            self.spins.append((self.t, t))
            self.t = t

    def alarm(self) -> FakeAlarm:
        return FakeAlarm(self)

    def call_at(self, t: float, call: Callable[[], None]) -> None:
        """Run `call` when time reaches `t` (at the first sleep that passes it: late if the clock already
        has, as a loop that was busy runs its timers late)."""
        heapq.heappush(self._calls, (t, next(self._seq), call))

    def stall(self, for_s: float) -> None:
        """The host takes the process away for `for_s`: time jumps, nothing runs meanwhile."""
        self.t += for_s

    def run_until(self, t: float) -> None:
        """Run the scheduled calls due by `t`, then move to `t` (never back)."""
        self._run(lambda: t)

    def _run(self, end: Callable[[], float]) -> None:
        """Run the scheduled calls due by `end()` (read again after each: a call may move it), then move
        to that instant."""
        calls = self._calls
        while calls and calls[0][0] <= end():
            when, _, call = heapq.heappop(calls)
            self.t = max(self.t, when)
            call()
            gevent.sleep(0)  # the greenlets the call woke run now, as on a hub that is free
        self.t = max(self.t, end())


class FakeAlarm:
    """The fake clock's alarm: `sleep_until` runs the clock to the instant (which `set` may move)."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock
        self._wake_t: float | None = None

    def sleep_until(self, t: float) -> None:
        clock = self._clock
        clock.sleeps.append((clock.t, t))
        self._wake_t = t + clock.wake_late_s
        try:
            clock._run(lambda: self._wake_t)
        finally:
            self._wake_t = None

    def set(self, t: float) -> None:
        if self._wake_t is not None:  # a sleep is in progress (as for a timerfd, the next sleep re-arms)
            self._wake_t = t + self._clock.wake_late_s

    def close(self) -> None:
        self._wake_t = None
