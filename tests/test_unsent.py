"""Every arrival of an open-loop run window ends in exactly one count: sent, dropped or unsent.

A host stall longer than the run's backstop (1 s past the window's end) leaves the dispatcher behind
its schedule when the run ends; the arrivals it had not reached are counted as `unsent`. The stall here
is a real one: the generator process (or one worker) is stopped with SIGSTOP and resumed with SIGCONT
after the window has ended, and the counts must still add up to the schedule exactly.

The first tests drive the Dispatcher itself on this process's gevent hub (no Locust, no monkey
patching): the stall is a blocking time.sleep that holds the whole loop, as a stopped host would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import gevent
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from loadgen.driver.dispatcher import Dispatcher
from loadgen.outcome import Outcome
from loadgen.patterns.schedule import schedule, schedule_offsets
from loadgen.recorder import Recorder
from loadgen.scenario import OpenLoop
from loadgen.sinks.prometheus import RunCollector
from tests.support.distributed import Master, sleep_until_epoch, start_worker
from tests.support.processes import ROOT, loadgen_cmd, pin, stop_process

_block = time.sleep  # not patched: gevent is used here without monkey patching


class _Counts:
    """What a dispatcher handed out: intended times sent and dropped, and the unsent count."""

    def __init__(self) -> None:
        self.sent: list[float] = []
        self.dropped: list[float] = []
        self.unsent = 0

    def dispatcher(self, max_in_flight: int = 1000) -> Dispatcher:
        def send(intended_t: float) -> Outcome:
            self.sent.append(intended_t)
            now = time.monotonic()
            return Outcome(intended_t, now, now)

        return Dispatcher(send, lambda outcome: None, self.dropped.append, max_in_flight,
                          on_unsent=self._unsent)

    def _unsent(self, count: int) -> None:
        self.unsent += count


def test_a_stall_that_outlasts_the_run_leaves_its_arrivals_counted_as_unsent() -> None:
    """200 arrivals/s for 1 s; the loop is held from 0.3 s to 1.5 s, then the run's end stops the
    dispatcher before it can catch up: every arrival due by the stop is sent or unsent, none lost."""
    pattern = OpenLoop(arrival="poisson", rate=200, duration=1.0, seed=7)
    offsets = schedule_offsets(pattern)
    counts = _Counts()
    dispatcher = counts.dispatcher()
    start_t = time.monotonic() + 0.05

    def stall_then_end() -> None:
        gevent.sleep(max(0.0, start_t + 0.3 - time.monotonic()))
        _block(1.2)  # the whole process stops, as under SIGSTOP
        dispatcher.stop()  # the backstop fires first when the loop resumes

    stopper = gevent.spawn(stall_then_end)
    dispatcher.run(start_t, schedule(pattern))
    stopper.join()
    assert counts.dropped == []
    assert len(counts.sent) + counts.unsent == len(offsets)
    assert dispatcher.unsent == counts.unsent
    # what was sent is the schedule's beginning, in order; the rest (due by the stop) is unsent
    assert counts.sent == (start_t + offsets[: len(counts.sent)]).tolist()
    assert counts.unsent >= np.count_nonzero(offsets > 0.31)


def test_arrivals_not_yet_due_when_a_run_is_stopped_are_not_unsent() -> None:
    """A stop on time (Ctrl-C) while the dispatcher keeps its schedule leaves nothing unsent: the
    arrivals after the stop instant were never due."""
    pattern = OpenLoop(rate=100, duration=2.0)
    counts = _Counts()
    dispatcher = counts.dispatcher()
    start_t = time.monotonic() + 0.05
    stopped: list[float] = []

    def stop() -> None:  # whenever the hub runs it (late on a busy host): the instant is read here
        stopped.append(time.monotonic())
        dispatcher.stop(stopped[0])

    gevent.spawn_later(0.05 + 0.505, stop)  # on the loop's clock, which may lag the real one a little
    dispatcher.run(start_t, schedule(pattern))
    due = int(np.count_nonzero(start_t + schedule_offsets(pattern) < stopped[0]))
    assert 40 <= due < 200 and counts.dropped == []  # stopped mid-run
    # what was due by the stop was sent (or, had the loop been held, unsent); nothing after it counts
    assert len(counts.sent) + counts.unsent == due
    assert counts.sent == (start_t + schedule_offsets(pattern)[: len(counts.sent)]).tolist()


def test_a_share_ended_at_an_instant_and_its_successors_send_the_schedule_once() -> None:
    """end_at(T) hands every arrival from T on to other dispatchers: share 0/1 until 0.4 s, then shares
    0/2 and 1/2 from 0.4 s send exactly the schedule, nothing twice, nothing unsent."""
    pattern = OpenLoop(arrival="poisson", rate=300, duration=0.8, seed=3)
    offsets = schedule_offsets(pattern)
    counts = _Counts()
    first = counts.dispatcher()
    start_t = time.monotonic() + 0.05
    first.end_at(start_t + 0.4)
    later = [gevent.spawn(counts.dispatcher().run, start_t, schedule(pattern, share=(k, 2), start_s=0.4))
             for k in range(2)]
    first.run(start_t, schedule(pattern))
    gevent.joinall(later, raise_error=True)
    assert sorted(counts.sent) == (start_t + offsets).tolist()
    assert counts.unsent == 0 and first.unsent == 0


def _stall(pid: int, at_s: float, for_s: float) -> None:
    time.sleep(at_s)
    subprocess.run(["kill", "-STOP", str(pid)], check=True)
    time.sleep(for_s)
    subprocess.run(["kill", "-CONT", str(pid)], check=True)


def assert_every_arrival_counted(summary: dict, scheduled: int) -> None:
    assert summary["sent"] + summary["dropped"] + summary["unsent"] == scheduled, summary
    assert summary["sent"] == summary["requests"] + summary["in_flight_at_end"]


@pytest.mark.timing  # judged against the host's clock: not beside another test
def test_single_process_run_with_a_stalled_host_counts_every_arrival(calibration_server, tmp_path) -> None:
    """`loadgen run` at 200 req/s (poisson) for 3 s, SIGSTOPped 2.2 s into the run for 3 s: the
    window ends while it is stopped, so part of its schedule is never sent, and is counted unsent."""
    server = calibration_server("--delay-ms", "2")
    args = ["--target", server.url, "--model", "m", "--rate", "200", "--arrival", "poisson", "--seed", "5",
            "--duration", "3s"]
    scheduled = len(schedule_offsets(OpenLoop(arrival="poisson", rate=200, duration=3.0, seed=5)))

    # first without a stall: nothing unsent
    calm = _run_with_stall(args, tmp_path / "calm", None)
    assert calm["unsent"] == 0, calm["generator"]
    assert_every_arrival_counted(calm, scheduled)

    stalled = _run_with_stall(args, tmp_path / "stalled", (2.2, 3.0))
    assert_every_arrival_counted(stalled, scheduled)
    assert stalled["unsent"] > 0
    assert stalled["generator_bound"]
    assert any("never sent" in reason for reason in stalled["generator"]["reasons"])
    table = (tmp_path / "stalled" / "table.txt").read_text()
    assert f"{stalled['unsent']} unsent" in table and "GENERATOR-BOUND" in table
    # the server saw every request the summary counts as sent
    assert server.info()["requests"] == calm["sent"] + stalled["sent"] + calm["warmup_requests"] + \
        stalled["warmup_requests"]


def _run_with_stall(args: list[str], out: Path, stall: tuple[float, float] | None) -> dict:
    """`loadgen run ARGS --metrics-port 0`; when `stall` is (at_s, for_s), SIGSTOP it at_s into the run."""
    proc = subprocess.Popen(loadgen_cmd("run", *args, "--metrics-port", "0", "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    pin(proc.pid, 0)
    try:
        lines = []
        while line := proc.stderr.readline():  # printed just before the run starts (50 ms lead)
            lines.append(line)
            if line.startswith("metrics on "):
                break
        assert lines and lines[-1].startswith("metrics on "), "".join(lines)
        if stall is not None:
            _stall(proc.pid, *stall)
        stdout, rest = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, "".join(lines) + rest
    (out / "table.txt").write_text(stdout)
    return json.loads((out / "summary.json").read_text())


@pytest.mark.integration
def test_distributed_run_with_a_stalled_worker_counts_every_arrival(calibration_server, tmp_path) -> None:
    """Two workers, 200 req/s for 3 s; one is SIGSTOPped from 2.2 s to 4.4 s into the run, counted from
    the start epoch the master announces (2.2 s: less than the heartbeats' patience of at least 3 s, so it
    is not lost; resumed 0.4 s after the window's end plus the 1 s grace, so the rest of its share stays
    unsent). Its unsent arrivals reach the master's merge."""
    server = calibration_server("--delay-ms", "2")
    master = Master(["--target", server.url, "--model", "m", "--rate", "200", "--duration", "3s"],
                    tmp_path / "run")
    workers = [start_worker(master.port, tmp_path / "shipped") for _ in range(2)]
    try:
        epoch = master.wait_for_start(2)
        sleep_until_epoch(epoch + 2.2)
        os.kill(workers[1].pid, signal.SIGSTOP)
        stopped_s = time.time() - epoch
        sleep_until_epoch(epoch + 4.4)
        os.kill(workers[1].pid, signal.SIGCONT)
        # the premise: stopped before the window's end, with arrivals of its share still ahead of it
        assert stopped_s < 2.9, f"this process stopped the worker only {stopped_s:.3f} s into a 3 s run"
        code, stderr = master.finish()
    finally:
        for worker in workers:
            stop_process(worker)
    assert code == 0, stderr
    summary = master.summary
    assert_every_arrival_counted(summary, 600)
    assert summary["unsent"] > 0
    entries = {w["pid"]: w for w in summary["distributed"]["workers"]}
    assert entries[workers[0].pid]["unsent"] == 0
    assert entries[workers[1].pid]["unsent"] == summary["unsent"]
    assert summary["generator_bound"] and not summary["distributed"]["lost"]
    assert any("never sent" in reason and "worker" in reason for reason in summary["generator"]["reasons"])
    assert server.info()["requests"] == summary["sent"] + summary["warmup_requests"]


def test_unsent_arrivals_are_exported_to_prometheus() -> None:
    class View:
        in_flight = 0
        metrics_host = "127.0.0.1"

        def __init__(self, recorder: Recorder) -> None:
            self.recorder = recorder

        def offered_rps_now(self) -> float:
            return 0.0

        def worker_health(self) -> None:
            return None

    recorder = Recorder(start_t=10.0)
    recorder.record(10.0, 10.0, 10.001, None)
    recorder.record_unsent(7)
    recorder.finish(11.0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(View(recorder)))
    assert registry.get_sample_value("loadgen_unsent_total") == 7
    assert registry.get_sample_value("loadgen_dropped_total") == 0
