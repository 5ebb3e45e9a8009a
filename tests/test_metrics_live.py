"""Live /metrics during `loadgen run --metrics-port 0`: scraped from the generator while it sends."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, loadgen_cmd, pin, stop_process

RUN_S = 4.0


def start_run(url: str, out: Path) -> tuple[subprocess.Popen, str]:
    """`loadgen run` at 100 req/s for 4 s serving metrics on a free port; returns it and the metrics URL."""
    proc = subprocess.Popen(
        loadgen_cmd("run", "--target", url, "--model", "m", "--rate", "100", "--duration", f"{RUN_S:g}s",
                    "--metrics-port", "0", "--quiet", "--out", str(out)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    pin(proc.pid, 0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line.startswith("metrics on "):
            return proc, line.split()[-1]
        if not line and proc.poll() is not None:
            break
    stop_process(proc)
    raise AssertionError(f"no metrics line: {proc.stderr.read()}")


def scrape(url: str) -> dict[str, float]:
    """Samples of one scrape, by name plus sorted labels; requests summed over outcomes."""
    text = httpx.get(url, timeout=2).text
    samples: dict[str, float] = {"requests": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name + json.dumps(sample.labels, sort_keys=True)] = sample.value
            if sample.name == "loadgen_requests_total":
                samples["requests"] += sample.value
    return samples


def test_metrics_are_served_during_the_run(calibration_server, tmp_path) -> None:
    server = calibration_server("--delay-ms", "2")
    proc, url = start_run(server.url, tmp_path)
    scrapes = []
    try:
        while proc.poll() is None:
            try:
                scrapes.append(scrape(url))
            except httpx.TransportError:  # the run ended between poll() and the request
                break
            time.sleep(0.4)
        _, stderr = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    counts = [s["requests"] for s in scrapes if "loadgen_requests_total" + '{"kind": "ok", "outcome": "ok"}' in s]
    assert len(counts) >= 2
    assert counts == sorted(counts) and counts[-1] > counts[0]
    assert 0 < counts[-1] <= summary["requests"]
    offered = [s["loadgen_offered_rps{}"] for s in scrapes]
    assert max(offered) == 100.0 and set(offered) <= {0.0, 100.0}
    assert summary["metrics_port"] == int(url.split(":")[2].split("/")[0])
    assert any(s.get('loadgen_latency_seconds_bucket{"le": "+Inf"}', 0) > 0 for s in scrapes)
