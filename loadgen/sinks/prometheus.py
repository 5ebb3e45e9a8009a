"""Prometheus exporter: the run's figures as metric families, computed from the recorder when scraped.

Place in the flow: Recorder -> **Prometheus collector** -> /metrics (served by
loadgen/driver/exporter.py during `loadgen run --metrics-port P`) -> Prometheus -> Grafana.
Nothing is pushed from the hot path: `RunCollector.collect()` reads the recorder's closed intervals
(at most one interval, 1 s by default, old) and its cumulative histograms at scrape time.

Metrics (all times in seconds; latency, service and lag as measured in loadgen/recorder/_recorder.py)
--------------------------------------------------------------------------------------------------
- `loadgen_requests_total{outcome="ok"|"error",kind}`  counter: responses; kind is "ok" or the
  error kind ("http_503", "timeout", ...).
- `loadgen_sent_total`, `loadgen_dropped_total`, `loadgen_out_of_range_total`  counters: requests
  sent, arrivals dropped at the in-flight cap, values clamped into the histogram range.
- `loadgen_unsent_total`  counter: arrivals of the run window never sent (the generator was still
  behind them when dispatching stopped).
- `loadgen_latency_seconds`, `loadgen_service_seconds`  histograms of the run's successful
  requests, with log-spaced buckets (`BUCKETS_S`: x1.25 from 100 us to 60 s). A bucket counts every
  HDR bucket that starts at or below its bound, so it is exact to HDR's precision (0.1 %); `+Inf`
  equals the ok count and `_sum` is HDR's mean times the count.
- `loadgen_latency_percentile_seconds{quantile,window}`, `loadgen_service_percentile_seconds`,
  `loadgen_lag_percentile_seconds`  gauges: quantile "0.5", "0.9", "0.99", "0.999" from the HDR
  histograms, window "10s" (the last 10 s of closed intervals, merged) or "run" (cumulative).
- `loadgen_offered_rps`  gauge: the rate the schedule asks for now (0 in closed loop).
- `loadgen_achieved_rps`  gauge: responses completed in the last closed interval over its length.
- `loadgen_in_flight`  gauge: requests sent and not yet answered.
- `loadgen_generator_cpu_ratio`  gauge: the generator process's CPU time over wall time since the
  previous scrape (1.0 is one core busy); in a distributed run, the master's.

Streamed runs (protocol openai) add, as summary.json's ttft_ms, itl_ms, tpot_ms and output tokens:
- `loadgen_ttft_percentile_seconds`, `loadgen_itl_percentile_seconds`, `loadgen_tpot_percentile_seconds`
  gauges with the quantile and window labels of the latency gauges, from the TTFT, ITL and TPOT HDR
  histograms (TTFT from the intended send; ITL pooled over every gap; TPOT per response).
- `loadgen_output_tokens_total`  counter: output tokens of successful responses.
- `loadgen_output_tokens_per_s`  gauge: output tokens of the responses completed in the last closed
  interval over its length.
Runs with goodput terms (--goodput, loadgen/goodput.py) add:
- `loadgen_good_requests_total`  counter: successful responses that met every term.
- `loadgen_goodput_rps`  gauge: good responses completed in the last closed interval over its length
  (achieved_rps's counting: good <= achieved).

Runs with a mix ([[mix]]) add each entry's figures as families of their own, labelled `model` (the entry's
name). They are families apart from the totals above, not a label on them: the totals keep their series
and their meaning, so existing queries and dashboards (sum(rate(loadgen_requests_total[1m])) included)
read the same, and summing a model family over `model` gives the total (one series per entry: the label
set is bounded by the scenario):
- `loadgen_model_requests_total{model,outcome,kind}`  counter: the entry's responses, as loadgen_requests_total.
- `loadgen_model_latency_percentile_seconds{model,quantile,window}`  gauge: the entry's latency percentiles,
  as loadgen_latency_percentile_seconds; streamed runs add `loadgen_model_ttft_percentile_seconds`,
  `loadgen_model_itl_percentile_seconds`, `loadgen_model_tpot_percentile_seconds` and
  `loadgen_model_output_tokens_total{model}`.
- `loadgen_model_achieved_rps{model}`  gauge: the entry's responses completed in the last closed interval
  per second; with goodput terms, `loadgen_model_good_requests_total{model}` counter.

Distributed runs (`--processes` / `--master`) are exported from the master: every figure above is the
merged one (the workers' intervals summed exactly), and each worker's generator health comes beside
them, labelled `worker` (its index) and `host`, as of its last shipped interval:
- `loadgen_worker_up`  gauge: 1 while the worker takes part in the run, 0 once it was lost.
- `loadgen_worker_lag_p99_seconds`  gauge: schedule lag p99 of the worker's last interval.
- `loadgen_worker_dropped_total`  counter: arrivals the worker dropped at its in-flight cap.
- `loadgen_worker_cpu_ratio`  gauge: the worker process's CPU time over wall time over its last interval.
- `loadgen_worker_in_flight`  gauge: the worker's requests sent and not yet answered.

Sweeps (`loadgen sweep --metrics-port P`) add `SweepCollector`'s families on the same port, which
stays open for the whole sweep (each step's run families join it while the step runs). They draw the
throughput-under-load curve as it is measured; their label set is bounded by the step count:
- `loadgen_sweep_info{unit}`  gauge 1: unit "rps" (open loop: a step's load is a rate) or "users".
- `loadgen_sweep_current_step`, `loadgen_sweep_current_load`  gauges: the step running now (1-based;
  0 before the first) and its load; they keep the last step's values once the sweep has ended.
- `loadgen_sweep_step_offered_rps{step,load}`, `loadgen_sweep_step_achieved_rps{step,load}`  gauges,
  one series per completed step: the step's offered rate (0 in closed loop) and achieved throughput,
  as in sweep.json (warm-up cut). `load` is the step's load as the plan gave it (req/s or users).
- `loadgen_sweep_step_latency_seconds{step,load,quantile}`  gauge: the step's latency percentiles
  (quantiles as above) from its HDR histogram, the figures of curve.csv.
- `loadgen_sweep_step_error_ratio{step,load}`  gauge: errors over responses in the step.
- `loadgen_sweep_step_generator_bound{step,load}`, `loadgen_sweep_step_stable{step,load}` and, with an
  SLO, `loadgen_sweep_step_slo_met{step,load}`  gauges 0/1.
- With --goodput: `loadgen_sweep_step_goodput_rps{step,load}` and `loadgen_sweep_step_good_ratio{step,load}`
  gauges: the step's good responses a second and its share of good responses.
- `loadgen_sweep_saturation_rps`, `loadgen_sweep_saturated` (0/1), `loadgen_sweep_knee_rps`,
  `loadgen_sweep_knee_load`, `loadgen_sweep_max_rps_meeting_slo`  gauges: the verdict of the steps so
  far (loadgen/sweep/verdict.py), each present once it is known; `loadgen_sweep_finished` is 1 once
  the last step is done and the verdict is the sweep's own.

Cost: everything read from closed intervals is computed once per closed-interval count and cached
(about 1 ms at 1,000 intervals; the 10 s window is merged with one numpy add per histogram, into
histograms kept for it), so most scrapes only format cached numbers (~0.7 ms for ~160 samples).
The scrape runs on the generator's own event loop; `pause` (gevent.idle in the exporter) is called
between the larger families so that responses arriving meanwhile are read on time.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from hdrh.histogram import HdrHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from loadgen.recorder import HistogramSet, Recorder, sum_histograms
from loadgen.recorder._hdr import counts_indices, counts_view, mean_value, values_at_percentiles

__all__ = ["BUCKETS_S", "QUANTILES", "WINDOW_S", "RunCollector", "RunView", "SweepCollector", "SweepStep",
           "WorkerHealth"]

WINDOW_S = 10.0
"""Length of the recent window of the percentile gauges (window="10s"), in seconds of closed intervals."""
QUANTILES = {"0.5": "p50", "0.9": "p90", "0.99": "p99", "0.999": "p99_9"}
"""quantile label -> the same figure's key in HistogramSet.percentiles_ms (and summary.json)."""
_PERCENTILE_GAUGES = ("latency", "service", "lag")
_STREAM_GAUGES = ("ttft", "itl", "tpot")
"""Percentile gauges of streamed runs (their histograms are in the sets' StreamFigures)."""
_HISTOGRAMS = ("latency", "service")


