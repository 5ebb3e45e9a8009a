"""Fixtures shared by the test modules; the helpers behind them live in tests/support."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import perf_analyzer as _perf_analyzer
from tests.support.processes import Server, start_server, stop_process
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
def perf_analyzer() -> str:
    """Path of a working perf_analyzer (its wrapper); installs it into .peers/ when it is not there."""
    return _perf_analyzer.find_or_install()

