"""The open-loop dispatcher: starts each request at its intended time (the driver stage, open loop).

One dispatcher greenlet per process walks the schedule (offsets from the run start, fixed in
advance) and, at each intended instant, starts the request in its own greenlet. It wakes on a
timerfd armed for the exact instant (servers/core/timerfd.py): gevent's own sleeps round to whole
milliseconds, and that error would land in every open-loop latency.

Measurement rules kept here:
- an arrival whose instant has passed is started at once and keeps its intended time, so the
  waiting counts in its latency (no coordinated omission) and shows as lag;
- an arrival that finds `max_in_flight` requests outstanding is dropped and counted, never
  queued or delayed silently.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
from gevent.event import Event
from gevent.hub import get_hub
from greenlet import getcurrent, greenlet

from loadgen.outcome import Outcome
from servers.core.timerfd import TimerFD, reduce_timer_slack

__all__ = ["Dispatcher"]

# Closer than this to the intended instant, arming the timer costs more than it saves.
_EARLY_S = 15e-6
# A core that went idle takes ~90 us (p50; ~170 us p99, measured on these VMs) to wake, so the
# timer fires up to this much before the instant and the rest is spun. The spin is capped at a
# tenth of the wait, so it costs at most ~10 % of a core at any rate, and nothing at high rates,
# where the core never idles deeply.
_SPIN_S = 200e-6
_SPIN_FRACTION = 0.1


class Dispatcher:
    """Walks `schedule` from `start_t`, calling `send(intended_t)` in a greenlet per arrival.

    `on_outcome` receives every Outcome; `on_dropped` every intended time that was dropped.
    """

    def __init__(
        self,
        send: Callable[[float], Outcome],
        on_outcome: Callable[[Outcome], None],
        on_dropped: Callable[[float], None],
        max_in_flight: int,
    ) -> None:
        self._send = send
        self._on_outcome = on_outcome
        self._on_dropped = on_dropped
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.peak_in_flight = 0
        self._stop = Event()
        self._timer: TimerFD | None = None
        self._idle = Event()
        self._idle.set()

    def stop(self) -> None:
        """Start no further arrivals (in-flight requests go on)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.arm(0.0)  # wake the dispatcher now rather than at the next arrival

    def run(self, start_t: float, schedule: Iterable[np.ndarray]) -> None:
        """Dispatch every arrival of `schedule` (offsets in seconds) unless stopped first."""
        reduce_timer_slack()
        timer = self._timer = TimerFD()
        hub = get_hub()
        watcher = hub.loop.io(timer.fileno(), 1)
        try:
            for chunk in schedule:
                for intended_t in (start_t + chunk).tolist():
                    if self._stop.is_set():
                        return
                    wait = intended_t - time.monotonic()
                    if wait > _EARLY_S:
                        timer.arm(intended_t - min(_SPIN_S, wait * _SPIN_FRACTION))
                        hub.wait(watcher)
                        timer.consume()
                        if self._stop.is_set():
                            return
                    while time.monotonic() < intended_t:  # never early, even by microseconds
                        pass
                    self._start(intended_t)
        finally:
            watcher.close()
            self._timer = None
            timer.close()

    def _start(self, intended_t: float) -> None:
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
        request.switch(intended_t)

    def _one(self, intended_t: float) -> None:
        try:
            self._on_outcome(self._send(intended_t))
        except BaseException:  # noqa: BLE001 - an error here must not reach the hub
            get_hub().handle_error(getcurrent(), *sys.exc_info())
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or `timeout` passes (False)."""
        return self._idle.wait(timeout)