def _log_buckets(lowest_s: float, highest_s: float, ratio: float) -> tuple[float, ...]:
    """Bounds lowest * ratio**k rounded to 3 significant digits, up to and including highest."""
    steps = math.ceil(math.log(highest_s / lowest_s) / math.log(ratio))
    bounds = [float(f"{lowest_s * ratio**k:.3g}") for k in range(steps)]
    return (*bounds, highest_s)


BUCKETS_S = _log_buckets(1e-4, 60.0, 1.25)
"""Upper bounds (le) of the latency and service histograms, in seconds."""
_BUCKET_LABELS = [floatToGoString(bound) for bound in BUCKETS_S]
_BUCKETS_US = np.array([round(bound * 1e6) for bound in BUCKETS_S], dtype=np.int64)


class RunView(Protocol):
    """What the collector reads from a run (loadgen.driver.context.LoadContext provides it)."""

    @property
    def recorder(self) -> Recorder | None:
        """The run's recorder; None before the run starts."""

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""

    def offered_rps_now(self) -> float:
        """The rate the schedule asks for at this instant (0 outside an open-loop run)."""

    @property
    def metrics_host(self) -> str:
        """The address /metrics listens on (the scenario's output.metrics_host)."""

    def worker_health(self) -> list[WorkerHealth] | None:
        """Each worker's health in a distributed run (the master's view); None for a single process."""


