"""Prometheus collectors: counters, histograms and percentile gauges equal the recorder's figures; the
sweep's families equal its steps and verdict."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.utils import floatToGoString

from loadgen.goodput import parse_goodput
from loadgen.recorder import Recorder
from loadgen.sinks import prometheus
from loadgen.sinks.prometheus import BUCKETS_S, QUANTILES, RunCollector, SweepCollector
from loadgen.sinks.summary import build_summary
from loadgen.sweep import StepResult, verdict

START = 1000.0


@dataclass
class FakeRun:
    """The RunView of a finished run: a recorder and fixed live figures."""

    recorder: Recorder | None
    in_flight: int = 0
    offered: float = 0.0

    metrics_host: str = "127.0.0.1"

    def offered_rps_now(self) -> float:
        return self.offered

    def worker_health(self) -> None:
        return None


def record_interval(rec: Recorder, index: int, latency_s: float, count: int = 10, errors: int = 0) -> None:
    """`count` ok requests of `latency_s` (1/10 of it lag) and `errors` timeouts, then close interval `index`."""
    t = START + index
    for _ in range(count):
        rec.record(t, t + latency_s / 10, t + latency_s, None)
    for _ in range(errors):
        rec.record(t, t, t + 0.5, "timeout")
    rec.close_interval(START + index + 1)


def registry_of(run: FakeRun, **kwargs) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(run, **kwargs))
    return registry


def fifteen_intervals() -> Recorder:
    """Interval i holds latencies of (i + 1) ms: the last ten are 6..15 ms."""
    rec = Recorder(START)
    for index in range(15):
        record_interval(rec, index, (index + 1) / 1000, errors=index % 2)
    rec.record_dropped(START + 15)
    rec.finish(START + 15.5)
    return rec


def test_counters_equal_the_recorders_counts() -> None:
    rec = fifteen_intervals()
    registry = registry_of(FakeRun(rec))
    figures = rec.cumulative
    assert registry.get_sample_value("loadgen_requests_total", {"outcome": "ok", "kind": "ok"}) == figures.ok == 150
    assert registry.get_sample_value("loadgen_requests_total", {"outcome": "error", "kind": "timeout"}) == 7
    assert figures.errors == {"timeout": 7}
    assert registry.get_sample_value("loadgen_sent_total") == figures.sent == 157
    assert registry.get_sample_value("loadgen_dropped_total") == figures.dropped == 1
    assert registry.get_sample_value("loadgen_out_of_range_total") == 0


@pytest.mark.parametrize("which", ["latency", "service"])
def test_histogram_buckets_are_cumulative_and_end_at_the_ok_count(which: str) -> None:
    rec = fifteen_intervals()
    registry = registry_of(FakeRun(rec))
    name = f"loadgen_{which}_seconds"
    counts = [registry.get_sample_value(f"{name}_bucket", {"le": floatToGoString(b)}) for b in BUCKETS_S]
    counts.append(registry.get_sample_value(f"{name}_bucket", {"le": "+Inf"}))
    assert counts == sorted(counts)
    assert counts[-1] == rec.cumulative.ok == registry.get_sample_value(f"{name}_count")
    # 10 requests per whole millisecond of latency, 1..15 ms (service: 0.9 of it).
    scale = 1.0 if which == "latency" else 0.9
    for bound, count in zip(BUCKETS_S, counts, strict=False):
        expected = 10 * sum(1 for ms in range(1, 16) if round(ms * scale * 1000) <= round(bound * 1e6))
        assert count == expected, bound
    mean_s = rec.cumulative.percentiles_ms(which)["mean"] / 1000
    assert registry.get_sample_value(f"{name}_sum") == pytest.approx(mean_s * rec.cumulative.ok, rel=1e-3)


def test_buckets_are_log_spaced_from_100us_to_60s() -> None:
    assert BUCKETS_S[0] == 1e-4 and BUCKETS_S[-1] == 60.0
    ratios = [b / a for a, b in itertools.pairwise(BUCKETS_S)]
    assert all(1.2 < r < 1.3 for r in ratios[:-1])


@pytest.mark.parametrize("which", ["latency", "service", "lag"])
def test_run_percentiles_equal_the_cumulative_histograms(which: str) -> None:
    rec = fifteen_intervals()
    registry = registry_of(FakeRun(rec))
    expected = rec.cumulative.percentiles_ms(which)
    for quantile, key in QUANTILES.items():
        value = registry.get_sample_value(f"loadgen_{which}_percentile_seconds", {"quantile": quantile, "window": "run"})
        assert value == expected[key] / 1000


def test_ten_second_window_holds_only_the_last_ten_intervals() -> None:
    rec = fifteen_intervals()
    registry = registry_of(FakeRun(rec))

    def window(quantile: str) -> float:
        labels = {"quantile": quantile, "window": "10s"}
        return registry.get_sample_value("loadgen_latency_percentile_seconds", labels)

    # Sixteen intervals: the last holds only the dropped arrival, so the last ten hold 7..15 ms.
    assert len(rec.intervals) == 16
    assert window("0.5") == pytest.approx(0.011, abs=2e-5)
    assert window("0.999") == pytest.approx(0.015, abs=2e-5)
    run = registry.get_sample_value("loadgen_latency_percentile_seconds", {"quantile": "0.5", "window": "run"})
    assert run == pytest.approx(0.008, abs=2e-5)


def test_ten_second_window_of_exactly_fifteen_intervals() -> None:
    rec = Recorder(START)
    for index in range(15):
        record_interval(rec, index, (index + 1) / 1000)
    registry = registry_of(FakeRun(rec))
    labels = {"quantile": "0.5", "window": "10s"}
    # Intervals 5..14 hold 6..15 ms, ten requests each: the median is 10 ms.
    assert registry.get_sample_value("loadgen_latency_percentile_seconds", labels) == pytest.approx(0.010, abs=1e-5)
    labels["quantile"] = "0.999"
    assert registry.get_sample_value("loadgen_latency_percentile_seconds", labels) == pytest.approx(0.015, abs=2e-5)
    # Nothing below 6 ms is in the window: the 10 s window's lowest quantile would show it.
    rec.record(START + 15, START + 15, START + 15.001, None)
    rec.close_interval(START + 16)
    labels["quantile"] = "0.5"
    assert registry.get_sample_value("loadgen_latency_percentile_seconds", labels) == pytest.approx(0.011, abs=1e-5)


def test_live_gauges() -> None:
    rec = Recorder(START)
    record_interval(rec, 0, 0.002, count=40, errors=2)
    cpu = iter([0.0, 0.5])
    clock = iter([0.0, 2.0])
    run = FakeRun(rec, in_flight=3, offered=100.0)
    registry = registry_of(run, clock=lambda: next(clock), cpu_seconds=lambda: next(cpu))
    assert registry.get_sample_value("loadgen_achieved_rps") == 42.0
    assert registry.get_sample_value("loadgen_offered_rps") == 100.0
    assert registry.get_sample_value("loadgen_in_flight") == 3
    assert registry.get_sample_value("loadgen_generator_cpu_ratio") == 0.25


def streamed_run_with_goodput() -> Recorder:
    """Fifteen 1 s intervals of 20 streams each: TTFT (10 + i) ms (or 150 ms for every fifth stream, bad
    for ttft<100ms), then 3 to 6 token chunks (i % 4 + 3) 4 ms apart, with 2 tokens a chunk."""
    rec = Recorder(START, streams=True, goodput=parse_goodput("ttft<100ms,itl<50ms"), window_end_t=START + 15)
    for index in range(15):
        for k in range(20):
            t = START + index + k * 0.04
            first = t + (0.150 if k % 5 == 0 else (10 + index) / 1000)
            times = [first + 0.004 * c for c in range(index % 4 + 3)]
            rec.record_stream(t, t, times[-1] + 0.001, None, times, 2 * len(times))
        rec.close_interval(START + index + 1)
    rec.finish(START + 15)
    return rec


def test_streamed_run_gauges_equal_its_summary() -> None:
    """A finished streamed run with goodput terms: every TTFT/ITL/TPOT percentile gauge of the whole run, the
    good requests and output tokens equal summary.json's figures; the rates are the last interval's."""
    rec = streamed_run_with_goodput()
    registry = registry_of(FakeRun(rec))
    summary = build_summary(rec, offered_rps=20.0, duration_s=15.0, generator={})
    for which in ("ttft", "itl", "tpot"):
        for quantile, key in QUANTILES.items():
            value = registry.get_sample_value(f"loadgen_{which}_percentile_seconds",
                                              {"quantile": quantile, "window": "run"})
            assert value == summary[f"{which}_ms"][key] / 1000, (which, quantile)
    assert registry.get_sample_value("loadgen_good_requests_total") == summary["goodput"]["good"] == 15 * 16
    assert registry.get_sample_value("loadgen_output_tokens_total") == summary["output_tokens"]
    last = rec.intervals[-1].figures
    assert registry.get_sample_value("loadgen_goodput_rps") == last.good == 16
    assert registry.get_sample_value("loadgen_output_tokens_per_s") == last.stream.output_tokens == 20 * 2 * 5
    # The 10 s window: intervals 5..14, 16 streams each with TTFT 15..24 ms and 40 of 150 ms: the 100th of
    # the 200 is the 4th of the 16 at 21 ms.
    median = registry.get_sample_value("loadgen_ttft_percentile_seconds", {"quantile": "0.5", "window": "10s"})
    assert median == pytest.approx(0.021, abs=3e-5)


def test_a_run_without_streams_or_goodput_has_no_such_families() -> None:
    registry = registry_of(FakeRun(fifteen_intervals()))
    names = {metric.name for metric in registry.collect()}
    assert "loadgen_latency_percentile_seconds" in names
    assert not names & {"loadgen_ttft_percentile_seconds", "loadgen_good_requests", "loadgen_goodput_rps",
                        "loadgen_output_tokens", "loadgen_output_tokens_per_s"}


def test_before_the_run_only_live_gauges() -> None:
    registry = registry_of(FakeRun(None, offered=5.0))
    assert registry.get_sample_value("loadgen_requests_total", {"outcome": "ok", "kind": "ok"}) is None
    assert registry.get_sample_value("loadgen_offered_rps") == 5.0


def test_an_interval_being_closed_is_not_half_read() -> None:
    rec = Recorder(START)
    record_interval(rec, 0, 0.002)
    registry = registry_of(FakeRun(rec))
    assert registry.get_sample_value("loadgen_requests_total", {"outcome": "ok", "kind": "ok"}) == 10
    rec.record(START + 1, START + 1, START + 1.002, None)
    steps = rec.close_interval_steps(START + 2)
    for _ in steps:
        if rec.closing:
            break
    next(steps)  # the latency histogram is in cumulative, the counters are not yet
    assert rec.cumulative.latency.get_total_count() != rec.cumulative.ok
    assert registry.get_sample_value("loadgen_latency_seconds_count") == 10
    for _ in steps:
        pass
    assert registry.get_sample_value("loadgen_latency_seconds_count") == 11
    assert registry.get_sample_value("loadgen_requests_total", {"outcome": "ok", "kind": "ok"}) == 11


def test_a_scrape_s_work_does_not_grow_with_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a thousand intervals, a scrape that follows a newly closed interval merges only the last 10 s
    of intervals (the run-long figures are the recorder's cumulative set, read, not rebuilt), and a scrape
    with nothing new closed rebuilds nothing: counted, not timed, so that a busy host cannot change it."""
    merged: list[int] = []
    snapshots = 0
    real_sum, real_snapshot = prometheus.sum_histograms, prometheus._snapshot_of

    def counting_sum(histograms, **kwargs):
        histograms = list(histograms)
        merged.append(len(histograms))
        return real_sum(histograms, **kwargs)

    def counting_snapshot(*args, **kwargs):
        nonlocal snapshots
        snapshots += 1
        return real_snapshot(*args, **kwargs)

    monkeypatch.setattr(prometheus, "sum_histograms", counting_sum)
    monkeypatch.setattr(prometheus, "_snapshot_of", counting_snapshot)
    rec = Recorder(START)
    for index in range(1000):
        record_interval(rec, index, 0.001 + (index % 50) / 1000, count=5, errors=index % 3 == 0)
    collector = RunCollector(FakeRun(rec))
    list(collector.collect())  # the first scrape builds the snapshot
    rec.record(START + 1000, START + 1000, START + 1000.002, None)
    rec.close_interval(START + 1001)
    merged.clear()
    snapshots = 0
    families = list(collector.collect())
    window = round(prometheus.WINDOW_S / rec.interval_s)
    assert snapshots == 1 and merged == [window] * len(prometheus._PERCENTILE_GAUGES)
    assert families and all(family.samples for family in families)
    for _ in range(20):
        assert list(collector.collect())
    assert snapshots == 1 and len(merged) == len(prometheus._PERCENTILE_GAUGES)


