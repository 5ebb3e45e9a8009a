"""Recorder cost per request, side by side with hdrh's own record_value (the peer).

Place in the flow: measures the Recorder stage of DESIGN.md's budget (the generator's core sends up
to ~10,000 requests/s; every microsecond spent recording comes out of that). Prints ns per request
for record() alone, for record() plus the amortised flush, and for hdrh record_value on the same
samples, then the ratio.

    .venv/bin/python bench/recorder_cost.py [requests] [flush_every] [models]

With `models` (a mix of that many entries, [[mix]]), each batch is closed as an interval instead of
flushed (a mix sums its totals when an interval closes), once without a mix and once with the requests
recorded round-robin into the entries' parts, so the two lines compare the same work.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from loadgen.recorder import Recorder, new_histogram

Sample = tuple[float, float, float, str | None]


def make_samples(count: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    intended = np.cumsum(rng.exponential(1e-4, count))
    sent = intended + rng.exponential(5e-5, count)
    done = sent + rng.lognormal(np.log(0.005), 0.5, count)
    kinds = [None if k % 100 else "http_503" for k in range(count)]
    return [(float(i), float(s), float(d), e) for i, s, d, e in zip(intended, sent, done, kinds, strict=True)]


def time_recorder(samples: list[Sample], flush_every: int, models: int | None = None) -> tuple[float, float]:
    """Seconds spent in record() calls, and in record() plus every flush (finish included). With `models`,
    every batch closes an interval, and with models > 0 the requests go round-robin to the entries' parts."""
    rec = Recorder(start_t=0.0, models=[f"m{i}" for i in range(models or 0)])
    records = [part.record for part in rec.parts] or [rec.record]
    count = len(records)
    recording = flushing = 0.0
    for first in range(0, len(samples), flush_every):
        batch = samples[first : first + flush_every]
        started = time.perf_counter()
        if count == 1:
            record = records[0]
            for intended_t, sent_t, done_t, error in batch:
                record(intended_t, sent_t, done_t, error)
        else:
            for k, (intended_t, sent_t, done_t, error) in enumerate(batch):
                records[k % count](intended_t, sent_t, done_t, error)
        flushed = time.perf_counter()
        if models is None:
            rec.flush()
        else:
            rec.close_interval(batch[-1][2])
        recording += flushed - started
        flushing += time.perf_counter() - flushed
    started = time.perf_counter()
    rec.finish(samples[-1][2] + 1.0)
    flushing += time.perf_counter() - started
    return recording, recording + flushing


def time_hdrh(samples: list[Sample]) -> float:
    latency, service, lag = new_histogram(), new_histogram(), new_histogram()
    started = time.perf_counter()
    for intended_t, sent_t, done_t, error in samples:
        if error is None:
            latency.record_value(round((done_t - intended_t) * 1e6))
            service.record_value(round((done_t - sent_t) * 1e6))
        lag.record_value(round((sent_t - intended_t) * 1e6))
    return time.perf_counter() - started


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    flush_every = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    models = int(sys.argv[3]) if len(sys.argv) > 3 else None
    samples = make_samples(count)
    per = 1e9 / count
    if models is not None:
        print(f"{count} requests, an interval closed every {flush_every}")
        for entries in (0, models):
            recording, total = min(time_recorder(samples, flush_every, entries) for _ in range(5))
            label = f"mix of {entries}" if entries else "no mix"
            print(f"{label:<10} record() {recording * per:5.0f} ns/request, with the closes {total * per:5.0f} ns/request")
        return
    recording, total = min(time_recorder(samples, flush_every) for _ in range(5))
    peer = min(time_hdrh(samples) for _ in range(3))
    print(f"{count} requests, flush every {flush_every}")
    print(f"record() alone            {recording * per:7.0f} ns/request")
    print(f"record() + amortised flush {total * per:6.0f} ns/request")
    print(f"hdrh record_value (peer)  {peer * per:7.0f} ns/request")
    print(f"ratio peer / recorder     {peer / total:7.1f}x")


if __name__ == "__main__":
    main()
