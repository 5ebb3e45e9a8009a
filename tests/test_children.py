"""The processes a run starts end with it, however it ends (loadgen/lowlevel/children.py): the local
workers of `loadgen run --processes 2` and the master's keep-awake spinners when the master is SIGKILLed
mid-run, or SIGTERMed while it waits for its workers or while they are set up; the demo's server when
the demo is SIGKILLed.

Orphans are re-parented away from this test session, out of sight of conftest's leak check: each test
notes the pids of its loadgen's descendants itself, and kills those still running at its end.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.processes import ROOT, loadgen_cmd, pin

pytestmark = pytest.mark.integration

GONE_WITHIN_S = 3.0


class Watched:
    """A loadgen command in a child process, its output read line by line in a thread."""

    def __init__(self, *args: str, cwd: Path = ROOT) -> None:
        self.proc = subprocess.Popen(loadgen_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        pin(self.proc.pid, 0)
        self.lines: queue.Queue[str] = queue.Queue()
        self.said: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.seen: dict[int, psutil.Process] = {}

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 40.0) -> None:
        """Until a line of output holds `text` (noting the descendants meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.note_descendants()
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.said.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} within {timeout:g} s; said: {''.join(self.said)[-3000:]}")

    def note_descendants(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in found:
            self.seen.setdefault(child.pid, child)
        return found

    def running(self) -> list[psutil.Process]:
        """The noted descendants still running (a zombie has ended)."""
        alive = []
        for child in self.seen.values():
            try:
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
            except psutil.NoSuchProcess:
                pass
        return alive

    def assert_all_end(self, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while (alive := self.running()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]

    def end(self) -> None:
        for child in self.running():
            child.kill()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def watch() -> Iterator:
    started: list[Watched] = []

    def start(*args: str, cwd: Path = ROOT) -> Watched:
        started.append(Watched(*args, cwd=cwd))
        return started[-1]

    yield start
    for watched in started:
        watched.end()


def _workers(watched: Watched) -> list[psutil.Process]:
    return [p for p in watched.note_descendants() if "worker" in p.cmdline()]


def test_local_workers_and_spinners_end_when_the_master_is_killed_mid_run(calibration_server, watch,
                                                                          tmp_path: Path) -> None:
    """Without PR_SET_PDEATHSIG a worker outlives a SIGKILLed master by Locust's heartbeat timeout (60 s)."""
    server = calibration_server()
    run = watch("run", "--target", server.url, "--model", "m", "--rate", "20", "--duration", "30s",
                "--processes", "2", "--out", str(tmp_path / "out"))
    run.wait_for("master: run on 2 worker(s)")
    assert len(_workers(run)) == 2
    run.proc.kill()
    run.proc.wait(5)
    run.assert_all_end(GONE_WITHIN_S)


def test_local_workers_end_when_the_master_is_stopped_while_it_waits_for_them(calibration_server, watch,
                                                                              tmp_path: Path) -> None:
    """SIGTERM as soon as both workers are started (they are still importing, not yet connected): the
    master exits 2 and takes them with it, where it used to wait 10 s for each worker's exit."""
    server = calibration_server()
    run = watch("run", "--target", server.url, "--model", "m", "--rate", "20", "--duration", "30s",
                "--processes", "2", "--no-keep-awake", "--out", str(tmp_path / "out"))
    run.wait_for("master: waiting for workers")  # said once both are started and its handlers are in place
    assert len(_workers(run)) == 2
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(GONE_WITHIN_S + 2) == 2
    run.assert_all_end(GONE_WITHIN_S)


def test_local_workers_end_when_the_master_is_stopped_while_they_are_set_up(watch, tmp_path: Path) -> None:
    """The workers' target check hangs on a server that accepts connections and never answers: SIGTERM
    then stops the master's set-up (exit 2), and the workers end with it."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:  # connects, never answers
        port = silent.getsockname()[1]
        run = watch("run", "--target", f"http://127.0.0.1:{port}", "--model", "m", "--rate", "20",
                    "--duration", "30s", "--connect-timeout", "20s", "--processes", "2", "--no-keep-awake",
                    "--out", str(tmp_path / "out"))
        run.wait_for("master: 2 workers connected")
        silent.settimeout(20)
        checks = [silent.accept()[0] for _ in range(2)]  # each worker's target check: the master is in set-up
        try:
            run.proc.send_signal(signal.SIGTERM)
            assert run.proc.wait(GONE_WITHIN_S + 10) == 2
            run.assert_all_end(GONE_WITHIN_S)
        finally:
            for check in checks:
                check.close()


def test_the_demo_server_ends_when_the_demo_is_killed(watch, tmp_path: Path) -> None:
    demo = watch("demo", "--duration", "30s", "--rate", "20", cwd=tmp_path)  # it writes runs/ where it runs
    demo.wait_for("demo: Triton-compatible server at")
    servers = [p for p in demo.note_descendants() if "servers.triton" in p.cmdline()]
    assert len(servers) == 1
    demo.proc.kill()
    demo.proc.wait(5)
    demo.assert_all_end(GONE_WITHIN_S)
