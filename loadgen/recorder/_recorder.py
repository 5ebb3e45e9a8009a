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
- An unsent arrival (scheduled inside the run window, never started: the dispatcher was stopped, by
  the end of the run or a stop, while still behind it) is counted and has no latency. Every arrival
  of the window is exactly one of: started (sent, or still in flight at the end), dropped, unsent.
- completed_in_window counts responses (ok or error) with done_t <= window_end_t, judged when the
  sample is flushed; achieved rate is that count over the run's duration.
- sent counts record() calls.
- Values are integer microseconds, rounded to nearest (half to even), recorded in
  HdrHistogram(1, 3_600_000_000, 3). A value below 0 or above one hour (or not a number) is clamped
  to the nearest edge, recorded, and counted in out_of_range: never silently lost. 0 is in range.
- A sample belongs to the interval that is open when it is flushed: record() is called when the
  response completes, and the driver closes intervals on the clock.

Streamed responses (record_stream; a Recorder made with streams=True) add, for successful ones only,
from the arrival instants of the chunks that carried output tokens (first_t, ..., last_t) and the
response's output token count n:
- ttft         = first_t - intended_t (open loop: from the intended send, like latency)
- ttft_service = first_t - sent_t
- itl          = each gap between successive token chunks of one response, pooled over responses
                 (vLLM's ITL: per chunk, not divided by the tokens a chunk carries)
- tpot         = (last_t - first_t) / (n - 1), only when n > 1: (e2e - ttft) / (n - 1) with the
                 end-to-end time taken at the last token chunk (vLLM's newer rule), so the usage
                 chunk and [DONE] that follow it do not count
- output_tokens (and output_tokens_in_window, for responses with done_t <= window_end_t).
A successful stream with no token chunk counts its tokens (if any) and has no TTFT, ITL or TPOT.
A stream the client cancelled after its first token (error CANCELLED, openai's cancel_rate) is counted
in `cancelled`, not in errors; it enters lag, sent, ttft and ttft_service, and nothing else (no latency,
service, ITL, TPOT, tokens; not completed_in_window: it was not answered).
latency, service and lag of a stream are recorded exactly as for any other request.

Goodput (a Recorder made with goodput=, loadgen/goodput.py): each successful request is judged, when
flushed, against every term on its own figures: latency, and for a stream its ttft, its tpot and its
largest ITL gap (NaN, so met, where it has no such figure). `good` counts those that met all,
`good_in_window` those of them with done_t <= window_end_t. A streaming recorder judges the successes
of record_stream (every success of a streamed run comes that way); a plain one those of record().

Mixes (a scenario's [[mix]]; a Recorder made with models=): each entry has its own part (`parts[i]`, a
Recorder used only for its buffers) that the driver records the entry's requests into, at the cost of
any request. Closing an interval flushes each part into the interval's set of that entry (`by_model`)
and adds the entries' sets into the interval's totals, so totals and entries agree exactly; dropped and
unsent arrivals (the generator's) go to the totals only.

Hot path: record() only appends to plain lists; flush() converts each batch with numpy and records it
with record_many (one vectorised step per histogram), so a request costs well under a microsecond.
Closing an interval costs about a millisecond in all; `close_interval_steps` does it in slices of
~0.1 ms so that the generator's event loop can read responses between them (a response read late
is service time measured wrong).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np

from loadgen.goodput import Goodput
from loadgen.outcome import CANCELLED
from loadgen.recorder._figures import (
    COUNTERS,
    HISTOGRAMS,
    HistogramSet,
    Interval,
    StreamFigures,
    add_histogram,
)
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

    def __init__(
        self,
        start_t: float,
        interval_s: float = 1.0,
        window_end_t: float = float("inf"),
        streams: bool = False,
        goodput: Goodput | None = None,
        models: Sequence[str] = (),
    ) -> None:
        self.start_t = start_t
        """Monotonic time the run (and the first interval) starts."""
        self.interval_s = interval_s
        """Intended interval length; the driver calls close_interval on that beat."""
        self.window_end_t = window_end_t
        """Responses completing after this instant do not count towards completed_in_window."""
        self.streams = streams
        """True when outcomes come with token timings (record_stream): every set has StreamFigures."""
        self.goodput = goodput
        """The terms each successful request is judged against (None: no goodput counted)."""
        self.models = tuple(models)
        """The mix entries' names (empty: no mix); every set then has a `by_model` set per entry."""
        self.parts = [Recorder(start_t, interval_s, window_end_t, streams, goodput) for _ in self.models]
        """Per mix entry, where its requests are recorded (record, record_stream, record_score)."""
        self.cumulative = self._new_set()
        """Sum of every closed (or merged) interval."""
        self.intervals: list[Interval] = []
        """Closed intervals, oldest first (merged ones in arrival order)."""
        self.closing = False
        """True while a closed interval is being added into `cumulative` in slices (close_interval_steps):
        `cumulative` then holds part of it, so readers between slices (a live exporter) wait for False."""
        self._current = self._new_set()
        self._spare: HistogramSet | None = None  # the next interval's, made ahead of time
        self._current_start_t = start_t
        self._finished = False
        self._ok_intended: list[float] = []
        self._ok_sent: list[float] = []
        self._ok_done: list[float] = []
        self._failed: list[tuple[float, float, float, str]] = []
        self._dropped = 0
        self._unsent = 0
        self._scored = 0
        self._correct = 0
        self._similarity = 0
        self._streams: list[tuple[float, float, float, Sequence[float], int]] = []
        self._cancelled: list[tuple[float, float, Sequence[float]]] = []

    def _new_set(self) -> HistogramSet:
        return HistogramSet.empty(self.streams, self.models)

    def record(self, intended_t: float, sent_t: float, done_t: float, error: str | None) -> None:
        """Buffer one request's outcome (hot path: list appends only)."""
        if error is None:
            self._ok_intended.append(intended_t)
            self._ok_sent.append(sent_t)
            self._ok_done.append(done_t)
        else:
            self._failed.append((intended_t, sent_t, done_t, error))

    def record_stream(
        self,
        intended_t: float,
        sent_t: float,
        done_t: float,
        error: str | None,
        token_times: Sequence[float],
        output_tokens: int,
    ) -> None:
        """Buffer one streamed response: as record(), plus its token chunk instants and token count
        when it succeeded (a cancelled one: its first token). Only for a Recorder made with streams=True."""
        if error == CANCELLED:
            self._cancelled.append((intended_t, sent_t, token_times))
            return
        self.record(intended_t, sent_t, done_t, error)
        if error is None:
            self._streams.append((intended_t, sent_t, done_t, token_times, output_tokens))

    def record_score(self, scored: int, correct: int, similarity_ppm: int = 0) -> None:
        """Count `scored` answers (rows) compared with their labels, `correct` of them right (and, against
        reference outputs, their summed cosine similarity in millionths)."""
        self._scored += scored
        self._correct += correct
        self._similarity += similarity_ppm

    def record_dropped(self, intended_t: float) -> None:
        """Count an arrival that could not be started; it has no latency."""
        self._dropped += 1

    def record_unsent(self, count: int) -> None:
        """Count `count` arrivals of the run window that were never started; they have no latency."""
        self._unsent += count

    def flush(self) -> None:
        """Move every buffered sample into the current interval's histograms and counters."""
        for _ in self._flush_steps(self._current, self._take_buffers()):
            pass
        for _ in self._flush_parts(self._current, [part._take_buffers() for part in self.parts]):
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
        parts_taken = [part._take_buffers() for part in self.parts]
        self._current = self._spare if self._spare is not None else self._new_set()
        self._spare = None
        start_t, self._current_start_t = self._current_start_t, end_t
        yield
        yield from self._flush_steps(figures, taken)
        if figures.by_model is not None:
            yield from self._flush_parts(figures, parts_taken)
            for entry in figures.by_model.values():  # the totals: every entry's requests
                yield from self._add_steps(figures, entry)
        self.closing = True
        yield from self._add_steps(self.cumulative, figures)
        self.intervals.append(Interval(start_t=start_t, end_t=end_t, figures=figures))
        self.closing = False
        spare = HistogramSet.empty(self.streams)
        if self.models:  # a set per entry too: ~0.1 ms a histogram, so a slice each
            spare.by_model = {}
            for name in self.models:
                yield
                spare.by_model[name] = HistogramSet.empty(self.streams)
        self._spare = spare

    @staticmethod
    def _add_steps(into: HistogramSet, figures: HistogramSet) -> Iterator[None]:
        for name in HISTOGRAMS:
            add_histogram(getattr(into, name), getattr(figures, name))
            yield
        for name in COUNTERS:
            setattr(into, name, getattr(into, name) + getattr(figures, name))
        for kind, count in figures.errors.items():
            into.errors[kind] = into.errors.get(kind, 0) + count
        if figures.stream is not None:
            if into.stream is None:
                into.stream = StreamFigures()
            into.stream.add(figures.stream)
        if figures.by_model is not None:
            into.add_models(figures.by_model)
            yield

    def _flush_parts(self, figures: HistogramSet, parts_taken: list[tuple]) -> Iterator[None]:
        """Flush each entry's buffers into its own set of `figures` (the totals are summed at close)."""
        if figures.by_model is None:
            return
        for part, taken, entry in zip(self.parts, parts_taken, figures.by_model.values(), strict=True):
            yield from part._flush_steps(entry, taken)

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

    def _take_buffers(self) -> tuple[list[float], list[float], list[float], list, tuple[int, ...], list, list]:
        """Hand over every buffered sample and start empty buffers (record() appends to the new ones)."""
        taken = (self._ok_intended, self._ok_sent, self._ok_done, self._failed,
                 (self._dropped, self._unsent, self._scored, self._correct, self._similarity), self._streams,
                 self._cancelled)
        self._ok_intended, self._ok_sent, self._ok_done, self._failed = [], [], [], []
        self._dropped = self._unsent = self._scored = self._correct = self._similarity = 0
        self._streams, self._cancelled = [], []
        return taken

    def _flush_steps(self, figures: HistogramSet, taken: tuple) -> Iterator[None]:
        (ok_intended, ok_sent, ok_done, failed, (dropped, unsent, scored, correct, similarity), streams,
         cancelled) = taken
        figures.dropped += dropped
        figures.unsent += unsent
        figures.scored += scored
        figures.correct += correct
        figures.similarity_ppm += similarity
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
            if self.goodput is not None and not self.streams:
                _count_good(figures, self.goodput.judge(latency=done - intended), done, self.window_end_t)
            yield
        if failed:
            self._flush_failed(figures, failed)
        if streams:
            if figures.stream is None:
                figures.stream = StreamFigures()
            figures.out_of_range += _flush_streams(figures.stream, streams, self.window_end_t)
            yield
            if self.goodput is not None:
                done = np.array([stream[2] for stream in streams], dtype=np.float64)
                _count_good(figures, self.goodput.judge(**_stream_figures(streams)), done, self.window_end_t)
                yield
        if cancelled:
            if figures.stream is None:
                figures.stream = StreamFigures()
            figures.out_of_range += _flush_cancelled(figures, figures.stream, cancelled)

    def _flush_failed(self, figures: HistogramSet, failed: list) -> None:
        intended, sent, done, kinds = zip(*failed, strict=True)
        intended_a, sent_a, done_a = (np.array(column, dtype=np.float64) for column in (intended, sent, done))
        figures.out_of_range += record_many(figures.lag, _to_us(sent_a - intended_a))
        for kind, kind_count in Counter(kinds).items():
            figures.errors[kind] = figures.errors.get(kind, 0) + kind_count
        figures.sent += len(failed)
        figures.completed_in_window += int(np.count_nonzero(done_a <= self.window_end_t))


def _flush_streams(into: StreamFigures, streams: list, window_end_t: float) -> int:
    """Record buffered streams (intended, sent, done, token_times, tokens); returns the values clamped."""
    intended, sent, done, times, tokens = zip(*streams, strict=True)
    tokens_a = np.array(tokens, dtype=np.int64)
    into.streams += len(streams)
    into.output_tokens += int(tokens_a.sum())
    into.output_tokens_in_window += int(tokens_a[np.array(done) <= window_end_t].sum())
    counts = np.array([len(t) for t in times], dtype=np.int64)
    has = counts > 0
    if not has.any():
        return 0
    flat = np.fromiter(itertools.chain.from_iterable(times), dtype=np.float64, count=int(counts.sum()))
    ends = np.cumsum(counts)[has]  # one past each response's last token chunk in `flat`
    first, last = flat[ends - counts[has]], flat[ends - 1]
    clamped = record_many(into.ttft, _to_us(first - np.array(intended)[has]))
    clamped += record_many(into.ttft_service, _to_us(first - np.array(sent)[has]))
    gaps = np.diff(flat)
    within = np.ones(gaps.size, dtype=bool)
    within[ends[:-1] - 1] = False  # the gap from one response's last chunk to the next one's first
    clamped += record_many(into.itl, _to_us(gaps[within]))
    several = tokens_a[has] > 1
    tpot = (last - first)[several] / (tokens_a[has][several] - 1)
    clamped += record_many(into.tpot, _to_us(tpot))
    return clamped


def _flush_cancelled(figures: HistogramSet, into: StreamFigures, cancelled: list) -> int:
    """Record buffered cancelled streams (intended, sent, token_times): count, lag, TTFT; returns the
    values clamped."""
    intended = np.array([c[0] for c in cancelled], dtype=np.float64)
    sent = np.array([c[1] for c in cancelled], dtype=np.float64)
    figures.cancelled += len(cancelled)
    figures.sent += len(cancelled)
    clamped = record_many(figures.lag, _to_us(sent - intended))
    has = np.array([len(c[2]) > 0 for c in cancelled], dtype=bool)
    if has.any():
        first = np.array([c[2][0] for c in cancelled if len(c[2])], dtype=np.float64)
        clamped += record_many(into.ttft, _to_us(first - intended[has]))
        clamped += record_many(into.ttft_service, _to_us(first - sent[has]))
    return clamped


def _stream_figures(streams: list) -> dict[str, np.ndarray]:
    """Per buffered stream (intended, sent, done, token_times, tokens), in seconds: latency, ttft, tpot and
    its largest gap between token chunks (itl); NaN where the stream has no such figure."""
    intended, _sent, done, times, tokens = zip(*streams, strict=True)
    intended_a, done_a = np.array(intended, dtype=np.float64), np.array(done, dtype=np.float64)
    tokens_a = np.array(tokens, dtype=np.int64)
    counts = np.array([len(t) for t in times], dtype=np.int64)
    ttft, tpot, itl = (np.full(len(streams), np.nan) for _ in range(3))
    has = counts > 0
    if has.any():
        flat = np.fromiter(itertools.chain.from_iterable(times), dtype=np.float64, count=int(counts.sum()))
        ends = np.cumsum(counts)[has]
        starts = ends - counts[has]
        first, last = flat[starts], flat[ends - 1]
        ttft[has] = first - intended_a[has]
        several = tokens_a[has] > 1
        spread = np.full(int(has.sum()), np.nan)
        spread[several] = (last - first)[several] / (tokens_a[has][several] - 1)
        tpot[has] = spread
        # Each response's gaps lie in gaps[start : end - 1]; the gap across two responses is zeroed, and a
        # trailing 0 lets the last response's reduceat slice start inside the array. Gaps are >= 0, so a
        # zero never wins against a real gap; a response with one chunk gets 0 and is then set to NaN.
        gaps = np.append(np.diff(flat), 0.0)
        gaps[ends - 1] = 0.0
        largest = np.maximum.reduceat(gaps, starts)
        largest[counts[has] < 2] = np.nan
        itl[has] = largest
    return {"latency": done_a - intended_a, "ttft": ttft, "tpot": tpot, "itl": itl}


def _count_good(figures: HistogramSet, good: np.ndarray, done: np.ndarray, window_end_t: float) -> None:
    figures.good += int(np.count_nonzero(good))
    figures.good_in_window += int(np.count_nonzero(good & (done <= window_end_t)))


def _to_us(seconds: np.ndarray) -> np.ndarray:
    micros = np.rint(seconds * 1e6)
    micros = np.nan_to_num(micros, nan=_HIGH_SENTINEL_US)
    return np.clip(micros, _LOW_SENTINEL_US, _HIGH_SENTINEL_US).astype(np.int64)


def _is_empty(figures: HistogramSet) -> bool:
    return (figures.sent == 0 and figures.requests == 0 and figures.dropped == 0 and figures.unsent == 0
            and all(_is_empty(entry) for entry in (figures.by_model or {}).values()))
