"""`loadgen report DIR` (loadgen/report.py) on real run and sweep folders, an interrupted sweep among them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from tests.support.processes import ROOT, loadgen_cmd, pin, run_loadgen

pytestmark = pytest.mark.integration
_PNG = b"\x89PNG\r\n\x1a\n"


def _report(folder) -> subprocess.CompletedProcess:
    return subprocess.run(loadgen_cmd("report", str(folder)), cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def _embedded_pngs(page: str) -> list[str]:
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


def test_report_of_a_run_has_its_figures_and_plots(calibration_server, tmp_path) -> None:
    server = calibration_server("--delay-ms", "5")
    run = run_loadgen("--target", server.url, "--model", "m", "--rate", "100", "--duration", "3s",
                      out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    done = _report(tmp_path / "run")
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "run" / "report.html").read_text()
    summary = run.summary
    assert str(summary["requests"]) in page and "latency_ms" in page
    assert len(_embedded_pngs(page)) == 2
    for name in ("latency-over-time", "percentile-spectrum"):
        assert (tmp_path / "run" / "plots" / f"{name}.png").read_bytes().startswith(_PNG)
    assert "Interrupted" not in page


def test_report_of_an_interrupted_sweep(calibration_server, tmp_path) -> None:
    server = calibration_server("--delay-ms", "2")
    out = tmp_path / "sweep"
    proc = subprocess.Popen(loadgen_cmd("sweep", "--target", server.url, "--model", "m", "--rates", "50,100,150,200",
                                        "--step-duration", "2s", "--warmup", "0s", "--out", str(out)),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pin(proc.pid, 0)
    deadline = time.monotonic() + 60
    seen = ""
    while time.monotonic() < deadline and "step 2/" not in seen:  # two steps done, the third running
        seen += proc.stdout.readline()
    time.sleep(0.8)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["interrupted"] is True and len(sweep["steps"]) == 3
    done = _report(out)
    assert done.returncode == 0, done.stderr
    page = (out / "report.html").read_text()
    assert "Interrupted" in page
    for step in sweep["steps"]:  # every measured step is in the table, with its own figures
        assert f"<td>{step['achieved_rps']:.4g}</td>" in page
    pngs = _embedded_pngs(page)
    assert len(pngs) == 4  # curve, achieved vs offered, spectrum, latency over time
    assert all((out / "plots" / f"{name}.png").read_bytes().startswith(_PNG)
               for name in ("latency-vs-throughput", "achieved-vs-offered", "percentile-spectrum",
                            "latency-over-time"))


def test_a_folder_without_results_is_an_input_error(tmp_path) -> None:
    done = _report(tmp_path)
    assert done.returncode == 2
    assert "no compare.json, sweep.json or summary.json" in done.stderr
