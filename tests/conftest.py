"""Shared fixtures: real servers on 127.0.0.1 (port 0), and `loadgen` run as a real process.

The generator runs in its own process in every integration test: importing locust monkey-patches
the interpreter with gevent, which the test process must not be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent

TIMING = pytest.mark.flaky(reruns=2, reruns_delay=1)
"""For tests that compare measured times with the truth to a millisecond or less. These VMs lose a
core to the host for 1-3 ms a few times a second, in bursts; such a burst can push one run's tail
past the tolerance whatever the code does. A rerun (fresh processes) stands in for a quieter
machine; a systematic error still fails every run."""
_CPUS = sorted(os.sched_getaffinity(0))


def pin(pid: int, index: int) -> None:
    """Keep a child on one core: the generator on the first, servers on the second.

    As in a real deployment, the server must not run on the generator's core: a server process
    sharing it reads each request late by whatever the generator was doing, and reports a later
    arrival than the true one (DESIGN.md: timing traps).
    """
    if len(_CPUS) >= 2:
        os.sched_setaffinity(pid, {_CPUS[index]})


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    fronts: dict[str, str] = field(default_factory=dict)
    """Other front ends the server announced before its http line: {"grpc": "HOST:PORT", "metrics": URL}."""

    def info(self) -> dict:
        return httpx.get(self.url + "/calibration", timeout=5).json()


def start_server(args: list[str], timeout: float = 20.0, module: str = "servers.calibration",
                 port_flag: str = "--port") -> Server:
    """`python -m MODULE PORT_FLAG 0 ARGS` pinned to the server core; waits for its `listening on` line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, port_flag, "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    pin(proc.pid, 1)
    deadline = time.monotonic() + timeout
    fronts: dict[str, str] = {}
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("listening on "):
            return Server(proc, line.split()[-1].strip(), fronts)
        if " listening on " in line:
            fronts[line.split()[0]] = line.split()[-1].strip()
        if not line and proc.poll() is not None:
            break
    stop_process(proc)
    raise RuntimeError(f"{module} did not start: {proc.stderr.read()}")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def calibration_server() -> Iterator:
    """Factory: calibration_server("--delay-ms", "20") -> Server, stopped after the test."""
    started: list[Server] = []

    def factory(*args: str) -> Server:
        server = start_server(list(args))
        started.append(server)
        return server

    yield factory
    for server in started:
        stop_process(server.proc)


@pytest.fixture(scope="module")
def triton_server() -> Iterator[Server]:
    """One Triton-compatible server (servers.triton, built-in models) shared by a test module."""
    server = start_server([], module="servers.triton", port_flag="--http-port")
    yield server
    stop_process(server.proc)


@dataclass
class LoadgenRun:
    returncode: int
    stdout: str
    stderr: str
    out: Path

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())


@pytest.fixture(scope="session")
def digits_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository written by `python -m servers.models.make_repo --no-minilm` (built-in and digits
    models, with _data/ test split and labels), once per session: the training takes seconds. The MiniLM
    models (260 MB, tests/test_minilm_models.py) are left out."""
    path = tmp_path_factory.mktemp("digits_repository")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONHASHSEED"}  # the command fixes it
    run = subprocess.run([sys.executable, "-m", "servers.models.make_repo", str(path), "--no-minilm"],
                         cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    return path


def loadgen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "loadgen", *args]


def run_loadgen(*args: str, out: Path, timeout: float = 120.0, verb: str = "run") -> LoadgenRun:
    """`loadgen VERB ARGS --out OUT` in a child process on the generator core; returns its exit code,
    output and folder."""
    proc = subprocess.Popen(
        loadgen_cmd(verb, *args, "--out", str(out)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    pin(proc.pid, 0)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return LoadgenRun(proc.returncode, stdout, stderr, out)
