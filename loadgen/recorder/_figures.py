"""The figures of one interval or of a whole run: three HDR histograms and the counters beside them.

Place in the flow: the Recorder fills a HistogramSet per interval and adds each closed one into its
cumulative set; Locust workers send `encode()`d sets to the master, which `decode()`s and `add()`s them
(exact: histogram counts add bucket by bucket); the sinks read percentiles from them.
See loadgen/recorder/_recorder.py for what each histogram and counter measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from loadgen.recorder._hdr import mean_value, new_histogram, values_at_percentiles

HISTOGRAMS = ("latency", "service", "lag")
"""Names of the histogram fields, in the order the sinks show them."""
COUNTERS = ("ok", "dropped", "out_of_range", "completed_in_window", "sent")
"""Names of the integer counter fields (errors, a dict, is handled beside them)."""
_PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}


@dataclass(eq=False)
class HistogramSet:
    """One interval's (or the whole run's) histograms, in microseconds, and counters.

    `==` is identity (histograms have no value equality); compare fields to compare sets.

    >>> figures = HistogramSet(ok=2, errors={"timeout": 1})
    >>> figures.requests
    3
    """

    latency: HdrHistogram = field(default_factory=new_histogram)
    """done_t - intended_t of successful requests."""
    service: HdrHistogram = field(default_factory=new_histogram)
    """done_t - sent_t of successful requests."""
    lag: HdrHistogram = field(default_factory=new_histogram)
    """sent_t - intended_t of every request, ok or not."""
    ok: int = 0
    """Successful responses."""
    errors: dict[str, int] = field(default_factory=dict)
    """Failed responses by error kind ("http_503", "timeout", ...)."""
    dropped: int = 0
    """Arrivals that could not be started (in-flight cap reached); they have no latency."""
    out_of_range: int = 0
    """Values clamped into the histogram range before recording (all three histograms)."""
    completed_in_window: int = 0
    """Responses, ok or not, that completed by the recorder's window_end_t."""
    sent: int = 0
    """Requests recorded (one per Recorder.record call)."""

    @property
    def requests(self) -> int:
        """Responses received: successes plus errors of every kind."""
        return self.ok + sum(self.errors.values())

    def add(self, other: HistogramSet) -> None:
        """Add `other` into this set: histograms bucket by bucket, counters by sum."""
        for name in HISTOGRAMS:
            add_histogram(getattr(self, name), getattr(other, name))
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for kind, count in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count

    def encode(self) -> dict[str, Any]:
        """A JSON-able dict: histograms as hdrh's base64 strings, counters as ints."""
        data: dict[str, Any] = {name: getattr(self, name).encode().decode("ascii") for name in HISTOGRAMS}
        data.update({name: int(getattr(self, name)) for name in COUNTERS})
        data["errors"] = {str(kind): int(count) for kind, count in self.errors.items()}
        return data

    @classmethod
    def decode(cls, data: dict[str, Any]) -> HistogramSet:
        """Rebuild a set from `encode()`'s dict (e.g. a worker's report)."""
        missing = [key for key in (*HISTOGRAMS, *COUNTERS, "errors") if key not in data]
        if missing:
            raise ValueError(f"encoded HistogramSet lacks key(s) {', '.join(missing)}")
        histograms = {name: _decode_histogram(data[name]) for name in HISTOGRAMS}
        counters = {name: int(data[name]) for name in COUNTERS}
        errors = {str(kind): int(count) for kind, count in data["errors"].items()}
        return cls(**histograms, **counters, errors=errors)

    def percentiles_ms(self, which: str) -> dict[str, float]:
        """p50, p90, p99, p99_9, max and mean of one histogram, in ms (3 decimals); zeros when empty.

        >>> HistogramSet().percentiles_ms("latency")["p99"]
        0.0
        """
        if which not in HISTOGRAMS:
            raise ValueError(f"which must be one of {', '.join(HISTOGRAMS)}, not {which!r}")
        hist: HdrHistogram = getattr(self, which)
        if hist.get_total_count() == 0:
            return {key: 0.0 for key in (*_PERCENTILES, "max", "mean")}
        values = values_at_percentiles(hist, _PERCENTILES.values())
        figures = {key: _ms(value) for key, value in zip(_PERCENTILES, values, strict=True)}
        figures["max"] = _ms(hist.get_max_value())
        figures["mean"] = _ms(mean_value(hist))
        return figures


@dataclass(frozen=True)
class Interval:
    """A closed interval [start_t, end_t) of monotonic seconds and the figures recorded in it."""

    start_t: float
    end_t: float
    figures: HistogramSet


def _ms(value_us: float) -> float:
    return round(value_us / 1000.0, 3)


def add_histogram(into: HdrHistogram, other: HdrHistogram) -> None:
    # hdrh's add() reads an empty histogram's minimum as 0 and would set ours to 0: skip empties.
    if other.get_total_count():
        into.add(other)


def _decode_histogram(encoded: str) -> HdrHistogram:
    # Decode into a fresh histogram of our own shape so merged sets never depend on the sender's.
    hist = new_histogram()
    add_histogram(hist, HdrHistogram.decode(encoded))
    return hist
