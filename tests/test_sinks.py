"""Sinks: the .hlog round trip, the summary's figures, and the terminal table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogReader

import loadgen.sinks
from loadgen.recorder import HistogramSet, Interval, Recorder, new_histogram
from loadgen.recorder._hdr import counts_view
from loadgen.sinks import build_summary, read_hlog, render_table, write_hlog, write_summary

START_EPOCH_S = 1_700_000_000.25
TAGS = {"latency": None, "service": "service", "lag": "lag"}


def same_histogram(got: HdrHistogram, want: HdrHistogram) -> bool:
    return (
        np.array_equal(counts_view(got), counts_view(want))
        and got.get_total_count() == want.get_total_count()
        and got.get_min_value() == want.get_min_value()
        and got.get_max_value() == want.get_max_value()
    )


def busy_recorder() -> Recorder:
    """Three intervals of random traffic (one with errors) and an empty fourth."""
    rng = np.random.default_rng(7)
    rec = Recorder(start_t=50.0)
    for second in range(3):
        for intended_t in 50.0 + second + np.sort(rng.uniform(0.0, 1.0, 500)):
            sent_t = intended_t + rng.exponential(0.0001)
            error = "timeout" if rng.random() < 0.02 else None
            rec.record(intended_t, sent_t, sent_t + rng.lognormal(np.log(0.005), 0.5), error)
        rec.close_interval(51.0 + second)
    rec.finish(53.5)
    return rec


def test_hlog_round_trip_equals_every_interval_and_the_cumulative(tmp_path: Path) -> None:
    rec = busy_recorder()
    path = tmp_path / "run.hlog"
    write_hlog(path, rec, START_EPOCH_S)
    by_tag = read_hlog(path)
    assert sorted(by_tag, key=str) == sorted(TAGS.values(), key=str)
    for name, tag in TAGS.items():
        read = by_tag[tag]
        assert len(read) == len(rec.intervals) == 4
        for hist, interval in zip(read, rec.intervals, strict=True):
            assert same_histogram(hist, getattr(interval.figures, name))
        total = new_histogram()
        for hist in read:
            if hist.get_total_count():
                total.add(hist)
        assert same_histogram(total, getattr(rec.cumulative, name))


@pytest.mark.parametrize("start_epoch_s", [1795893306.18484, 1795893306.9999996, 1795893306.0005])
def test_hlog_keeps_the_first_interval_whatever_the_start_time(tmp_path: Path, start_epoch_s: float) -> None:
    # A StartTime written rounded up past BaseTime made readers drop the first interval.
    rec = busy_recorder()
    write_hlog(tmp_path / "run.hlog", rec, start_epoch_s)
    assert [h.get_total_count() for h in read_hlog(tmp_path / "run.hlog")[None]] == [
        interval.figures.latency.get_total_count() for interval in rec.intervals
    ]


def test_hlog_reads_with_hdrh_reader_times_tags_and_max_column(tmp_path: Path) -> None:
    rec = busy_recorder()
    path = tmp_path / "run.hlog"
    write_hlog(path, rec, START_EPOCH_S)
    reader = HistogramLogReader(str(path), new_histogram())
    seen = []
    while (hist := reader.get_next_interval_histogram()) is not None:
        seen.append((hist.get_tag(), hist.get_start_time_stamp(), hist.get_end_time_stamp()))
    assert reader.get_start_time_sec() == pytest.approx(START_EPOCH_S, abs=1e-3)
    reader.close()
    expected = [
        (tag, (START_EPOCH_S + i.start_t - 50.0) * 1000, (START_EPOCH_S + i.end_t - 50.0) * 1000)
        for i in rec.intervals
        for tag in TAGS.values()
    ]
    assert [s[0] for s in seen] == [e[0] for e in expected]
    assert np.allclose([s[1:] for s in seen], [e[1:] for e in expected], rtol=0, atol=1e-3)

    lines = path.read_text().splitlines()
    assert any(line.startswith("#[StartTime: 1700000000.250000 ") for line in lines)
    data = [line for line in lines if line[0].isdigit() or line.startswith("Tag=")]
    assert [line.split(",")[0] for line in data[:3]] == ["0.000000", "Tag=service", "Tag=lag"]
    first_max_ms = rec.intervals[0].figures.latency.get_max_value() // 1000
    assert float(data[0].split(",")[2]) == first_max_ms


def test_hlog_starts_at_an_interval_earlier_than_the_run(tmp_path: Path) -> None:
    rec = Recorder(start_t=10.0)
    early = HistogramSet(ok=1)
    early.latency.record_value(1234)
    rec.merge_interval(Interval(start_t=9.0, end_t=10.0, figures=early))
    rec.record(10.0, 10.0, 10.001, None)
    rec.finish(11.0)
    path = tmp_path / "run.hlog"
    write_hlog(path, rec, START_EPOCH_S)
    latency = read_hlog(path)[None]
    assert [hist.get_total_count() for hist in latency] == [1, 1]
    assert latency[0].get_start_time_stamp() == pytest.approx((START_EPOCH_S - 1.0) * 1000, abs=1e-3)


def hand_made_recorder() -> Recorder:
    """Ten successes (latency 2 ms, service 1.5 ms, lag 0.5 ms), three errors, three dropped."""
    rec = Recorder(start_t=0.0, window_end_t=1.0)
    for k in range(10):
        intended_t = k * 0.1
        rec.record(intended_t, intended_t + 0.0005, intended_t + 0.002, None)
    rec.record(0.20, 0.2005, 0.25, "timeout")
    rec.record(0.30, 0.3005, 1.30, "timeout")  # completes after the window
    rec.record(0.40, 0.4005, 0.41, "http_503")
    for _ in range(3):
        rec.record_dropped(0.5)
    rec.finish(2.0)
    return rec


def test_summary_figures_on_a_hand_made_recorder(tmp_path: Path) -> None:
    generator = {"bound": False, "lag_p99_ms": 0.5, "cpu_percent": 12.0, "in_flight_max": 3}
    summary = build_summary(
        hand_made_recorder(), offered_rps=10.0, duration_s=1.0, generator=generator, extra={"scenario": "x"}
    )
    assert summary["offered_rps"] == 10.0
    assert summary["sent_rps"] == 13.0
    assert summary["achieved_rps"] == 12.0
    assert (summary["requests"], summary["ok"], summary["dropped"], summary["out_of_range"]) == (13, 10, 3, 0)
    assert summary["errors"] == {"http_503": 1, "timeout": 2}
    assert summary["generator_bound"] is False and summary["generator"] == generator
    assert summary["latency_ms"] == dict.fromkeys(("p50", "p90", "p99", "p99_9", "max", "mean"), 2.0)
    assert summary["service_ms"]["p99"] == 1.5 and summary["lag_ms"]["max"] == 0.5
    assert summary["duration_s"] == 1.0 and summary["scenario"] == "x"

    path = tmp_path / "summary.json"
    write_summary(path, summary)
    assert json.loads(path.read_text()) == summary


def test_summary_with_no_duration_reports_zero_rates() -> None:
    summary = build_summary(Recorder(start_t=0.0), offered_rps=5.0, duration_s=0.0, generator={})
    assert summary["achieved_rps"] == summary["sent_rps"] == 0.0
    assert summary["latency_ms"]["p50"] == 0.0 and summary["generator_bound"] is False


def test_table_shows_the_figures_and_the_generator_warning() -> None:
    generator = {"bound": True, "reasons": ["lag p99 2.1 ms > 1 ms", "CPU 97 %"]}
    summary = build_summary(hand_made_recorder(), offered_rps=10.0, duration_s=1.0, generator=generator)
    table = render_table(summary)
    lines = table.splitlines()
    assert lines[0].split() == ["p50", "p90", "p99", "p99.9", "max", "mean", "(ms)"]
    assert lines[1].split() == ["latency", *["2.000"] * 6]
    assert lines[2].split()[0:2] == ["service", "1.500"] and lines[3].split()[0:2] == ["lag", "0.500"]
    assert "offered 10.0/s" in table and "sent 13.0/s" in table and "achieved 12.0/s" in table
    assert "13 requests" in table and "3 errors (http_503 1, timeout 2)" in table and "3 dropped" in table
    assert lines[-1].startswith("GENERATOR-BOUND: lag p99 2.1 ms > 1 ms; CPU 97 %")

    healthy = render_table(summary | {"generator_bound": False})
    assert "GENERATOR-BOUND" not in healthy


def test_exports_match_all() -> None:
    assert sorted(loadgen.sinks.__all__) == [
        "RunCollector",
        "build_summary",
        "read_hlog",
        "render_table",
        "write_hlog",
        "write_summary",
    ]
    for name in loadgen.sinks.__all__:
        assert callable(getattr(loadgen.sinks, name))
