"""A worker that connects while a distributed run goes takes a share of the rest of it (open loop) or of
the users (closed loop).

Real processes on 127.0.0.1: a master expecting one worker, that worker, and a second one started once
the run is under way. When the second is ready, the master reshuffles what is left of the schedule from
an instant a little ahead: the first worker's share 0/1 ends there, and shares 0/2 and 1/2 take over.
Every arrival of the schedule must then be sent exactly once, the server's count must equal the
output's, and the rate asked for must be kept across the join.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from subprocess import Popen

import pytest

from loadgen.sinks.hlog import read_hlog
from tests.support.distributed import (
    Master,
    requests_of,
    shipped,
    sleep_until_epoch,
    start_worker,
    worker_entry,
)
from tests.support.processes import RARE_HANG, stop_process

pytestmark = pytest.mark.integration

RATE = 200
DURATION_S = 8
SLOT_TOLERANCE = 0.10
"""Each 1 s interval of the merged output holds RATE completions within 10 %: a response belongs to the
interval open when it is recorded, so a few move across a boundary whenever the host is late to close
one. A share lost or sent twice across the join would be off by half the rate, or all of it."""


def _join_two_seconds_in(master: Master, debug: Path, duration_s: float) -> tuple[Popen, Popen, str]:
    """One worker from the start, a second started two seconds into the run (it connects and warms up
    while the run goes); the run to its end. Returns both workers and the master's line on the join."""
    first = start_worker(master.port, debug)
    second = None
    try:
        sleep_until_epoch(master.wait_for_start(1) + 2.0)
        second = start_worker(master.port, debug)
        joined = master.wait_for("master: worker 1 joined", timeout=duration_s)
        code, stderr = master.finish()
    finally:
        for worker in (first, second):
            if worker is not None:
                stop_process(worker)
    assert code == 0, stderr
    return first, second, joined


@RARE_HANG
def test_a_worker_joining_mid_run_takes_half_of_the_rest_of_the_schedule(calibration_server, tmp_path) -> None:
    server = calibration_server("--delay-ms", "5")
    debug = tmp_path / "shipped"
    master = Master(["--target", server.url, "--model", "m", "--rate", str(RATE), "--duration", f"{DURATION_S}s"],
                    tmp_path / "run", workers=1)
    first, second, joined = _join_two_seconds_in(master, debug, DURATION_S)
    from_s = float(re.search(r"from (\d+\.\d+) s is reshuffled", joined).group(1))
    assert 2.5 < from_s < DURATION_S, joined
    summary = master.summary

    # every arrival of the schedule was sent once: none twice (both sending it), none by nobody
    scheduled = RATE * DURATION_S
    assert summary["requests"] == summary["ok"] == scheduled
    assert summary["sent"] + summary["dropped"] + summary["unsent"] == scheduled
    assert summary["dropped"] == summary["unsent"] == 0
    assert server.info()["requests"] == summary["requests"] + summary["warmup_requests"]

    one, two = worker_entry(summary, first.pid), worker_entry(summary, second.pid)
    assert one["share"][0].startswith("0/1 until ") and one["share"][1].startswith("0/2 from "), one["share"]
    assert len(two["share"]) == 1 and two["share"][0].startswith("1/2 from "), two["share"]
    assert one["requests"] + two["requests"] == scheduled
    assert one["requests"] == requests_of(shipped(debug, first.pid))
    assert two["requests"] == requests_of(shipped(debug, second.pid))
    # the joiner sent the odd arrivals from the join on (the printed instant is rounded: +-1)
    first_after = math.ceil(from_s * RATE)
    odd_after = sum(1 for i in range(first_after, scheduled) if i % 2 == 1)
    assert abs(two["requests"] - odd_after) <= 1, (two, odd_after)

    # both sent load after the join
    after = math.ceil(from_s) + 1  # the first whole interval after the join
    for pid in (first.pid, second.pid):
        late = [m for m in shipped(debug, pid) if m["start_s"] >= after - 1e-6]
        assert requests_of(late) > 0 or after >= DURATION_S, pid

    # the rate asked for was kept across the join: every whole second holds RATE completions
    counts = [h.get_total_count() for h in read_hlog(tmp_path / "run" / "latency.hlog")[None]][:DURATION_S]
    assert len(counts) == DURATION_S
    for k, count in enumerate(counts):
        assert abs(count - RATE) <= SLOT_TOLERANCE * RATE, (k, counts, from_s)
    around = counts[max(0, math.floor(from_s) - 1): math.floor(from_s) + 2]
    assert abs(sum(around) - RATE * len(around)) <= 0.02 * RATE * len(around), (counts, from_s)


@pytest.mark.timing  # judged against the host's clock: not beside another test
def test_a_worker_joining_a_closed_loop_run_takes_half_of_the_users(calibration_server, tmp_path) -> None:
    """Closed loop: from the join the first worker lets 2 of its 4 users go (each after its answer) and
    the joiner starts 2; the user count, and so the throughput users / latency, is kept every second."""
    users, duration_s = 4, 8
    server = calibration_server("--delay-ms", "20")
    debug = tmp_path / "shipped"
    master = Master(["--target", server.url, "--model", "m", "--users", str(users), "--think", "none",
                     "--duration", f"{duration_s}s"], tmp_path / "run", workers=1)
    first, second, joined = _join_two_seconds_in(master, debug, duration_s)
    assert "the users are spread again (0: 2 users, 1: 2 users)" in joined, joined
    from_s = float(re.search(r"from (\d+\.\d+) s the users", joined).group(1))
    assert 2.5 < from_s < duration_s, joined
    summary = master.summary
    assert summary["errors"] == {}
    one, two = worker_entry(summary, first.pid), worker_entry(summary, second.pid)
    assert one["requests"] + two["requests"] == summary["requests"]
    assert two["requests"] == requests_of(shipped(debug, second.pid)) > 0
    assert server.info()["requests"] == summary["requests"] + summary["warmup_requests"]
    after = math.ceil(from_s) + 1
    for pid in (first.pid, second.pid):  # both sent load after the join
        assert requests_of([m for m in shipped(debug, pid) if m["start_s"] >= after - 1e-6]) > 0, pid

    # `users` in flight all along: each whole second holds users / latency completions (a user cut
    # off, or started twice, would move a second's count by a quarter or more)
    expected = users / (summary["latency_ms"]["mean"] / 1000)
    counts = [h.get_total_count() for h in read_hlog(tmp_path / "run" / "latency.hlog")[None]][:duration_s]
    assert len(counts) == duration_s
    for k, count in enumerate(counts):
        assert abs(count - expected) <= SLOT_TOLERANCE * expected, (k, counts, expected, from_s)