@dataclass(frozen=True)
class WorkerHealth:
    """One worker's generator health in a distributed run (a view with `worker_health()` gives these)."""

    worker: str
    host: str
    up: bool
    lag_p99_s: float
    dropped: int
    cpu_ratio: float
    in_flight: int


@dataclass(frozen=True)
class _Counts:
    """The cumulative counters, copied."""

    ok: int
    errors: dict[str, int]
    sent: int
    dropped: int
    out_of_range: int
    unsent: int = 0
    good: int | None = None
    """Good responses; None when the run has no goodput terms."""
    output_tokens: int | None = None
    """Output tokens; None when the run does not stream."""


@dataclass(frozen=True)
class _ModelSnapshot:
    """One mix entry's figures, for one closed-interval count."""

    counts: _Counts
    percentiles: dict[tuple[str, str], list[float]]
    achieved_rps: float


@dataclass(frozen=True)
class _Snapshot:
    """Everything derived from closed intervals, for one closed-interval count."""

    intervals: int
    counts: _Counts
    buckets: dict[str, tuple[list[tuple[str, float]], float]]
    percentiles: dict[tuple[str, str], list[float]]
    achieved_rps: float
    goodput_rps: float | None = None
    output_tokens_per_s: float | None = None
    models: dict[str, _ModelSnapshot] | None = None
    """Each mix entry's figures by name (None without a mix)."""
    sent_rps: float = 0.0
    """Requests sent in the last closed interval per second (the live console's; no gauge of its own)."""


