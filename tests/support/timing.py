"""Judging measured times against the truth.

`truth_percentiles` gives the percentiles of the true latencies of a run (computed from a server's
timing model), as loadgen reports them; `within` compares a figure with its truth.
"""

from __future__ import annotations

import numpy as np
import pytest

TIMING = pytest.mark.flaky(reruns=2, reruns_delay=1)
"""For tests that compare measured times with the truth to a millisecond or less. These VMs lose a
core to the host for 1-3 ms a few times a second, in bursts; such a burst can push one run's tail
past the tolerance whatever the code does. A rerun (fresh processes) stands in for a quieter
machine; a systematic error still fails every run."""


def within(measured: float, truth: float, rel: float, floor_ms: float = 0.0) -> bool:
    return abs(measured - truth) <= max(floor_ms, rel * truth)


def truth_percentiles(latencies_ms: np.ndarray) -> dict[str, float]:
    points = {"p90": 90.0, "p99": 99.0, "p99_9": 99.9}
    return {k: float(np.percentile(latencies_ms, q, method="inverted_cdf")) for k, q in points.items()}
