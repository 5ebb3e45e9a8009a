"""loadgen's user classes under Locust's own command line (`locust -f`): Locust's statistics and
loadgen's HDR outputs see the same requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import ROOT, pin

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("pattern", ["[open_loop]\nrate = 50\nduration = \"2s\"\n",
                                     "[closed_loop]\nusers = 2\nthink_time = \"20ms\"\nduration = \"2s\"\n"],
                         ids=["open", "closed"])
def test_locust_runs_the_scenario(calibration_server, tmp_path: Path, pattern: str) -> None:
    server = calibration_server("--delay-ms", "5")
    scenario = tmp_path / "s.toml"
    scenario.write_text(f'[target]\nurl = "{server.url}"\nmodel = "m"\n{pattern}')
    locust = Path(sys.executable).parent / "locust"
    proc = subprocess.Popen(
        [str(locust), "-f", str(ROOT / "loadgen/driver/locustfile.py"), "--scenario", str(scenario),
         "--headless", "--lg-out", str(tmp_path / "out"), "--json-file", str(tmp_path / "locust"),
         "-u", "2", "-r", "2", "-t", "10s", "--only-summary"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    pin(proc.pid, 0)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    stats = json.loads((tmp_path / "locust.json").read_text())
    locust_requests = sum(entry["num_requests"] for entry in stats)
    assert summary["requests"] == locust_requests > 0
    assert summary["errors"] == {}
    if pattern.startswith("[open_loop]"):
        assert summary["requests"] == 100  # the schedule ends the run, not Locust's -t
    assert server.info()["requests"] == summary["requests"] + summary["warmup_requests"]
