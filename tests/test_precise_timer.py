"""Tests of loadgen/lowlevel/precise_timer.py: order, cancellation, and no early firing."""

from __future__ import annotations

import asyncio
import time

from loadgen.lowlevel.precise_timer import PreciseScheduler


async def _run_schedule(offsets_s: list[float], cancel: set[int]) -> list[tuple[int, float, float]]:
    """Schedule one call per offset from now; returns (index, deadline, fired_t) in firing order."""
    loop = asyncio.get_running_loop()
    scheduler = PreciseScheduler(loop)
    fired: list[tuple[int, float, float]] = []
    done = asyncio.Event()
    start = time.monotonic()
    expected = len(offsets_s) - len(cancel)

    def record(index: int, deadline: float) -> None:
        fired.append((index, deadline, time.monotonic()))
        if len(fired) == expected:
            done.set()

    for index, offset in enumerate(offsets_s):
        call = scheduler.call_at(start + offset, record, index, start + offset)
        if index in cancel:
            call.cancel()
    try:
        await asyncio.wait_for(done.wait(), timeout=2.0)
    finally:
        scheduler.close()
    return fired


def test_calls_run_in_deadline_order_and_never_early() -> None:
    fired = asyncio.run(_run_schedule([0.012, 0.004, 0.008, 0.004, -1.0], cancel=set()))
    assert [index for index, _, _ in fired] == [4, 1, 3, 2, 0]
    assert all(fired_t >= deadline for _, deadline, fired_t in fired)
    # Loose bound: the point is sub-millisecond wake-ups, but CI machines are shared.
    assert max(fired_t - deadline for _, deadline, fired_t in fired[1:]) < 0.005


def test_cancelled_call_does_not_run() -> None:
    fired = asyncio.run(_run_schedule([0.002, 0.003, 0.004], cancel={1}))
    assert [index for index, _, _ in fired] == [0, 2]