def _sweep_step(index: int, load: float, achieved: float, *, errors: int = 0, requests: int = 100,
                slo: bool | None = None) -> StepResult:
    latency = {"p50": 10.0 * index, "p90": 12.0 * index, "p99": 20.0 * index, "p99_9": 30.0 * index}
    return StepResult(index=index, load=load, offered_rps=load, achieved_rps=achieved, latency_ms=latency,
                      errors=errors, dropped=0, generator_bound=False, stable=True, slo_met=slo,
                      requests=requests)


def test_sweep_families_follow_the_steps_and_the_verdict() -> None:
    live = SweepCollector(closed_loop=False)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(live)
    assert registry.get_sample_value("loadgen_sweep_current_step") == 0
    assert registry.get_sample_value("loadgen_sweep_info", {"unit": "rps"}) == 1
    steps = [_sweep_step(1, 50, 50.0), _sweep_step(2, 100, 99.0, errors=3, requests=200),
             _sweep_step(3, 150, 120.0)]
    for done, step in enumerate(steps):
        live.begin_step(step.index, step.load)
        assert registry.get_sample_value("loadgen_sweep_current_step") == step.index
        assert registry.get_sample_value("loadgen_sweep_current_load") == step.load
        # Only the finished steps have series: the label set grows by one step at a time.
        series = [s for s in registry.collect() for s in s.samples if s.name == "loadgen_sweep_step_achieved_rps"]
        assert len(series) == done
        live.end_step(step)
        live.judge(verdict(steps[:done + 1], has_slo=False))
        assert registry.get_sample_value("loadgen_sweep_finished") == 0
    labels = {"step": "2", "load": "100"}
    assert registry.get_sample_value("loadgen_sweep_step_achieved_rps", labels) == 99.0
    assert registry.get_sample_value("loadgen_sweep_step_offered_rps", labels) == 100.0
    assert registry.get_sample_value("loadgen_sweep_step_error_ratio", labels) == 3 / 200
    for quantile, key in QUANTILES.items():
        assert registry.get_sample_value("loadgen_sweep_step_latency_seconds", {**labels, "quantile": quantile}) \
            == pytest.approx(steps[1].latency_ms[key] / 1000.0)
    assert registry.get_sample_value("loadgen_sweep_step_slo_met", labels) is None  # no SLO, no series
    assert registry.get_sample_value("loadgen_sweep_step_goodput_rps", labels) is None  # no goodput terms
    judged = verdict(steps, has_slo=False)
    live.judge(judged, finished=True)
    assert registry.get_sample_value("loadgen_sweep_finished") == 1
    assert registry.get_sample_value("loadgen_sweep_saturation_rps") == judged["saturation_rps"] == 120.0
    assert registry.get_sample_value("loadgen_sweep_saturated") == 1.0
    assert registry.get_sample_value("loadgen_sweep_knee_load") == judged["knee"]["load"] == 100
    assert registry.get_sample_value("loadgen_sweep_knee_rps") == 99.0
    assert registry.get_sample_value("loadgen_sweep_max_rps_meeting_slo") is None