def _process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RunCollector:
    """A prometheus_client collector of one run: register it on a CollectorRegistry of its own.

    >>> registry = CollectorRegistry(auto_describe=False)  # doctest: +SKIP
    >>> registry.register(RunCollector(ctx))  # doctest: +SKIP
    >>> registry.get_sample_value("loadgen_requests_total", {"outcome": "ok", "kind": "ok"})  # doctest: +SKIP
    1234.0
    """

    def __init__(
        self,
        view: RunView,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_seconds: Callable[[], float] = _process_cpu_seconds,
        pause: Callable[[], None] | None = None,
    ) -> None:
        self._view = view
        self._pause = pause
        self._clock = clock
        self._cpu_seconds = cpu_seconds
        self._last_cpu = (clock(), cpu_seconds())
        self._snapshot: _Snapshot | None = None
        self._recorder: Recorder | None = None
        self._window = HistogramSet.streaming()  # reused: creating histograms costs more than merging them
        self._model_windows: dict[str, HistogramSet] = {}  # the same, per mix entry

    def collect(self) -> Iterator[Metric]:
        """The metric families of the module docstring, as of now."""
        snapshot = self._current_snapshot()
        if snapshot is not None:
            yield from _counter_families(snapshot.counts)
            yield from self._paced(_histogram_families(snapshot))
            yield from self._paced(_percentile_families(snapshot))
            yield _gauge("loadgen_achieved_rps", "Responses completed in the last closed interval per second.",
                         snapshot.achieved_rps)
            yield from _llm_gauges(snapshot)
            if snapshot.models is not None:
                yield from self._paced(_model_families(snapshot.models))
        yield _gauge("loadgen_offered_rps", "Request rate the schedule asks for now.", self._view.offered_rps_now())
        yield _gauge("loadgen_in_flight", "Requests sent and not yet answered.", self._view.in_flight)
        cpu = self._cpu_ratio()
        if cpu is not None:
            yield _gauge("loadgen_generator_cpu_ratio",
                         "Generator process CPU time over wall time since the previous scrape.", cpu)
        workers = self._view.worker_health()
        if workers is not None:
            yield from _worker_families(workers)

    def live(self) -> dict[str, Any] | None:
        """The figures `collect` gives, as JSON-able values (the live console's, loadgen/driver/console.py):
        the same numbers as the gauges for the same closed intervals (`intervals` says how many), read
        from the same cached snapshot; None before the run starts."""
        snapshot = self._current_snapshot()
        if snapshot is None:
            return None
        counts = snapshot.counts
        percentiles = {f"{which}_s": {window: dict(zip(QUANTILES.values(), values, strict=True))
                                      for (name, window), values in snapshot.percentiles.items() if name == which}
                       for which in {name for name, _ in snapshot.percentiles}}
        return {
            "intervals": snapshot.intervals,
            "offered_rps": self._view.offered_rps_now(),
            "sent_rps": snapshot.sent_rps,
            "achieved_rps": snapshot.achieved_rps,
            "in_flight": self._view.in_flight,
            **percentiles,
            "counts": {"ok": counts.ok, "errors": dict(sorted(counts.errors.items())), "sent": counts.sent,
                       "dropped": counts.dropped, "unsent": counts.unsent, "out_of_range": counts.out_of_range},
            **({"goodput_rps": snapshot.goodput_rps} if snapshot.goodput_rps is not None else {}),
            **({"output_tokens_per_s": snapshot.output_tokens_per_s}
               if snapshot.output_tokens_per_s is not None else {}),
        }

    def _paced(self, families: Iterator[Metric]) -> Iterator[Metric]:
        """Call `pause` after each family: formatting one takes ~0.1 ms of the generator's loop."""
        for family in families:
            yield family
            if self._pause is not None:
                self._pause()

    def _current_snapshot(self) -> _Snapshot | None:
        """The cached snapshot, rebuilt when intervals were closed since (never mid-close)."""
        recorder = self._view.recorder
        if recorder is None:
            return None
        fresh = self._recorder is recorder and self._snapshot is not None
        if recorder.closing or (fresh and self._snapshot.intervals == len(recorder.intervals)):
            return self._snapshot if fresh else None
        self._recorder, self._snapshot = recorder, _snapshot_of(recorder, self._window, self._model_windows)
        return self._snapshot

    def _cpu_ratio(self) -> float | None:
        now, cpu = self._clock(), self._cpu_seconds()
        then, cpu_then = self._last_cpu
        self._last_cpu = (now, cpu)
        return (cpu - cpu_then) / (now - then) if now > then else None


def _snapshot_of(recorder: Recorder, window: HistogramSet, model_windows: dict[str, HistogramSet] | None = None,
                 ) -> _Snapshot:
    """Read the recorder's closed intervals; `window` (and `model_windows`, per mix entry) is scratch space
    for the 10 s merge."""
    intervals = recorder.intervals
    cumulative = recorder.cumulative
    window = _window_of(recorder, window)
    percentiles = {}
    for which in _PERCENTILE_GAUGES:
        percentiles[which, "run"] = _quantiles_s(getattr(cumulative, which))
        percentiles[which, "10s"] = _quantiles_s(getattr(window, which))
    if cumulative.stream is not None:
        for which in _STREAM_GAUGES:
            percentiles[which, "run"] = _quantiles_s(getattr(cumulative.stream, which))
            percentiles[which, "10s"] = _quantiles_s(getattr(window.stream, which))
    last = intervals[-1] if intervals else None
    length = last.end_t - last.start_t if last else 0.0
    achieved = last.figures.requests / length if length > 0 else 0.0
    stream = cumulative.stream
    last_stream = last.figures.stream if last is not None else None
    counts = _Counts(
        ok=cumulative.ok,
        errors=dict(cumulative.errors),
        sent=cumulative.sent,
        dropped=cumulative.dropped,
        out_of_range=cumulative.out_of_range,
        unsent=cumulative.unsent,
        good=cumulative.good if recorder.goodput is not None else None,
        output_tokens=stream.output_tokens if stream is not None else None,
    )
    return _Snapshot(
        intervals=len(intervals),
        counts=counts,
        buckets={which: _buckets_of(getattr(cumulative, which)) for which in _HISTOGRAMS},
        percentiles=percentiles,
        achieved_rps=achieved,
        goodput_rps=(last.figures.good / length if length > 0 else 0.0) if recorder.goodput is not None else None,
        output_tokens_per_s=((last_stream.output_tokens / length if length > 0 and last_stream is not None else 0.0)
                             if stream is not None else None),
        models=_models_of(recorder, model_windows if model_windows is not None else {}),
        sent_rps=last.figures.sent / length if last is not None and length > 0 else 0.0,
    )


