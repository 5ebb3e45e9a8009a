"""The figures of one interval or of a whole run: three HDR histograms and the counters beside them.

Place in the flow: the Recorder fills a HistogramSet per interval and adds each closed one into its
cumulative set; Locust workers send `encode()`d sets to the master, which `decode()`s and `add()`s them
(exact: histogram counts add bucket by bucket); the sinks read percentiles from them.
See loadgen/recorder/_recorder.py for what each histogram and counter measures.

Streamed responses (protocol openai) add a StreamFigures to the set (`stream`): TTFT, ITL and TPOT
histograms and the output token counts. Sets of other protocols have none (`stream` is None), so
they create, merge and encode nothing more than before.

A run that mixes models or endpoints (a scenario's [[mix]]) keeps one set per entry in `by_model`, beside
the totals: the totals hold every request, each entry's set the requests that entry answered, so the
entries' counts and histograms add up to the totals exactly. Sets of a run without a mix have none
(`by_model` is None) and carry nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from loadgen.recorder._hdr import mean_value, new_histogram, values_at_percentiles

HISTOGRAMS = ("latency", "service", "lag")
"""Names of the histogram fields, in the order the sinks show them."""
COUNTERS = ("ok", "dropped", "out_of_range", "completed_in_window", "sent", "unsent", "scored", "correct",
            "similarity_ppm", "cancelled", "good", "good_in_window")
"""Names of the integer counter fields (errors, a dict, is handled beside them)."""
STREAM_HISTOGRAMS = ("ttft", "ttft_service", "itl", "tpot")
"""Names of the StreamFigures histogram fields, in the order the sinks show them."""
STREAM_COUNTERS = ("streams", "output_tokens", "output_tokens_in_window")
"""Names of the StreamFigures counter fields."""
_PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}


@dataclass(eq=False)
class StreamFigures:
    """The token-level figures of successful streamed responses, in microseconds, and token counts.

    >>> StreamFigures().output_tokens
    0
    """

    ttft: HdrHistogram = field(default_factory=new_histogram)
    """First token chunk arrival - intended_t (open loop: from the intended send, as latency)."""
    ttft_service: HdrHistogram = field(default_factory=new_histogram)
    """First token chunk arrival - sent_t."""
    itl: HdrHistogram = field(default_factory=new_histogram)
    """Every gap between two successive token chunks of a response, pooled over responses."""
    tpot: HdrHistogram = field(default_factory=new_histogram)
    """Per response with 2+ output tokens: (last token chunk - first token chunk) / (tokens - 1)."""
    streams: int = 0
    """Successful streamed responses."""
    output_tokens: int = 0
    """Output tokens of successful responses (usage.completion_tokens, else token chunks)."""
    output_tokens_in_window: int = 0
    """Output tokens of the successful responses that completed by the recorder's window_end_t."""

    def add(self, other: StreamFigures) -> None:
        for name in STREAM_HISTOGRAMS:
            add_histogram(getattr(self, name), getattr(other, name))
        for name in STREAM_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def encode(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            name: getattr(self, name).encode().decode("ascii") for name in STREAM_HISTOGRAMS
        }
        data.update({name: int(getattr(self, name)) for name in STREAM_COUNTERS})
        return data

    @classmethod
    def decode(cls, data: dict[str, Any]) -> StreamFigures:
        missing = [key for key in (*STREAM_HISTOGRAMS, *STREAM_COUNTERS) if key not in data]
        if missing:
            raise ValueError(f"encoded StreamFigures lacks key(s) {', '.join(missing)}")
        histograms = {name: _decode_histogram(data[name]) for name in STREAM_HISTOGRAMS}
        return cls(**histograms, **{name: int(data[name]) for name in STREAM_COUNTERS})


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
    unsent: int = 0
    """Arrivals of the run window never started: the run ended or was stopped while the dispatcher was
    behind them (a stalled host); they have no latency."""
    out_of_range: int = 0
    """Values clamped into the histogram range before recording (all three histograms)."""
    completed_in_window: int = 0
    """Responses, ok or not, that completed by the recorder's window_end_t."""
    sent: int = 0
    """Requests recorded (one per Recorder.record call)."""
    scored: int = 0
    """Answers (rows) scored against a label: successful responses of a run that scores."""
    correct: int = 0
    """Of the scored answers, those whose predicted class was the label (or the reference's)."""
    similarity_ppm: int = 0
    """Sum over scored rows of the cosine similarity with the reference output, in millionths."""
    cancelled: int = 0
    """Streams the client closed on purpose after their first token (openai's cancel_rate): not errors,
    no latency; their TTFT is in `stream`."""
    good: int = 0
    """Successful responses that met every goodput term (loadgen/goodput.py); 0 without goodput terms."""
    good_in_window: int = 0
    """Of the good responses, those that completed by the recorder's window_end_t (goodput_rps counts these)."""
    stream: StreamFigures | None = None
    """Token-level figures when the responses were streamed (protocol openai), else None."""
    by_model: dict[str, HistogramSet] | None = None
    """Each mix entry's own figures by its name (a run with [[mix]]), else None. Dropped and unsent arrivals
    are the generator's: they are counted in the totals only."""

    @classmethod
    def streaming(cls) -> HistogramSet:
        """An empty set with StreamFigures."""
        return cls(stream=StreamFigures())

    @classmethod
    def empty(cls, streams: bool = False, models: tuple[str, ...] = ()) -> HistogramSet:
        """An empty set, with StreamFigures when `streams`, and an empty set per mix entry in `models`."""
        figures = cls.streaming() if streams else cls()
        if models:
            figures.by_model = {name: cls.empty(streams) for name in models}
        return figures

    @property
    def histogram_names(self) -> tuple[str, ...]:
        """The names percentiles_ms accepts for this set."""
        return HISTOGRAMS if self.stream is None else (*HISTOGRAMS, *STREAM_HISTOGRAMS)

    @property
    def requests(self) -> int:
        """Responses received: successes plus errors of every kind, plus streams cancelled by the client."""
        return self.ok + sum(self.errors.values()) + self.cancelled

    def add(self, other: HistogramSet) -> None:
        """Add `other` into this set: histograms bucket by bucket, counters by sum."""
        for name in HISTOGRAMS:
            add_histogram(getattr(self, name), getattr(other, name))
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for kind, count in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count
        if other.stream is not None:
            if self.stream is None:
                self.stream = StreamFigures()
            self.stream.add(other.stream)
        if other.by_model is not None:
            self.add_models(other.by_model)

    def add_models(self, by_model: dict[str, HistogramSet]) -> None:
        """Add each entry's set into this set's `by_model` (the totals are left alone)."""
        if self.by_model is None:
            self.by_model = {}
        for name, figures in by_model.items():
            mine = self.by_model.get(name)
            if mine is None:
                mine = self.by_model[name] = HistogramSet.streaming() if figures.stream is not None else HistogramSet()
            mine.add(figures)

    def encode(self) -> dict[str, Any]:
        """A JSON-able dict: histograms as hdrh's base64 strings, counters as ints."""
        data: dict[str, Any] = {name: getattr(self, name).encode().decode("ascii") for name in HISTOGRAMS}
        data.update({name: int(getattr(self, name)) for name in COUNTERS})
        data["errors"] = {str(kind): int(count) for kind, count in self.errors.items()}
        if self.stream is not None:
            data["stream"] = self.stream.encode()
        if self.by_model is not None:
            data["by_model"] = {name: figures.encode() for name, figures in self.by_model.items()}
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
        stream = StreamFigures.decode(data["stream"]) if data.get("stream") is not None else None
        by_model = data.get("by_model")
        models = {str(name): cls.decode(figures) for name, figures in by_model.items()} if by_model is not None else None
        return cls(**histograms, **counters, errors=errors, stream=stream, by_model=models)

    def percentiles_ms(self, which: str) -> dict[str, float]:
        """p50, p90, p99, p99_9, max and mean of one histogram, in ms (3 decimals); zeros when empty.

        `which` is one of HISTOGRAMS, or of STREAM_HISTOGRAMS when the set has StreamFigures.

        >>> HistogramSet().percentiles_ms("latency")["p99"]
        0.0
        """
        if which in HISTOGRAMS:
            hist: HdrHistogram = getattr(self, which)
        elif which in STREAM_HISTOGRAMS and self.stream is not None:
            hist = getattr(self.stream, which)
        else:
            raise ValueError(f"which must be one of {', '.join(self.histogram_names)}, not {which!r}")
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
