"""Live /metrics during `loadgen run --metrics-port 0`: scraped from the generator while it sends."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import POLL, ROOT, finish, loadgen_cmd, pin, stop_process

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
    text = POLL.get(url, timeout=2).text
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
        _, stderr = finish(proc, timeout=30)
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


def start_sweep(url: str, out: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`loadgen sweep` serving metrics on a free port; returns it and the sweep's metrics URL."""
    proc = subprocess.Popen(
        loadgen_cmd("sweep", "--target", url, "--model", "m", "--metrics-port", "0", "--out", str(out), *args),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    pin(proc.pid, 0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line.startswith("sweep metrics on "):
            return proc, line.split()[-1]
        if not line and proc.poll() is not None:
            break
    stop_process(proc)
    raise AssertionError(f"no sweep metrics line: {proc.stderr.read()}")


def _labels(step: int, load: float, **extra: str) -> str:
    return json.dumps({"load": f"{load:g}", "step": str(step), **extra}, sort_keys=True)


def test_sweep_serves_its_curve_and_verdict_live(calibration_server, tmp_path) -> None:
    """One port for the whole sweep: the running step's own families while it runs, each finished
    step's figures as sweep.json gives them, and the final verdict before the port closes."""
    server = calibration_server("--service-ms", "10", "--workers", "1")  # capacity 100 req/s
    proc, url = start_sweep(server.url, tmp_path, "--rates", "40,80", "--step-duration", "1s", "--warmup", "1s")
    scrapes, outcomes = [], []  # outcomes: "ok" or "refused", in order, from the first answer on
    try:
        while proc.poll() is None:
            try:
                scrapes.append(scrape(url))
                outcomes.append("ok")
            except httpx.TransportError:
                if scrapes:
                    outcomes.append("refused")
            time.sleep(0.3)
        _, stderr = finish(proc, timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, stderr
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    # The port stayed open between steps: once it refused (closed after the verdict, while the sweep wrote
    # its report), it never answered again.
    assert "refused" not in outcomes or "ok" not in outcomes[outcomes.index("refused"):], outcomes
    steps = {int(s["loadgen_sweep_current_step{}"]) for s in scrapes}
    assert {1, 2} <= steps
    # While step 2 ran, its run's own families were on the sweep's port.
    assert any(s["loadgen_sweep_current_step{}"] == 2 and s.get("loadgen_offered_rps{}") == 80.0 for s in scrapes)
    last = scrapes[-1]
    assert last["loadgen_sweep_finished{}"] == 1.0  # the sweep waited for this scrape before closing
    assert last['loadgen_sweep_info{"unit": "rps"}'] == 1.0
    for step in sweep["steps"]:
        index, load = step["step"], step["load"]
        achieved = last["loadgen_sweep_step_achieved_rps" + _labels(index, load)]
        assert achieved == pytest.approx(step["achieved_rps"], abs=1e-3)
        assert last["loadgen_sweep_step_offered_rps" + _labels(index, load)] == pytest.approx(step["offered_rps"],
                                                                                              abs=1e-3)
        for quantile, key in (("0.5", "p50"), ("0.99", "p99")):
            seconds = last["loadgen_sweep_step_latency_seconds" + _labels(index, load, quantile=quantile)]
            assert seconds == pytest.approx(step["latency_ms"][key] / 1000.0, rel=1e-9)
        assert last["loadgen_sweep_step_error_ratio" + _labels(index, load)] == step["errors"] / max(
            1, json.loads((tmp_path / step["dir"] / "summary.json").read_text())["requests"])
    assert last["loadgen_sweep_saturated{}"] == float(sweep["saturated"])
    if sweep["saturation_rps"] is None:  # every step generator-bound (a busy machine): no figure is given
        assert "loadgen_sweep_saturation_rps{}" not in last and "loadgen_sweep_knee_load{}" not in last
    else:
        assert last["loadgen_sweep_saturation_rps{}"] == pytest.approx(sweep["saturation_rps"], abs=1e-3)
        assert last["loadgen_sweep_knee_load{}"] == sweep["knee"]["load"]
    # A scrape during step 2 already had step 1 and the verdict of step 1 alone.
    during = next(s for s in scrapes if s["loadgen_sweep_current_step{}"] == 2)
    assert "loadgen_sweep_step_achieved_rps" + _labels(1, 40) in during
    assert "loadgen_sweep_step_achieved_rps" + _labels(2, 80) not in during
    assert during["loadgen_sweep_finished{}"] == 0.0


@pytest.mark.parametrize("distributed", [[], ["--processes", "1"]], ids=["run", "distributed-master"])
def test_metrics_host_binds_that_address(calibration_server, tmp_path, distributed: list[str]) -> None:
    """--metrics-host 127.0.0.2: /metrics answers there and not on 127.0.0.1 (the same port); in a
    distributed run, the master's merged /metrics."""
    server = calibration_server("--delay-ms", "2")
    proc = subprocess.Popen(
        loadgen_cmd("run", "--target", server.url, "--model", "m", "--rate", "50", "--duration", "2s",
                    "--metrics-port", "0", "--metrics-host", "127.0.0.2", "--quiet", "--out", str(tmp_path),
                    *distributed),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    pin(proc.pid, 0)
    try:
        seen = [proc.stderr.readline()]
        while seen[-1] and not seen[-1].startswith("metrics on "):
            seen.append(proc.stderr.readline())
        assert seen[-1], "".join(seen) + proc.stderr.read()
        url = seen[-1].split()[-1]
        assert url.startswith("http://127.0.0.2:"), seen[-1]
        assert "loadgen_in_flight" in httpx.get(url, timeout=2).text
        with pytest.raises(httpx.ConnectError):
            httpx.get(url.replace("127.0.0.2", "127.0.0.1"), timeout=2)
        _, stderr = finish(proc, timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, stderr


@pytest.mark.parametrize("verb", ["run", "sweep"])
def test_a_bad_metrics_host_names_the_key(tmp_path, verb: str) -> None:
    load = ["--rate", "10", "--duration", "1s"] if verb == "run" else ["--rates", "10"]
    result = subprocess.run(
        loadgen_cmd(verb, "--target", "http://127.0.0.1:9", "--model", "m", *load, "--metrics-port", "0",
                    "--metrics-host", "not a host", "--out", str(tmp_path / verb)),
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "output.metrics_host" in result.stderr