def _models_of(recorder: Recorder, windows: dict[str, HistogramSet]) -> dict[str, _ModelSnapshot] | None:
    """Each mix entry's counts, percentiles (run and the last WINDOW_S) and last-interval rate."""
    by_model = recorder.cumulative.by_model
    if by_model is None:
        return None
    count = max(1, round(WINDOW_S / recorder.interval_s))
    recent = recorder.intervals[-count:]
    last = recent[-1] if recent else None
    length = last.end_t - last.start_t if last else 0.0
    found = {}
    for name, cumulative in by_model.items():
        sets = [interval.figures.by_model[name] for interval in recent
                if interval.figures.by_model is not None and name in interval.figures.by_model]
        window = windows.setdefault(name, HistogramSet.streaming())
        _merge_histograms(sets, window, cumulative.stream is not None)
        percentiles = {("latency", "run"): _quantiles_s(cumulative.latency),
                       ("latency", "10s"): _quantiles_s(window.latency)}
        if cumulative.stream is not None:
            for which in _STREAM_GAUGES:
                percentiles[which, "run"] = _quantiles_s(getattr(cumulative.stream, which))
                percentiles[which, "10s"] = _quantiles_s(getattr(window.stream, which))
        in_last = last.figures.by_model.get(name) if last is not None and last.figures.by_model else None
        counts = _Counts(ok=cumulative.ok, errors=dict(cumulative.errors), sent=cumulative.sent, dropped=0,
                         out_of_range=cumulative.out_of_range,
                         good=cumulative.good if recorder.goodput is not None else None,
                         output_tokens=cumulative.stream.output_tokens if cumulative.stream is not None else None)
        found[name] = _ModelSnapshot(counts, percentiles,
                                     in_last.requests / length if in_last is not None and length > 0 else 0.0)
    return found


def _merge_histograms(sets: list[HistogramSet], into: HistogramSet, streams: bool) -> None:
    """The latency (and stream) histograms of `sets` merged into `into`'s."""
    sum_histograms([figures.latency for figures in sets], into=into.latency)
    if streams and into.stream is not None:
        parts = [figures.stream for figures in sets if figures.stream is not None]
        for which in _STREAM_GAUGES:
            sum_histograms([getattr(part, which) for part in parts], into=getattr(into.stream, which))


def _window_of(recorder: Recorder, into: HistogramSet) -> HistogramSet:
    """The last WINDOW_S seconds of closed intervals merged into `into` (histograms only)."""
    count = max(1, round(WINDOW_S / recorder.interval_s))
    recent = [interval.figures for interval in recorder.intervals[-count:]]
    for which in _PERCENTILE_GAUGES:
        sum_histograms([getattr(figures, which) for figures in recent], into=getattr(into, which))
    if recorder.cumulative.stream is not None and into.stream is not None:
        streams = [figures.stream for figures in recent if figures.stream is not None]
        for which in _STREAM_GAUGES:
            sum_histograms([getattr(stream, which) for stream in streams], into=getattr(into.stream, which))
    return into


def _quantiles_s(hist: HdrHistogram) -> list[float]:
    """The QUANTILES of an HDR histogram in microseconds, in seconds; the same figures as
    HistogramSet.percentiles_ms (ms to 3 decimals) / 1000, without its max and mean. Zeros when empty."""
    values = values_at_percentiles(hist, [float(q) * 100 for q in QUANTILES]) or [0] * len(QUANTILES)
    return [round(value / 1000.0, 3) / 1000.0 for value in values]


