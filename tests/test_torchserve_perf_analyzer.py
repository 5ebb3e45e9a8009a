"""NVIDIA perf_analyzer --service-kind torchserve against the TorchServe-compatible server (integration).

perf_analyzer's TorchServe mode is what a TorchServe user measures with: it posts the file named by
its --input-data JSON ({"data": [{"TORCHSERVE_INPUT": [PATH]}]}) to /predictions/MODEL as the
multipart form field `data`, at each concurrency level, and reports throughput and latencies. The
run must exit 0 and write one CSV row per level with a throughput and ordered latency percentiles;
the server's own counters must show every request it made answered 200 (perf_analyzer does not
check answers in this mode), and the same multipart request must get the captures' mlp outputs, as
the model gives them in-process.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import torch

from tests.support.processes import pin
from tests.support.timing import HostNoise
from tests.support.torchserve import (
    MLP_INPUT,
    MLP_JSON,
    OPEN,
    TorchServe,
    start_torchserve,
)

pytestmark = pytest.mark.integration

LEVELS = (1, 3)
WINDOW_REQUESTS = 40
MAX_TRIALS = 10
"""perf_analyzer ends a level after three windows of WINDOW_REQUESTS answers whose average latencies
agree within 1000 %, and gives up (exit 2) after MAX_TRIALS windows. Windows of a count rather than
a time, and room for a few more of them: on a shared test host the server's core can stall for
hundreds of milliseconds, which leaves a time window nearly empty or far off the others."""
RUN_TIMEOUT_S = 120.0
LATENCIES = ("p50 latency", "p90 latency", "p95 latency", "p99 latency")


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    config = [*OPEN, "metrics_mode=prometheus",
              'models={"mlp": {"1.0": {"minWorkers": 2, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 5}}}']
    running = start_torchserve(model_store, tmp_path_factory.mktemp("server"), "--models", "mlp=mlp.mar",
                               config=config, grpc=False)
    yield running
    running.stop()


def _counters(server: TorchServe) -> dict[str, float]:
    page = httpx.get(f"{server.metrics}/metrics", timeout=10).text
    return {name: float(value) for name, value in re.findall(r"^(\w+)\{[^}]*\} (\S+)$", page, re.MULTILINE)}


def _input_data(work: Path) -> Path:
    row = work / "row.json"
    row.write_text(MLP_JSON)
    data = work / "input.json"
    data.write_text(json.dumps({"data": [{"TORCHSERVE_INPUT": [str(row)]}]}))
    return data


def test_perf_analyzer_torchserve_mode_runs(perf_analyzer: str, server: TorchServe, host_noise: HostNoise,
                                            tmp_path: Path) -> None:
    before = _counters(server)
    host_port = server.inference.removeprefix("http://")
    cmd = [perf_analyzer, "-m", "mlp", "-u", host_port, "--service-kind", "torchserve", "-i", "http",
           "--input-data", str(_input_data(tmp_path)), "--concurrency-range", "1:3:2",
           "--measurement-mode", "count_windows", "--measurement-request-count", str(WINDOW_REQUESTS),
           "--stability-percentage", "1000", "--max-trials", str(MAX_TRIALS), "-f", str(tmp_path / "out.csv")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    pin(proc.pid, 0)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"perf_analyzer ran past {RUN_TIMEOUT_S:g} s:\n{output[-3000:]}")
    # a host that stalls either side for long (100 ms) can make perf_analyzer give up (exit 2)
    host_noise.assert_holds(proc.returncode == 0, margin_ms=100.0,
                            what=f"perf_analyzer exited {proc.returncode}:\n{' '.join(cmd)}\n{output[-3000:]}")
    assert "Service Kind: TorchServe" in output

    with open(tmp_path / "out.csv", newline="") as report:
        rows = list(csv.DictReader(report))
    assert sorted(int(row["Concurrency"]) for row in rows) == list(LEVELS)
    for row in rows:
        assert float(row["Inferences/Second"]) > 0, row
        latencies = [int(row[column]) for column in LATENCIES]
        assert 0 < latencies[0] <= latencies[1] <= latencies[2] <= latencies[3], row
        assert latencies[0] < 5_000_000, row  # microseconds: answers came within seconds, not timeouts

    after = _counters(server)
    sent = after["ts_inference_requests_total"] - before.get("ts_inference_requests_total", 0)
    answered = after["Requests2XX"] - before.get("Requests2XX", 0)
    measured = sum(int(count) for count in re.findall(r"Request count: (\d+)", output))
    assert sent >= measured > 0, (sent, measured)
    assert answered >= sent  # every prediction answered 200 (Requests2XX also counts the /metrics reads)
    assert after.get("Requests5XX", 0) == before.get("Requests5XX", 0)
    assert after.get("Requests4XX", 0) == before.get("Requests4XX", 0)


def test_the_multipart_request_perf_analyzer_sends_gets_the_models_answer(server: TorchServe,
                                                                          tmp_path: Path) -> None:
    """The form perf_analyzer posts (field `data`, the file's content, no file name) reaches the
    captures' float_handler as bytes, which it parses: the answer is the model's in-process output."""
    shutil.copy(server.store / "mlp.mar", tmp_path / "mlp.zip")
    shutil.unpack_archive(tmp_path / "mlp.zip", tmp_path / "mlp")
    model = torch.jit.load(str(tmp_path / "mlp" / "mlp.pt"))
    with torch.inference_mode():
        want = model(torch.tensor([MLP_INPUT]))[0].tolist()
    boundary = "------------------------d71c2b6b4e6d7490"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n{MLP_JSON}\r\n"
            f"--{boundary}--\r\n").encode()
    answer = httpx.post(f"{server.inference}/predictions/mlp", content=body, timeout=30,
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == pytest.approx(want, rel=1e-5, abs=1e-6)
