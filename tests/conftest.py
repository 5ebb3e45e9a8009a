"""Fixtures shared by the test modules; the helpers behind them live in tests/support."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


def _built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`root/name`, made by `build(root/name)` the first time any process of this test run asks for it:
    under pytest-xdist every worker has a session of its own, and they share the folder above their own
    base temp folder, so the first builds (holding a lock) and the others wait for it and reuse it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    target = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").is_file():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            build(target)
            (root / f"{name}.done").touch()
    return target


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TorchServe captures' model store, one per test run (built on first use)."""
    return _built_once(tmp_path_factory, "torchserve-store", build_store)


@pytest.fixture(scope="session")
def digits_repositories(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    """Two model repositories written by `python -m servers.models.make_repo --no-minilm` (built-in and
    digits models, with _data/ test split and labels), both at once, once per test run: the training takes
    seconds, on one thread each. The first from an interpreter without a hash seed, the second with
    PYTHONHASHSEED=1 (the command fixes its own): tests/test_digits_models.py compares their bytes. The
    MiniLM models (260 MB, tests/test_minilm_models.py) are left out. Each comes with what the command
    printed (kept beside it, in printed.txt)."""

    def build(folder: Path) -> None:
        paths = (folder / "digits_repository", folder / "digits_b")
        unseeded = {key: value for key, value in os.environ.items() if key != "PYTHONHASHSEED"}
        runs = [subprocess.Popen([sys.executable, "-m", "servers.models.make_repo", str(path), "--no-minilm"],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for path, env in zip(paths, (unseeded, {**os.environ, "PYTHONHASHSEED": "1"}))]
        for path, run in zip(paths, runs):
            try:
                out, err = run.communicate(timeout=300)
            finally:
                stop_process(run)
            assert run.returncode == 0, err
            (folder / f"{path.name}.printed.txt").write_text(out)

    folder = _built_once(tmp_path_factory, "digits", build)
    return [(folder / name, (folder / f"{name}.printed.txt").read_text())
            for name in ("digits_repository", "digits_b")]


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


# -- timing tests run alone ----------------------------------------------------------------------------------
# `make test` runs the suite in two parts: the tests that judge no time measured on this host, two at a time
# (pytest-xdist, one module per process), then the timing tests one at a time, with the cores to
# themselves. A test is a timing test when it takes `host_noise` (its checks allow for the host's noise)
# or carries the `timing` mark (a module's `pytestmark`, for checks of rates and latencies without it).


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "host_noise" in getattr(item, "fixturenames", ()) and item.get_closest_marker("timing") is None:
            item.add_marker(pytest.mark.timing)


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

