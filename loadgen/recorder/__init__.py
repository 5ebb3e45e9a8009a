"""HDR recording of request outcomes: per-interval and cumulative histograms that merge exactly.

Place in the flow: Outcome -> **Recorder** -> sinks. The measurement rules (what latency, service and
lag measure, what counts as dropped or out of range) are written once, in `_recorder.py`.
"""

from loadgen.recorder._figures import HistogramSet, Interval
from loadgen.recorder._hdr import (
    HIGHEST_US,
    LOWEST_US,
    SIGNIFICANT_DIGITS,
    new_histogram,
    record_many,
    sum_histograms,
)
from loadgen.recorder._recorder import Recorder

__all__ = [
    "HIGHEST_US",
    "LOWEST_US",
    "SIGNIFICANT_DIGITS",
    "HistogramSet",
    "Interval",
    "Recorder",
    "new_histogram",
    "record_many",
    "sum_histograms",
]
