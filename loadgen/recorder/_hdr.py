"""Vectorised HDR histogram arithmetic: record a whole batch of values, read percentiles and the mean.

Place in the flow: Outcome -> Recorder (buffers samples) -> **here** (batches into hdrh histograms)
-> sinks. hdrh's `record_value` costs a few microseconds of pure Python per value; at 10,000 requests/s
that is too much for the generator's core. `record_many` computes hdrh's counts index for a whole numpy
array with the same integer arithmetic (`_get_bucket_index`, `_get_sub_bucket_index`, `_counts_index`
in hdrh/histogram.py) and adds into the histogram's own counts array, so the result is the histogram
hdrh would have built value by value (tests/test_recorder.py proves it).

Range: hdrh records 0 exactly (its slot 0) and anything up to `highest_trackable_value`. LOWEST_US is
the histogram's lowest *discernible* value (its constructor argument), not a floor: a request sent on
time has a lag of 0 us, which is a true measurement, not an out-of-range one. Values below 0 or above
HIGHEST_US are clamped to the nearest edge, recorded, and counted by the caller as out of range.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import numpy as np
from hdrh.histogram import HdrHistogram

LOWEST_US = 1
"""Lowest discernible value (microseconds) given to every histogram."""
HIGHEST_US = 3_600_000_000
"""Highest trackable value: one hour, in microseconds."""
SIGNIFICANT_DIGITS = 3
"""Value precision: quantisation no coarser than 0.1 % of the value."""


def new_histogram() -> HdrHistogram:
    """Return an empty histogram with the project's range and precision.

    >>> new_histogram().get_total_count()
    0
    """
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def counts_view(hist: HdrHistogram) -> np.ndarray:
    """A writable uint64 numpy view (no copy) of the histogram's ctypes counts array."""
    return np.ctypeslib.as_array(hist.counts)


def _bit_length(values: np.ndarray) -> np.ndarray:
    # frexp(x) = (m, e) with x = m * 2**e and 0.5 <= m < 1, so e is the bit length of x; exact for
    # integers below 2**53 (every int64 up to there converts to float64 without rounding).
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _bucket_indices(hist: HdrHistogram, values: np.ndarray) -> np.ndarray:
    # hdrh: pow2ceiling = 64 - clz(value | sub_bucket_mask), i.e. the bit length.
    pow2ceiling = _bit_length(values | hist.sub_bucket_mask)
    return pow2ceiling - hist.unit_magnitude - (hist.sub_bucket_half_count_magnitude + 1)


def counts_indices(hist: HdrHistogram, values: np.ndarray) -> np.ndarray:
    """hdrh's `_counts_index_for` for every value of an int64 array (values in 0 .. 2**53)."""
    bucket = _bucket_indices(hist, values)
    sub_bucket = values >> (bucket + hist.unit_magnitude)
    base = (bucket + 1) << hist.sub_bucket_half_count_magnitude
    return base + (sub_bucket - hist.sub_bucket_half_count)


def record_many(hist: HdrHistogram, values_us: np.ndarray) -> int:
    """Record every value of an integer array into `hist`; return how many had to be clamped.

    Values below 0 become 0 and values above the histogram's highest trackable value become that
    value; they are recorded, never dropped.

    >>> h = new_histogram()
    >>> record_many(h, np.array([250, 1_000, -3]))
    1
    >>> h.get_total_count(), h.get_max_value()
    (3, 1000)
    """
    values = np.asarray(values_us, dtype=np.int64)
    if values.size == 0:
        return 0
    clamped = np.clip(values, 0, hist.highest_trackable_value)
    out_of_range = int(np.count_nonzero(clamped != values))
    indices = counts_indices(hist, clamped)
    # bincount + one add is ~30x faster than np.add.at for batches of thousands of values; the
    # bincount only reaches the largest index, so only that prefix of the counts is touched.
    added = np.bincount(indices)
    counts_view(hist)[: added.size] += added.astype(np.uint64)
    hist.total_count += int(values.size)
    hist.min_value = min(hist.min_value, int(clamped.min()))
    hist.max_value = max(hist.max_value, int(clamped.max()))
    return out_of_range


