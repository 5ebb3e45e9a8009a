"""The calibration server's timing model: when the answer to a request arriving at t is done.

This is the ground truth the load generator is checked against (DESIGN.md, "Numbers must be true"):
the server runs this model live, and a test runs the same model over the arrival instants it knows to
compute the latency it should have measured. Pure computation, no I/O, no clock reading.

All instants are time.monotonic() seconds (CLOCK_MONOTONIC, the same clock in every process on the
machine). The arrival instant is when the server has parsed the complete request.

The model, in order:
1. Stalls: with `stall_every_s` = S and `stall_for_s` = T the server is stalled during the windows
   [t0 + k*S, t0 + k*S + T) for k = 1, 2, ...; a request arriving inside a window is released at the
   window's end, any other request at its arrival.
2. Either a fixed delay D (`delay_ms`): done = released + D;
   or N FIFO workers with a fixed service time X (`service_ms`, `workers`): the request starts at
   max(released, earliest instant a worker is free) and is done X later.

Example:
    >>> model = TimingModel(TimingConfig(delay_ms=20, stall_every_s=1.0, stall_for_s=0.25), t0=100.0)
    >>> model.done_at(100.5), model.done_at(101.1)  # outside, then inside the first window
    (100.52, 101.27)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class TimingConfig:
    """The declared latency of the calibration server; times in the unit their name ends with."""

    delay_ms: float = 0.0
    """Fixed delay from release to done (ignored when service_ms > 0)."""
    stall_every_s: float = 0.0
    """Period S of the stall windows; 0 = never stall."""
    stall_for_s: float = 0.0
    """Length T of each stall window; must be below S."""
    service_ms: float = 0.0
    """Service time X of each FIFO worker; 0 = no queueing, use delay_ms."""
    workers: int = 1
    """Number N of FIFO workers (only with service_ms > 0)."""

    @property
    def queued(self) -> bool:
        """True when requests queue for FIFO workers instead of taking a fixed delay."""
        return self.service_ms > 0

    @property
    def stalls(self) -> bool:
        return self.stall_every_s > 0 and self.stall_for_s > 0

    def problems(self) -> list[str]:
        """Every reason this config is invalid, empty when it is valid."""
        found = [
            f"{name} must be a finite number >= 0, got {value}"
            for name, value in self._durations()
            if not (math.isfinite(value) and value >= 0)
        ]
        if not self._workers_valid():
            found.append(f"workers must be an integer >= 1, got {self.workers!r}")
        return found + self._combination_problems()

    def _workers_valid(self) -> bool:
        return isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 1

    def _durations(self) -> list[tuple[str, float]]:
        return [
            ("delay_ms", self.delay_ms),
            ("stall_every_s", self.stall_every_s),
            ("stall_for_s", self.stall_for_s),
            ("service_ms", self.service_ms),
        ]

    def _combination_problems(self) -> list[str]:
        found = []
        if self.delay_ms > 0 and self.service_ms > 0:
            found.append("give either delay_ms or service_ms, not both (service_ms replaces the delay)")
        if (self.stall_every_s > 0) != (self.stall_for_s > 0):
            found.append("stall_every_s and stall_for_s go together: give both or neither")
        elif self.stalls and self.stall_for_s >= self.stall_every_s:
            found.append(
                f"stall_for_s ({self.stall_for_s}) must be shorter than stall_every_s ({self.stall_every_s})"
            )
        if self._workers_valid() and self.workers > 1 and not self.queued:
            found.append("workers only applies with service_ms > 0")
        return found

    def validate(self) -> None:
        """Raise ValueError naming every problem at once."""
        found = self.problems()
        if found:
            raise ValueError("; ".join(found))


class TimingModel:
    """Done instants for a stream of arrivals, in arrival order, from a server started at t0.

    `done_at` is stateful when workers are modelled (each call occupies a worker), so feed it the
    arrivals in the order the server saw them; `released_at` is a pure function.
    """

    def __init__(self, config: TimingConfig, t0: float) -> None:
        config.validate()
        self.config = config
        self.t0 = t0
        self._delay_s = config.delay_ms / 1000.0
        self._service_s = config.service_ms / 1000.0
        # Instants at which each worker becomes free; -inf = free since forever.
        self._free_at = [-math.inf] * config.workers

    def released_at(self, arrival_t: float) -> float:
        """The instant a request arriving at arrival_t leaves any stall window (arrival_t if none)."""
        if not self.config.stalls:
            return arrival_t
        period = self.config.stall_every_s
        k = math.floor((arrival_t - self.t0) / period)
        if k < 1:
            return arrival_t
        window_end = self.t0 + k * period + self.config.stall_for_s
        return max(arrival_t, window_end)

    def done_at(self, arrival_t: float) -> float:
        """The instant the answer to a request arriving at arrival_t is done."""
        released = self.released_at(arrival_t)
        if not self.config.queued:
            return released + self._delay_s
        start = max(released, heapq.heappop(self._free_at))
        done = start + self._service_s
        heapq.heappush(self._free_at, done)
        return done

    def done_all(self, arrivals: Iterable[float]) -> list[float]:
        """done_at for each arrival, in order (the truth for a whole run)."""
        return [self.done_at(t) for t in arrivals]
