"""Call-at-an-instant for asyncio loops, precise to tens of microseconds instead of a millisecond.

asyncio (and uvloop) round timer waits to whole milliseconds, so `loop.call_at` can run a callback
up to ~1 ms late. Servers that promise a latency (the calibration server, injected delays in the
reference servers) schedule through PreciseScheduler instead: a heap of (deadline, seq, call) and one
TimerFD (loadgen/lowlevel/timerfd.py) armed at the earliest deadline and watched with `loop.add_reader`.
When it becomes readable every call whose deadline has passed runs, in deadline order (ties in the
order they were scheduled), and the timer is re-armed for the next one.

Deadlines are time.monotonic() seconds, not loop.time() (uvloop's clock is a millisecond counter).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any

from loadgen.lowlevel.timerfd import TimerFD

# An idle core takes ~120 us (p50) to ~200 us (p99) to wake on these VMs, so the timer is armed this
# much early and the rest is spun. Spinning is paid from a budget that refills at _SPIN_SHARE of
# wall time, so a busy server (whose core never idles deeply anyway) spins at most that share.
_EARLY_S = 300e-6
_SPIN_SHARE = 0.1
_SPIN_BUDGET_MAX_S = 0.005


class ScheduledCall:
    """One pending call; `cancel()` before it runs keeps it from running."""

    __slots__ = ("args", "callback", "cancelled")

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class PreciseScheduler:
    """Run callbacks at time.monotonic() deadlines on `loop`, through one timerfd.

    Example:
        scheduler = PreciseScheduler(asyncio.get_running_loop())
        scheduler.call_at(time.monotonic() + 0.020, transport.write, response)
        ...
        scheduler.close()
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer = TimerFD()
        self._heap: list[tuple[float, int, ScheduledCall]] = []
        self._seq = itertools.count()
        self._armed_for = float("inf")
        self._spin_budget = _SPIN_BUDGET_MAX_S
        self._budget_t = time.monotonic()
        loop.add_reader(self._timer.fileno(), self._on_timer)

    def __len__(self) -> int:
        """Calls scheduled and not yet run (cancelled ones included until their deadline)."""
        return len(self._heap)

    def call_at(self, deadline: float, callback: Callable[..., Any], *args: Any) -> ScheduledCall:
        """Run callback(*args) on the loop at `deadline` (time.monotonic() seconds).

        A deadline already past runs on the next loop iteration, never inside this call.
        """
        call = ScheduledCall(callback, args)
        heapq.heappush(self._heap, (deadline, next(self._seq), call))
        if deadline < self._armed_for:
            self._arm(deadline)
        return call

    def close(self) -> None:
        """Stop watching the timer and drop every pending call."""
        if self._timer.fileno() < 0:
            return
        self._loop.remove_reader(self._timer.fileno())
        self._timer.close()
        self._heap.clear()

    def _arm(self, deadline: float) -> None:
        self._timer.arm(deadline - _EARLY_S)
        self._armed_for = deadline

    def _spin_until(self, deadline: float) -> None:
        """Busy-wait for `deadline` if the spin budget allows (else the calls run a little late)."""
        now = time.monotonic()
        self._spin_budget = min(_SPIN_BUDGET_MAX_S, self._spin_budget + (now - self._budget_t) * _SPIN_SHARE)
        self._budget_t = now
        wait = deadline - now
        if 0 < wait <= self._spin_budget:
            while time.monotonic() < deadline:
                pass
            self._spin_budget -= wait

    def _on_timer(self) -> None:
        self._timer.consume()
        self._armed_for = float("inf")
        heap = self._heap
        if heap:
            self._spin_until(heap[0][0])
        try:
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                _, _, call = heapq.heappop(heap)
                if not call.cancelled:
                    call.callback(*call.args)
                now = time.monotonic()
        finally:
            # Re-armed even when a callback raised (the loop reports the exception; the calls still
            # due then run at once). The timerfd may also wake a few nanoseconds before a float
            # deadline (its value is truncated to whole nanoseconds): re-arming then fires at once.
            if heap and self._timer.fileno() >= 0:
                self._arm(heap[0][0])
