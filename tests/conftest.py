"""Fixtures shared by the test modules; the helpers behind them live in tests/support."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import perf_analyzer as _perf_analyzer
from tests.support.processes import ROOT, Server, start_server, stop_process
from tests.support.timing import HostNoise, NoiseProbes
from tests.support.torchserve import build_store


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


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TorchServe captures' model store, one per test session (built on first use)."""
    store = tmp_path_factory.getbasetemp() / "torchserve-store"
    if not (store / "slow.mar").is_file():
        build_store(store)
    return store


@pytest.fixture(scope="session")
def digits_repositories(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    """Two model repositories written by `python -m servers.models.make_repo --no-minilm` (built-in and
    digits models, with _data/ test split and labels), both at once, once per session: the training takes
    seconds, on one thread each. The first from an interpreter without a hash seed, the second with
    PYTHONHASHSEED=1 (the command fixes its own): tests/test_digits_models.py compares their bytes. The
    MiniLM models (260 MB, tests/test_minilm_models.py) are left out. Each comes with what the command
    printed."""
    paths = (tmp_path_factory.mktemp("digits_repository"), tmp_path_factory.mktemp("digits_b"))
    unseeded = {key: value for key, value in os.environ.items() if key != "PYTHONHASHSEED"}
    runs = [subprocess.Popen([sys.executable, "-m", "servers.models.make_repo", str(path), "--no-minilm"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for path, env in zip(paths, (unseeded, {**os.environ, "PYTHONHASHSEED": "1"}))]
    written = []
    for path, run in zip(paths, runs):
        try:
            out, err = run.communicate(timeout=300)
        finally:
            stop_process(run)
        assert run.returncode == 0, err
        written.append((path, out))
    return written


@pytest.fixture(scope="session")
def digits_repository(digits_repositories: list[tuple[Path, str]]) -> Path:
    """The first of `digits_repositories`: the one the tests serve and read."""
    return digits_repositories[0][0]


@pytest.fixture(scope="session")
def perf_analyzer() -> str:
    """Path of a working perf_analyzer (its wrapper); installs it into .peers/ when it is not there."""
    return _perf_analyzer.find_or_install()


@pytest.fixture(scope="session")
def noise_probes() -> Iterator[NoiseProbes]:
    """The host-noise probes (one pinned to each core), from the first timing test to the session's end."""
    probes = NoiseProbes()
    yield probes
    probes.stop()


@pytest.fixture
def host_noise(noise_probes: NoiseProbes) -> HostNoise:
    """The host's timer noise around this test, and the timing checks that allow for it (capped)."""
    return HostNoise(noise_probes)


# -- processes a test leaves behind ------------------------------------------------------------------------
# A process that a test started and that outlives it (a worker, a server, a spinner) runs on through the
# tests after it, on the cores their timing depends on. After each test's teardown, the descendants of this
# session that were started during the test and are still running get a short grace to exit; the rest
# are ended (they are this session's own) and named in the session's summary, with the test that left them.

_LEAK_GRACE_S = 3.0
_leaks: list[str] = []


def _descendants() -> dict[int, psutil.Process]:
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            pass
    return found


def _left_by_test(before: set[int]) -> dict[int, psutil.Process]:
    """The descendants started during the test, less those of a process that was there before it (a
    module's server starting a model's worker processes is the server's own business)."""
    me = os.getpid()
    left = {}
    for pid, proc in _descendants().items():
        if pid in before:
            continue
        try:
            ancestors = {parent.pid for parent in proc.parents()}
        except psutil.NoSuchProcess:
            continue
        if not ancestors & (before - {me}):
            left[pid] = proc
    return left


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    item._loadgen_before = set(_descendants())  # after setup: the fixtures' servers are not the test's
    yield


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    yield
    before = getattr(item, "_loadgen_before", None)
    if before is None:
        return
    deadline = time.monotonic() + _LEAK_GRACE_S
    while (left := _left_by_test(before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, proc in left.items():
        try:
            what = " ".join(proc.cmdline())[:160]
            proc.kill()
        except psutil.Error:
            continue
        _leaks.append(f"{item.nodeid}: pid {pid} still running after the test ({what}); ended")


def pytest_terminal_summary(terminalreporter) -> None:
    if _leaks:
        terminalreporter.section("processes left running by tests")
        for line in _leaks:
            terminalreporter.write_line(line)

