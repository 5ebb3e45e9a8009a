"""Recorder: vectorised recording equals hdrh's, merges are exact, intervals and counters are right."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hdrh.histogram import HdrHistogram

import loadgen.recorder
from loadgen.recorder import (
    HIGHEST_US,
    HistogramSet,
    Interval,
    Recorder,
    _figures,
    _hdr,
    _recorder,
    new_histogram,
    record_many,
)
from loadgen.recorder._hdr import counts_indices, counts_view, mean_value, values_at_percentiles

EVERY_TENTH = [round(step * 0.1, 1) for step in range(1001)]


def edge_values() -> np.ndarray:
    """0, 1, the top of the range, and both sides of every power of two in it."""
    powers = [1 << shift for shift in range(32) if (1 << shift) <= HIGHEST_US]
    around = [p + delta for p in powers for delta in (-1, 0, 1)]
    return np.array([0, 1, 2, 2047, 2048, 2049, HIGHEST_US - 1, HIGHEST_US, *around], dtype=np.int64)


def spread_values(rng: np.random.Generator, count: int) -> np.ndarray:
    """Log-uniform values over the whole range, plus the edges."""
    logs = rng.uniform(0.0, np.log(HIGHEST_US), count)
    values = np.minimum(np.exp(logs).astype(np.int64), HIGHEST_US)
    return np.concatenate([edge_values(), values])


def assert_same_histogram(got: HdrHistogram, want: HdrHistogram) -> None:
    assert np.array_equal(counts_view(got), counts_view(want))
    assert got.get_total_count() == want.get_total_count()
    assert got.get_min_value() == want.get_min_value()
    assert got.get_max_value() == want.get_max_value()
    assert got.get_percentile_to_value_dict(EVERY_TENTH) == want.get_percentile_to_value_dict(EVERY_TENTH)


def assert_same_set(got: HistogramSet, want: HistogramSet) -> None:
    for name in _figures.HISTOGRAMS:
        assert_same_histogram(getattr(got, name), getattr(want, name))
    for name in _figures.COUNTERS:
        assert getattr(got, name) == getattr(want, name), name
    assert got.errors == want.errors


# record_many against hdrh's record_value


def test_counts_indices_match_hdrh_at_every_edge_and_at_random() -> None:
    # The only float step is the bit length, which changes exactly at powers of two: both sides of
    # every power of two in range are among the edges, so every bucket boundary is checked.
    hist = new_histogram()
    values = spread_values(np.random.default_rng(1), 20_000)
    expected = np.array([hist.get_counts_array_index(int(v)) for v in values])
    assert np.array_equal(counts_indices(hist, values), expected)


def test_record_many_equals_record_value_per_value() -> None:
    values = spread_values(np.random.default_rng(2), 20_000)
    by_hdrh = new_histogram()
    for value in values:
        assert by_hdrh.record_value(int(value))
    batched = new_histogram()
    assert record_many(batched, values[:5_000]) == 0
    assert record_many(batched, values[5_000:]) == 0
    assert_same_histogram(batched, by_hdrh)
    assert (batched.min_value, batched.max_value) == (by_hdrh.min_value, by_hdrh.max_value)
    assert batched.encode() == by_hdrh.encode()


def test_record_many_clamps_counts_and_records_out_of_range_values() -> None:
    values = np.array([-5, -1, 0, 7, HIGHEST_US, HIGHEST_US + 1, 2**40], dtype=np.int64)
    batched = new_histogram()
    assert record_many(batched, values) == 4
    by_hdrh = new_histogram()
    for value in np.clip(values, 0, HIGHEST_US):
        assert by_hdrh.record_value(int(value))
    assert_same_histogram(batched, by_hdrh)
    assert record_many(batched, np.array([], dtype=np.int64)) == 0


def test_percentiles_and_mean_match_hdrh() -> None:
    hist = new_histogram()
    record_many(hist, spread_values(np.random.default_rng(3), 5_000))
    expected = hist.get_percentile_to_value_dict(EVERY_TENTH)
    assert values_at_percentiles(hist, EVERY_TENTH) == [expected[p] for p in EVERY_TENTH]
    assert [hist.get_value_at_percentile(p) for p in (0.0, 50.0, 99.9, 100.0)] == values_at_percentiles(
        hist, [0.0, 50.0, 99.9, 100.0]
    )
    assert mean_value(hist) == pytest.approx(hist.get_mean_value(), rel=1e-12)
    assert values_at_percentiles(new_histogram(), [50.0]) == []
    assert mean_value(new_histogram()) == 0.0


# merging: the wire path (encode -> decode -> add) is exact


def feed(
    recorder: Recorder, samples: list[tuple[float, float, float, str | None]], close_at: list[float]
) -> None:
    pending = iter(close_at)
    boundary = next(pending)
    for intended_t, sent_t, done_t, error in samples:
        while done_t >= boundary:
            recorder.close_interval(boundary)
            boundary = next(pending)
        recorder.record(intended_t, sent_t, done_t, error)
    recorder.finish(close_at[-1])


def random_samples(rng: np.random.Generator, count: int) -> list[tuple[float, float, float, str | None]]:
    intended = np.sort(rng.uniform(0.0, 3.0, count))
    lag = rng.exponential(0.0002, count)
    service = rng.lognormal(np.log(0.01), 1.0, count)
    service[:3] = [-0.5, 4000.0, 3.0]  # out of range: negative, over an hour, and in range
    kinds = rng.choice(["http_503", "timeout", None, None, None, None], count)
    order = np.argsort(intended + lag + service)
    rows = zip(intended, intended + lag, intended + lag + service, kinds, strict=True)
    table = list(rows)
    return [(float(i), float(s), float(d), k) for i, s, d, k in (table[j] for j in order)]


def test_two_recorders_merged_over_the_wire_equal_one_fed_the_union() -> None:
    samples = random_samples(np.random.default_rng(4), 20_000)
    close_at = [1.0, 2.0, 3.0, 4.0, 1e4]
    union, first, second = (Recorder(start_t=0.0, window_end_t=3.5) for _ in range(3))
    feed(union, samples, close_at)
    feed(first, samples[0::2], close_at)
    feed(second, samples[1::2], close_at)
    for recorder in (first, second):
        recorder.record_dropped(1.0)
        recorder.finish(2e4)
    union.record_dropped(1.0)
    union.record_dropped(1.5)
    union.finish(2e4)

    merged = HistogramSet()
    for recorder in (first, second):
        merged.add(HistogramSet.decode(recorder.cumulative.encode()))
    assert_same_set(merged, union.cumulative)
    assert union.cumulative.out_of_range == 4  # 2 latencies + 2 services clamped; errors skip both
    assert merged.percentiles_ms("latency") == union.cumulative.percentiles_ms("latency")


def test_master_merging_worker_intervals_equals_the_union() -> None:
    samples = random_samples(np.random.default_rng(5), 4_000)
    close_at = [1.0, 2.0, 3.0, 1e4]
    union, first, second = (Recorder(start_t=0.0) for _ in range(3))
    for recorder, part in ((union, samples), (first, samples[:1_000]), (second, samples[1_000:])):
        feed(recorder, part, close_at)
    master = Recorder(start_t=0.0)
    for worker in (first, second):
        for interval in worker.intervals:
            figures = HistogramSet.decode(interval.figures.encode())
            master.merge_interval(Interval(interval.start_t, interval.end_t, figures))
    assert_same_set(master.cumulative, union.cumulative)
    assert len(master.intervals) == len(first.intervals) + len(second.intervals)


def test_decode_names_missing_keys() -> None:
    data = HistogramSet().encode()
    del data["lag"], data["sent"]
    with pytest.raises(ValueError, match="lag, sent"):
        HistogramSet.decode(data)


def test_adding_an_empty_set_keeps_the_minimum() -> None:
    figures = HistogramSet()
    record_many(figures.latency, np.array([700, 900]))
    figures.add(HistogramSet())
    assert figures.latency.get_min_value() == 700


# intervals and measurement rules


def test_samples_land_in_the_interval_open_when_recorded() -> None:
    rec = Recorder(start_t=10.0, interval_s=1.0)
    rec.record(10.0, 10.0, 10.002, None)
    rec.record(10.5, 10.5, 10.5015, None)
    first = rec.close_interval(11.0)
    rec.record(11.2, 11.2, 11.205, "timeout")
    rec.record_dropped(11.3)
    second = rec.close_interval(12.0)
    rec.record(12.1, 12.1, 12.107, None)
    rec.finish(12.5)
    rec.finish(13.0)  # idempotent: no new interval

    assert [(i.start_t, i.end_t) for i in rec.intervals] == [(10.0, 11.0), (11.0, 12.0), (12.0, 12.5)]
    assert rec.intervals[:2] == [first, second]
    assert first.figures.ok == 2 and first.figures.latency.get_total_count() == 2
    assert first.figures.latency.get_max_value() == 2000 and first.figures.latency.get_min_value() == 1500
    assert second.figures.errors == {"timeout": 1} and second.figures.dropped == 1
    assert second.figures.latency.get_total_count() == 0 and second.figures.lag.get_total_count() == 1
    assert rec.intervals[2].figures.latency.get_count_at_value(7000) == 1

    total = HistogramSet()
    for interval in rec.intervals:
        total.add(interval.figures)
    assert_same_set(rec.cumulative, total)
    assert (rec.cumulative.sent, rec.cumulative.requests, rec.cumulative.ok) == (4, 4, 3)


def test_errors_enter_lag_only_and_are_counted_by_kind() -> None:
    rec = Recorder(start_t=0.0)
    rec.record(0.0, 0.001, 0.010, None)
    rec.record(0.0, 0.002, 5.000, "timeout")
    rec.record(0.0, 0.003, 0.004, "http_503")
    rec.record(0.0, 0.004, 0.005, "http_503")
    rec.finish(6.0)
    figures = rec.cumulative
    assert figures.latency.get_total_count() == figures.service.get_total_count() == 1
    assert figures.latency.get_count_at_value(10_000) == 1 and figures.service.get_count_at_value(9_000) == 1
    assert figures.lag.get_total_count() == 4
    assert [figures.lag.get_count_at_value(us) for us in (1_000, 2_000, 3_000, 4_000)] == [1, 1, 1, 1]
    assert figures.errors == {"timeout": 1, "http_503": 2}
    assert (figures.ok, figures.requests, figures.sent) == (1, 4, 4)


def test_out_of_range_values_are_clamped_recorded_and_counted() -> None:
    rec = Recorder(start_t=0.0)
    rec.record(1.0, 1.0, 0.5, None)  # done before intended: latency and service negative
    rec.record(0.0, 0.0, 3_700.0, None)  # over an hour
    rec.record(0.0, 0.0, float("nan"), None)
    rec.record(2.0, 2.0, 2.0, None)  # exactly 0: in range
    rec.finish(4_000.0)
    figures = rec.cumulative
    assert figures.out_of_range == 6
    assert figures.latency.get_total_count() == 4
    assert figures.latency.get_count_at_value(0) == 2
    assert figures.latency.get_count_at_value(HIGHEST_US) == 2
    assert figures.lag.get_count_at_value(0) == 4


def test_percentiles_ms_on_one_to_a_thousand_ms() -> None:
    rec = Recorder(start_t=0.0)
    for k in range(1, 1001):
        rec.record(0.0, 0.0, k / 1000, None)
    rec.finish(2.0)
    # 3 significant digits: 500 ms falls in a 256 us bucket [499.968, 500.224), 900..1000 ms in 512 us
    # ones; a percentile reports its bucket's highest value.
    assert rec.cumulative.percentiles_ms("latency") == {
        "p50": 500.223,
        "p90": 900.095,
        "p99": 990.207,
        "p99_9": 999.423,
        "max": 1000.447,
        "mean": pytest.approx(500.5, abs=0.2),
    }
    assert rec.cumulative.percentiles_ms("lag") == dict.fromkeys(
        ("p50", "p90", "p99", "p99_9", "max", "mean"), 0.0
    )
    assert rec.cumulative.out_of_range == 0
    assert HistogramSet().percentiles_ms("service")["max"] == 0.0
    with pytest.raises(ValueError, match="latency, service, lag"):
        rec.cumulative.percentiles_ms("ttft")


def test_window_end_and_dropped_counts() -> None:
    rec = Recorder(start_t=0.0, window_end_t=1.0)
    rec.record(0.1, 0.1, 0.9, None)
    rec.record(0.2, 0.2, 1.0, "timeout")
    rec.record(0.3, 0.3, 1.2, None)
    rec.record_dropped(0.4)
    rec.record_dropped(0.5)
    rec.finish(1.5)
    assert rec.cumulative.completed_in_window == 2
    assert rec.cumulative.dropped == 2
    assert rec.cumulative.sent == 3


def test_finish_without_samples_closes_the_partial_interval_once() -> None:
    rec = Recorder(start_t=0.0)
    rec.close_interval(1.0)
    rec.finish(1.0)
    assert len(rec.intervals) == 1
    rec.finish(1.4)
    assert len(rec.intervals) == 1
    late = Recorder(start_t=0.0)
    late.finish(0.5)
    assert [(i.start_t, i.end_t) for i in late.intervals] == [(0.0, 0.5)]


def test_flush_takes_only_complete_samples() -> None:
    rec = Recorder(start_t=0.0)
    rec.record(0.0, 0.0, 0.001, None)
    rec.flush()
    rec.record(0.0, 0.0, 0.002, None)
    rec.finish(1.0)
    assert rec.cumulative.latency.get_total_count() == 2


# the package surface


def test_exports_match_all() -> None:
    assert sorted(loadgen.recorder.__all__) == sorted(
        [
            "HistogramSet",
            "Interval",
            "Recorder",
            "new_histogram",
            "record_many",
            "LOWEST_US",
            "HIGHEST_US",
            "SIGNIFICANT_DIGITS",
            "sum_histograms",
        ]
    )


def test_sum_histograms_equals_hdrh_add() -> None:
    rng = np.random.default_rng(7)
    parts = [new_histogram() for _ in range(4)]
    for part in parts[1:]:  # the first stays empty
        record_many(part, spread_values(rng, 500))
    expected = new_histogram()
    for part in parts[1:]:
        expected.add(part)
    reused = new_histogram()
    record_many(reused, np.array([5]))  # emptied first
    for total in (_hdr.sum_histograms(parts), _hdr.sum_histograms(parts, into=reused)):
        assert np.array_equal(counts_view(total), counts_view(expected))
        assert total.get_total_count() == expected.get_total_count()
        assert (total.get_min_value(), total.get_max_value()) == (expected.get_min_value(), expected.get_max_value())
    assert _hdr.sum_histograms([]).get_total_count() == 0
    for name in loadgen.recorder.__all__:
        assert getattr(loadgen.recorder, name) is not None


@pytest.mark.parametrize("module", [_hdr, _figures, _recorder])
def test_docstring_examples(module: object) -> None:
    assert doctest.testmod(module).failed == 0