def _buckets_of(hist: HdrHistogram) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets (le label, count) of an HDR histogram in microseconds, and the sum in s."""
    total = hist.get_total_count()
    cumulative = np.cumsum(counts_view(hist))
    indices = np.minimum(counts_indices(hist, _BUCKETS_US), cumulative.size - 1)
    buckets = [(label, float(cumulative[i])) for label, i in zip(_BUCKET_LABELS, indices, strict=True)]
    buckets.append(("+Inf", float(total)))
    return buckets, mean_value(hist) * total / 1e6


def _counter_families(counts: _Counts) -> Iterator[Metric]:
    requests = CounterMetricFamily("loadgen_requests", "Responses received, by outcome and error kind.",
                                   labels=["outcome", "kind"])
    requests.add_metric(["ok", "ok"], counts.ok)
    for kind, count in sorted(counts.errors.items()):
        requests.add_metric(["error", kind], count)
    yield requests
    yield CounterMetricFamily("loadgen_sent", "Requests sent.", value=counts.sent)
    yield CounterMetricFamily("loadgen_dropped", "Arrivals dropped at the in-flight cap.", value=counts.dropped)
    yield CounterMetricFamily("loadgen_out_of_range", "Values clamped into the histogram range.",
                              value=counts.out_of_range)
    yield CounterMetricFamily("loadgen_unsent", "Arrivals of the run window never sent.", value=counts.unsent)
    if counts.output_tokens is not None:
        yield CounterMetricFamily("loadgen_output_tokens", "Output tokens of successful responses.",
                                  value=counts.output_tokens)
    if counts.good is not None:
        yield CounterMetricFamily("loadgen_good_requests", "Successful responses that met every goodput term.",
                                  value=counts.good)


def _histogram_families(snapshot: _Snapshot) -> Iterator[Metric]:
    helps = {
        "latency": "Successful requests' latency: intended send to response arrived.",
        "service": "Successful requests' service time: actual send to response arrived.",
    }
    for which in _HISTOGRAMS:
        buckets, total = snapshot.buckets[which]
        yield HistogramMetricFamily(f"loadgen_{which}_seconds", helps[which], buckets=buckets, sum_value=total)


_PERCENTILE_HELP = {"ttft": "Time to first token (from the intended send)", "itl": "Inter-token latency (every gap)",
                    "tpot": "Time per output token (per response)"}


def _percentile_families(snapshot: _Snapshot) -> Iterator[Metric]:
    for which in (*_PERCENTILE_GAUGES, *_STREAM_GAUGES):
        if (which, "run") not in snapshot.percentiles:
            continue
        what = _PERCENTILE_HELP.get(which, which.capitalize())
        family = GaugeMetricFamily(f"loadgen_{which}_percentile_seconds",
                                   f"{what} percentiles from the HDR histograms, in seconds.",
                                   labels=["quantile", "window"])
        for window in ("10s", "run"):
            for quantile, value in zip(QUANTILES, snapshot.percentiles[which, window], strict=True):
                family.add_metric([quantile, window], value)
        yield family


def _llm_gauges(snapshot: _Snapshot) -> Iterator[Metric]:
    if snapshot.output_tokens_per_s is not None:
        yield _gauge("loadgen_output_tokens_per_s", "Output tokens of the responses completed in the last closed "
                     "interval per second.", snapshot.output_tokens_per_s)
    if snapshot.goodput_rps is not None:
        yield _gauge("loadgen_goodput_rps", "Good responses (every goodput term met) completed in the last closed "
                     "interval per second.", snapshot.goodput_rps)


def _model_families(models: dict[str, _ModelSnapshot]) -> Iterator[Metric]:
    requests = CounterMetricFamily("loadgen_model_requests", "A mix entry's responses, by outcome and error kind.",
                                   labels=["model", "outcome", "kind"])
    achieved = GaugeMetricFamily("loadgen_model_achieved_rps", "A mix entry's responses completed in the last "
                                 "closed interval per second.", labels=["model"])
    for name, model in models.items():
        requests.add_metric([name, "ok", "ok"], model.counts.ok)
        for kind, count in sorted(model.counts.errors.items()):
            requests.add_metric([name, "error", kind], count)
        achieved.add_metric([name], model.achieved_rps)
    yield requests
    yield achieved
    first = next(iter(models.values()), None)
    for which in ("latency", *_STREAM_GAUGES):
        if first is None or (which, "run") not in first.percentiles:
            continue
        what = _PERCENTILE_HELP.get(which, which.capitalize())
        family = GaugeMetricFamily(f"loadgen_model_{which}_percentile_seconds",
                                   f"{what} percentiles of a mix entry, in seconds.",
                                   labels=["model", "quantile", "window"])
        for name, model in models.items():
            for window in ("10s", "run"):
                for quantile, value in zip(QUANTILES, model.percentiles[which, window], strict=True):
                    family.add_metric([name, quantile, window], value)
        yield family
    if first is not None and first.counts.output_tokens is not None:
        tokens = CounterMetricFamily("loadgen_model_output_tokens", "Output tokens of a mix entry's successful "
                                     "responses.", labels=["model"])
        for name, model in models.items():
            tokens.add_metric([name], model.counts.output_tokens or 0)
        yield tokens
    if first is not None and first.counts.good is not None:
        good = CounterMetricFamily("loadgen_model_good_requests", "A mix entry's successful responses that met "
                                   "every goodput term.", labels=["model"])
        for name, model in models.items():
            good.add_metric([name], model.counts.good or 0)
        yield good


def _worker_families(workers: list[WorkerHealth]) -> Iterator[Metric]:
    labels = ["worker", "host"]
    up = GaugeMetricFamily("loadgen_worker_up", "1 while the worker takes part in the run, 0 once lost.",
                           labels=labels)
    lag = GaugeMetricFamily("loadgen_worker_lag_p99_seconds", "Schedule lag p99 of the worker's last interval.",
                            labels=labels)
    dropped = CounterMetricFamily("loadgen_worker_dropped", "Arrivals the worker dropped at its in-flight cap.",
                                  labels=labels)
    cpu = GaugeMetricFamily("loadgen_worker_cpu_ratio", "Worker process CPU time over wall time, last interval.",
                            labels=labels)
    in_flight = GaugeMetricFamily("loadgen_worker_in_flight", "The worker's requests sent and not yet answered.",
                                  labels=labels)
    for health in workers:
        key = [health.worker, health.host]
        up.add_metric(key, 1.0 if health.up else 0.0)
        lag.add_metric(key, health.lag_p99_s)
        dropped.add_metric(key, health.dropped)
        cpu.add_metric(key, health.cpu_ratio)
        in_flight.add_metric(key, health.in_flight)
    yield from (up, lag, dropped, cpu, in_flight)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class SweepStep(Protocol):
    """What the sweep families read of a finished step (loadgen.sweep.step.StepResult has these)."""

    index: int
    load: float
    offered_rps: float
    achieved_rps: float
    latency_ms: dict[str, float]
    generator_bound: bool
    stable: bool
    slo_met: bool | None

    @property
    def error_ratio(self) -> float: ...

    @property
    def goodput_rps(self) -> float | None:
        """With goodput terms: the step's good responses a second (None without)."""

    @property
    def goodput_share(self) -> float | None:
        """With goodput terms: the step's share of good responses (None without)."""