def test_sweep_families_in_closed_loop_and_with_an_slo() -> None:
    live = SweepCollector(closed_loop=True)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(live)
    step = _sweep_step(1, 4, 200.0, slo=True)
    step.offered_rps = 0.0
    live.end_step(step)
    live.judge(verdict([step], has_slo=True))
    assert registry.get_sample_value("loadgen_sweep_info", {"unit": "users"}) == 1
    assert registry.get_sample_value("loadgen_sweep_step_slo_met", {"step": "1", "load": "4"}) == 1.0
    assert registry.get_sample_value("loadgen_sweep_max_rps_meeting_slo") == 200.0


def test_sweep_scrape_pauses_between_step_families() -> None:
    """The sweep's scrape runs on the loop of a running step: it yields to it after each per-step family."""
    pauses = []
    live = SweepCollector(closed_loop=False, pause=lambda: pauses.append(1))
    live.end_step(_sweep_step(1, 50, 50.0))
    families = list(live.collect())
    step_families = [f for f in families if f.name.startswith("loadgen_sweep_step_")]
    assert len(pauses) == len(step_families) == 7


def test_sweep_families_with_goodput_terms() -> None:
    live = SweepCollector(closed_loop=False)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(live)
    step = _sweep_step(1, 40, 40.0)
    step.goodput = {"terms": "ttft<70ms", "good": 30, "judged": 40, "share": 0.75, "goodput_rps": 30.0}
    live.end_step(step)
    labels = {"step": "1", "load": "40"}
    assert registry.get_sample_value("loadgen_sweep_step_goodput_rps", labels) == 30.0
    assert registry.get_sample_value("loadgen_sweep_step_good_ratio", labels) == 0.75
