"""NVIDIA perf_analyzer, the peer tool several tests judge the servers with: found, or installed.

Where it comes from: $LOADGEN_PERF_ANALYZER, else .peers/perf_analyzer/perf_analyzer, else
../shared/peers/perf_analyzer.sh installs it there (.ci/run installs it before `make test`). When it
cannot be had the tests fail: a missing peer is not a reason to pass. The `perf_analyzer` fixture
(tests/conftest.py, one per session) calls `find_or_install`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import ROOT

ENV_VAR = "LOADGEN_PERF_ANALYZER"
PEER_DIR = ROOT / ".peers" / "perf_analyzer"
INSTALLER = ROOT.parent / "shared" / "peers" / "perf_analyzer.sh"


def find_or_install() -> str:
    """Path of a working perf_analyzer (its wrapper); installs it into .peers/ when it is not there."""
    given = os.environ.get(ENV_VAR)
    if given:
        _check_runs(given, f"${ENV_VAR}")
        return given
    wrapper = PEER_DIR / "perf_analyzer"
    if not _runs(wrapper):
        _install()
    _check_runs(str(wrapper), str(wrapper.relative_to(ROOT)))
    return str(wrapper)


def _runs(path: Path | str) -> bool:
    try:
        done = subprocess.run([str(path), "--version"], capture_output=True, timeout=30, check=False)
    except OSError:
        return False
    return done.returncode == 0


def _check_runs(path: str, source: str) -> None:
    if not _runs(path):
        pytest.fail(f"perf_analyzer from {source} ({path}) does not run: `{path} --version` failed. "
                    f"Install it with ../shared/peers/perf_analyzer.sh .peers/perf_analyzer")


def _install() -> None:
    if not INSTALLER.is_file():
        pytest.fail(f"perf_analyzer is needed and not installed: set ${ENV_VAR} to its path, or put it in "
                    f"{PEER_DIR.relative_to(ROOT)} ({INSTALLER} is missing, so it cannot be installed here)")
    try:
        done = subprocess.run(["bash", str(INSTALLER), str(PEER_DIR)], capture_output=True, text=True,
                              timeout=600, check=False, env={**os.environ, "PYTHON": sys.executable})
    except subprocess.TimeoutExpired:
        pytest.fail(f"installing perf_analyzer with {INSTALLER} took more than 600 s")
    if done.returncode != 0:
        pytest.fail(f"installing perf_analyzer with {INSTALLER} failed (exit {done.returncode}):\n"
                    f"{done.stderr[-3000:]}")