_VERDICT_GAUGES = (
    ("saturation_rps", "Highest achieved throughput of a healthy step so far (req/s)."),
    ("max_rps_meeting_slo", "Highest achieved throughput of a healthy step that met the SLO (req/s)."),
)


class SweepCollector:
    """A prometheus_client collector of a sweep's curve and verdict, updated by the sweep between steps.

    >>> sweep = SweepCollector(closed_loop=False)
    >>> sweep.begin_step(1, 100.0)
    >>> sweep.end_step(step)  # doctest: +SKIP  (a StepResult)
    >>> sweep.judge(verdict(steps, has_slo=False), finished=True)  # doctest: +SKIP
    """

    def __init__(self, *, closed_loop: bool, pause: Callable[[], None] | None = None) -> None:
        self.unit = "users" if closed_loop else "rps"
        self._pause = pause
        """Called after each per-step family: a scrape shares the generator's loop with a running step."""
        self._current: tuple[int, float] = (0, 0.0)
        self._steps: list[SweepStep] = []
        self._verdict: dict[str, Any] = {}
        self._finished = False

    def begin_step(self, index: int, load: float) -> None:
        self._current = (index, load)

    def end_step(self, step: SweepStep) -> None:
        self._steps = [*self._steps, step]

    def judge(self, judged: dict[str, Any], *, finished: bool = False) -> None:
        """The verdict of the steps so far (the sweep's own once `finished`)."""
        self._verdict, self._finished = dict(judged), finished

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("loadgen_sweep_info", "A sweep is running; unit of its steps' load.",
                                 labels=["unit"])
        info.add_metric([self.unit], 1.0)
        yield info
        index, load = self._current
        yield _gauge("loadgen_sweep_current_step", "The sweep step running now (1-based; 0 before the first).",
                     index)
        yield _gauge("loadgen_sweep_current_load", "Load of the step running now (req/s, or users).", load)
        for family in _step_families(self._steps):
            yield family
            if self._pause is not None:
                self._pause()
        yield from _verdict_families(self._verdict)
        yield _gauge("loadgen_sweep_finished", "1 once the sweep's last step is done.", float(self._finished))