def sum_histograms(histograms: Sequence[HdrHistogram], into: HdrHistogram | None = None) -> HdrHistogram:
    """The bucket-by-bucket sum of `histograms` (all of new_histogram()'s shape), in `into` or a new one.

    Exact, like hdrh's add(), and cheaper: one numpy add per histogram. `into` is emptied first;
    passing one saves creating a histogram (~0.4 ms, the cost of hdrh's constructor).

    >>> a, b = new_histogram(), new_histogram()
    >>> _ = record_many(a, np.array([100, 200])), record_many(b, np.array([300]))
    >>> total = sum_histograms([a, b])
    >>> total.get_total_count(), total.get_min_value(), total.get_max_value()
    (3, 100, 300)
    """
    total = new_histogram() if into is None else into
    counts = counts_view(total)
    counts[:] = 0
    filled = [hist for hist in histograms if hist.get_total_count()]
    for hist in filled:
        counts += counts_view(hist)
    total.total_count = sum(hist.get_total_count() for hist in filled)
    total.min_value = min((hist.get_min_value() for hist in filled), default=sys.maxsize)
    total.max_value = max((hist.get_max_value() for hist in filled), default=0)
    return total


def values_at_percentiles(hist: HdrHistogram, percentiles: Iterable[float]) -> list[int]:
    """hdrh's `get_value_at_percentile` for several percentiles, in one numpy pass; [] when empty.

    >>> h = new_histogram()
    >>> _ = record_many(h, np.arange(1, 1001))
    >>> values_at_percentiles(h, [50.0, 100.0])
    [500, 1000]
    """
    total = hist.get_total_count()
    if total == 0:
        return []
    cumulative = np.cumsum(counts_view(hist))
    values = []
    for percentile in percentiles:
        # Same float expression as hdrh's get_target_count_at_percentile, so ties resolve alike.
        target = max(int((min(percentile, 100.0) * total / 100) + 0.5), 1)
        # A numpy scalar target: with a Python int, searchsorted converts the whole array first (8x slower).
        index = int(np.searchsorted(cumulative, np.uint64(target), side="left"))
        value = hist.get_value_from_index(index)
        if percentile:
            values.append(hist.get_highest_equivalent_value(value))
        else:
            values.append(hist.get_lowest_equivalent_value(value))
    return values


def mean_value(hist: HdrHistogram) -> float:
    """hdrh's `get_mean_value` (each count at the middle of its bucket), computed with numpy."""
    if hist.get_total_count() == 0:
        return 0.0
    counts = counts_view(hist)
    indices = np.flatnonzero(counts).astype(np.int64)
    lowest = _values_from_indices(hist, indices)
    bucket = _bucket_indices(hist, lowest)
    sub_bucket = lowest >> (bucket + hist.unit_magnitude)
    bucket = bucket + (sub_bucket >= hist.sub_bucket_count)
    middles = lowest + ((np.int64(1) << (hist.unit_magnitude + bucket)) >> 1)
    weighted = np.dot(counts[indices].astype(np.float64), middles.astype(np.float64))
    return float(weighted) / hist.get_total_count()


def _values_from_indices(hist: HdrHistogram, indices: np.ndarray) -> np.ndarray:
    # hdrh's get_value_from_index, vectorised.
    bucket = (indices >> hist.sub_bucket_half_count_magnitude) - 1
    sub_bucket = (indices & (hist.sub_bucket_half_count - 1)) + hist.sub_bucket_half_count
    first = bucket < 0
    sub_bucket = np.where(first, sub_bucket - hist.sub_bucket_half_count, sub_bucket)
    bucket = np.where(first, 0, bucket)
    return sub_bucket << (bucket + hist.unit_magnitude)
