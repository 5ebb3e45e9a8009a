"""Turn request outcomes into HDR histograms, per interval and for the whole run.

Place in the flow: Driver -> Protocol client -> Outcome -> **Recorder** -> sinks (Locust events,
Prometheus, .hlog, summary JSON, terminal table). The recorder knows no protocol: it takes four
numbers per request.

Measurement rules (the one place they are written down)
-------------------------------------------------------
Every request brings monotonic timestamps in seconds: intended_t (when the schedule said to send),
sent_t (when it was actually sent), done_t (when the response completed), and an error kind (None
when it succeeded, else a short string such as "http_503", "timeout", "connect", "invalid_response").

- latency = done_t - intended_t. Open loop measures from the intended send time, so a request that
  could not leave on time still counts its wait: free of coordinated omission.
- service = done_t - sent_t: what the endpoint (and the network) took.
- lag     = sent_t - intended_t: how late the generator was; its own health, not the server's.
- Only successful requests enter the latency and service histograms. Every request, ok or error,
  enters lag. Errors are counted by kind.
- A dropped arrival (could not be started: in-flight cap reached) is counted and has no latency.
- completed_in_window counts responses (ok or error) with done_t <= window_end_t, judged when the
  sample is flushed; achieved rate is that count over the run's duration.
- sent counts record() calls.
- Values are integer microseconds, rounded to nearest (half to even), recorded in
  HdrHistogram(1, 3_600_000_000, 3). A value below 0 or above one hour (or not a number) is clamped
  to the nearest edge, recorded, and counted in out_of_range: never silently lost. 0 is in range.
- A sample belongs to the interval that is open when it is flushed: record() is called when the
  response completes, and the driver closes intervals on the clock.

Hot path: record() only appends to plain lists; flush() converts each batch with numpy and records it
with record_many (one vectorised step per histogram), so a request costs well under a microsecond.
Closing an interval costs about a millisecond in all; `close_interval_steps` does it in slices of
~0.1 ms so that the generator's event loop can read responses between them (a response read late
is service time measured wrong).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np

from loadgen.recorder._figures import COUNTERS, HISTOGRAMS, HistogramSet, Interval, add_histogram
from loadgen.recorder._hdr import HIGHEST_US, record_many

# Before casting to int64, pull floats into a range that stays out of range (so it is counted) but
# cannot overflow; NaN is treated as too large.
_LOW_SENTINEL_US = -1.0
_HIGH_SENTINEL_US = float(HIGHEST_US + 1)


class Recorder:
    """Collects outcomes into interval HistogramSets and a cumulative one.

    >>> rec = Recorder(start_t=100.0)
    >>> rec.record(intended_t=100.0, sent_t=100.0002, done_t=100.0015, error=None)
    >>> rec.finish(end_t=101.0)
    >>> rec.cumulative.percentiles_ms("latency")["max"], rec.cumulative.percentiles_ms("lag")["max"]
    (1.5, 0.2)
    """

    def __init__(self, start_t: float, interval_s: float = 1.0, window_end_t: float = float("inf")) -> None:
        self.start_t = start_t
        """Monotonic time the run (and the first interval) starts."""
        self.interval_s = interval_s
        """Intended interval length; the driver calls close_interval on that beat."""
        self.window_end_t = window_end_t
        """Responses completing after this instant do not count towards completed_in_window."""
        self.cumulative = HistogramSet()
        """Sum of every closed (or merged) interval."""
        self.intervals: list[Interval] = []
        """Closed intervals, oldest first (merged ones in arrival order)."""
        self.closing = False
        """True while a closed interval is being added into `cumulative` in slices (close_interval_steps):
        `cumulative` then holds part of it, so readers between slices (a live exporter) wait for False."""
        self._current = HistogramSet()
        self._spare: HistogramSet | None = None  # the next interval's, made ahead of time
        self._current_start_t = start_t
        self._finished = False
        self._ok_intended: list[float] = []
        self._ok_sent: list[float] = []
        self._ok_done: list[float] = []
        self._failed: list[tuple[float, float, float, str]] = []
        self._dropped = 0

    def record(self, intended_t: float, sent_t: float, done_t: float, error: str | None) -> None:
        """Buffer one request's outcome (hot path: list appends only)."""
        if error is None:
            self._ok_intended.append(intended_t)
            self._ok_sent.append(sent_t)
            self._ok_done.append(done_t)
        else:
            self._failed.append((intended_t, sent_t, done_t, error))

    def record_dropped(self, intended_t: float) -> None:
        """Count an arrival that could not be started; it has no latency."""
        self._dropped += 1

    def flush(self) -> None:
        """Move every buffered sample into the current interval's histograms and counters."""
        for _ in self._flush_steps(self._current, self._take_buffers()):
            pass

    def close_interval(self, end_t: float) -> Interval:
        """Flush, close [previous end, end_t), add it into cumulative and start the next one."""
        for _ in self.close_interval_steps(end_t):
            pass
        return self.intervals[-1]

    def close_interval_steps(self, end_t: float) -> Iterator[None]:
        """close_interval as a generator that pauses between slices of work (~0.1 ms each).

        The next interval opens at the first slice, so samples recorded while the caller runs
        other work between slices belong to it. The closed interval is in `intervals` and in
        `cumulative` once the generator is exhausted.
        """
        figures, taken = self._current, self._take_buffers()
        self._current = self._spare if self._spare is not None else HistogramSet()
        self._spare = None
        start_t, self._current_start_t = self._current_start_t, end_t
        yield
        yield from self._flush_steps(figures, taken)
        self.closing = True
        yield from self._add_steps(self.cumulative, figures)
        self.intervals.append(Interval(start_t=start_t, end_t=end_t, figures=figures))
        self.closing = False
        self._spare = HistogramSet()

    @staticmethod
    def _add_steps(into: HistogramSet, figures: HistogramSet) -> Iterator[None]:
        for name in HISTOGRAMS:
            add_histogram(getattr(into, name), getattr(figures, name))
            yield
        for name in COUNTERS:
            setattr(into, name, getattr(into, name) + getattr(figures, name))
        for kind, count in figures.errors.items():
            into.errors[kind] = into.errors.get(kind, 0) + count

    def finish(self, end_t: float) -> None:
        """Close the last, possibly partial, interval; calling it again changes nothing."""
        self.flush()
        if _is_empty(self._current) and (self._finished or end_t <= self._current_start_t):
            self._finished = True
            return
        self.close_interval(end_t)
        self._finished = True

    def merge_interval(self, interval: Interval) -> None:
        """Keep an interval recorded elsewhere (a worker's, decoded) and add it into cumulative."""
        self.cumulative.add(interval.figures)
        self.intervals.append(interval)

    def _take_buffers(self) -> tuple[list[float], list[float], list[float], list, int]:
        """Hand over every buffered sample and start empty buffers (record() appends to the new ones)."""
        taken = (self._ok_intended, self._ok_sent, self._ok_done, self._failed, self._dropped)
        self._ok_intended, self._ok_sent, self._ok_done, self._failed = [], [], [], []
        self._dropped = 0
        return taken

    def _flush_steps(self, figures: HistogramSet, taken: tuple) -> Iterator[None]:
        ok_intended, ok_sent, ok_done, failed, dropped = taken
        figures.dropped += dropped
        if ok_done:
            intended, sent, done = (np.array(column, dtype=np.float64) for column in (ok_intended, ok_sent, ok_done))
            figures.out_of_range += record_many(figures.latency, _to_us(done - intended))
            yield
            figures.out_of_range += record_many(figures.service, _to_us(done - sent))
            yield
            figures.out_of_range += record_many(figures.lag, _to_us(sent - intended))
            figures.ok += len(done)
            figures.sent += len(done)
            figures.completed_in_window += int(np.count_nonzero(done <= self.window_end_t))
            yield
        if failed:
            self._flush_failed(figures, failed)

    def _flush_failed(self, figures: HistogramSet, failed: list) -> None:
        intended, sent, done, kinds = zip(*failed, strict=True)
        intended_a, sent_a, done_a = (np.array(column, dtype=np.float64) for column in (intended, sent, done))
        figures.out_of_range += record_many(figures.lag, _to_us(sent_a - intended_a))
        for kind, kind_count in Counter(kinds).items():
            figures.errors[kind] = figures.errors.get(kind, 0) + kind_count
        figures.sent += len(failed)
        figures.completed_in_window += int(np.count_nonzero(done_a <= self.window_end_t))


def _to_us(seconds: np.ndarray) -> np.ndarray:
    micros = np.rint(seconds * 1e6)
    micros = np.nan_to_num(micros, nan=_HIGH_SENTINEL_US)
    return np.clip(micros, _LOW_SENTINEL_US, _HIGH_SENTINEL_US).astype(np.int64)


def _is_empty(figures: HistogramSet) -> bool:
    return figures.sent == 0 and figures.requests == 0 and figures.dropped == 0