def _step_families(steps: list[SweepStep]) -> Iterator[Metric]:
    labels = ["step", "load"]
    offered = GaugeMetricFamily("loadgen_sweep_step_offered_rps", "A completed step's offered rate (0: closed "
                                "loop).", labels=labels)
    achieved = GaugeMetricFamily("loadgen_sweep_step_achieved_rps", "A completed step's achieved throughput.",
                                 labels=labels)
    latency = GaugeMetricFamily("loadgen_sweep_step_latency_seconds", "A completed step's latency percentiles "
                                "from its HDR histogram, in seconds.", labels=[*labels, "quantile"])
    errors = GaugeMetricFamily("loadgen_sweep_step_error_ratio", "A completed step's errors over responses.",
                               labels=labels)
    bound = GaugeMetricFamily("loadgen_sweep_step_generator_bound", "1 when the generator was the bottleneck "
                              "of the step.", labels=labels)
    stable = GaugeMetricFamily("loadgen_sweep_step_stable", "1 when the step's throughput and p99 were stable.",
                               labels=labels)
    slo = GaugeMetricFamily("loadgen_sweep_step_slo_met", "1 when the step met every objective.", labels=labels)
    goodput = GaugeMetricFamily("loadgen_sweep_step_goodput_rps", "With --goodput: a completed step's good "
                                "responses a second.", labels=labels)
    share = GaugeMetricFamily("loadgen_sweep_step_good_ratio", "With --goodput: a completed step's share of "
                              "good responses.", labels=labels)
    for step in steps:
        key = [str(step.index), f"{step.load:g}"]
        offered.add_metric(key, step.offered_rps)
        achieved.add_metric(key, step.achieved_rps)
        for quantile, name in QUANTILES.items():
            latency.add_metric([*key, quantile], step.latency_ms[name] / 1000.0)
        errors.add_metric(key, step.error_ratio)
        bound.add_metric(key, float(step.generator_bound))
        stable.add_metric(key, float(step.stable))
        if step.slo_met is not None:
            slo.add_metric(key, float(step.slo_met))
        if step.goodput_rps is not None:
            goodput.add_metric(key, step.goodput_rps)
            share.add_metric(key, float(step.goodput_share or 0.0))
    yield from (offered, achieved, latency, errors, bound, stable, slo)
    if goodput.samples:
        yield from (goodput, share)


def _verdict_families(judged: dict[str, Any]) -> Iterator[Metric]:
    for key, documentation in _VERDICT_GAUGES:
        if judged.get(key) is not None:
            yield _gauge(f"loadgen_sweep_{key}", documentation, judged[key])
    if "saturated" in judged:
        yield _gauge("loadgen_sweep_saturated", "1 when some healthy step fell behind or stopped adding "
                     "throughput (else saturation_rps is a lower bound).", float(judged["saturated"]))
    knee = judged.get("knee")
    if knee:
        yield _gauge("loadgen_sweep_knee_rps", "Achieved throughput at the knee of the curve (req/s).",
                     knee["achieved_rps"])
        yield _gauge("loadgen_sweep_knee_load", "Load of the knee step (req/s, or users).", knee["load"])
