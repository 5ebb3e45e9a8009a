"""NVIDIA perf_analyzer against servers/triton (integration): Triton's own load client as the judge.

perf_analyzer is what Triton users measure with: it reads the model's metadata and config, sends
infer requests over HTTP or gRPC, and reads the statistics extension before and after every
measurement window. Each run here must exit 0, write one CSV row per load level with throughput and
latencies that make sense, and the server's own count must hold at least every request perf_analyzer
reports it measured. The mlp runs carry validation data (the model run in this process), so any
answer that differs from the in-process result makes perf_analyzer itself fail.

Where perf_analyzer comes from: the `perf_analyzer` fixture (tests/support/perf_analyzer.py); when it
cannot be had the tests fail. Shared memory stays off (the server does not offer the shared-memory
extensions).
"""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.processes import pin, stop_process
from tests.support.timing import HostNoise
from tests.support.triton import MODELS, Fronts, start_fronts

pytestmark = pytest.mark.integration

WINDOW_MS = 300
"""A measurement window: 60 to 180 requests at the request rates, enough for a rate within 20 %."""
MAX_TRIALS = 4
STABILITY_PERCENT = 1000
"""perf_analyzer repeats a level until three windows agree within this many percent, and exits 2 when
--max-trials pass first. Whether a shared test machine is quiet is no question for these tests (the
benchmarks ask it under a lock), so the bar is out of reach and every level ends after three windows."""
RUN_TIMEOUT_S = 60.0
CONCURRENCY = (1, 3)
RATES = (200, 600)
"""The levels of each run: a range of two (start:end:step), so perf_analyzer still steps through one, and
each level's row, export and server counts are checked; a level between the two would only repeat those
checks (three windows, about 0.9 s, a run)."""
RATE_TOLERANCE = 0.2
"""Request-rate rows: achieved throughput within 20 % of the rate asked for (far below the server's
capacity, so only a host stall moves it)."""
VALIDATION_ROWS = 4
LATENCY_COLUMNS = ("p50 latency", "p90 latency", "p95 latency", "p99 latency")
SERVER_COLUMNS = ("Server Compute Input", "Server Compute Infer", "Server Compute Output")


@pytest.fixture(scope="module")
def fronts() -> Iterator[Fronts]:
    """One server (HTTP and gRPC, built-in models) on the server core for the whole module."""
    started = start_fronts()
    yield started
    stop_process(started.proc)


# -- a run ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    protocol: str  # "http" or "grpc"
    mode: str  # "concurrency" or "request-rate"
    model: str  # "mlp" (validated answers) or "identity" (random data, --shape INPUT0:16)
    extra: tuple[str, ...] = ()

    @property
    def levels(self) -> tuple[int, ...]:
        return CONCURRENCY if self.mode == "concurrency" else RATES

    @property
    def level_column(self) -> str:
        return "Concurrency" if self.mode == "concurrency" else "Request Rate"

    def load_args(self) -> list[str]:
        low, high, step = self.levels[0], self.levels[-1], self.levels[1] - self.levels[0]
        return [f"--{self.mode}-range", f"{low}:{high}:{step}"]


CASES = [
    Case("http", "concurrency", "mlp"),
    Case("grpc", "concurrency", "mlp"),
    Case("http", "request-rate", "mlp"),
    Case("grpc", "request-rate", "mlp"),
    Case("http", "concurrency", "identity", ("--shared-memory", "none")),
    Case("grpc", "concurrency", "identity"),
    Case("http", "request-rate", "identity"),
    Case("grpc", "request-rate", "identity"),
]


@dataclass
class Outcome:
    rows: list[dict[str, str]]  # the CSV report, one row per level
    experiments: list[dict]  # --profile-export-file: every measured request of each level
    output: str


def validation_data(path: Path) -> Path:
    """perf_analyzer --input-data for mlp: a few input rows, each with the output computed here."""
    rng = np.random.default_rng(7)
    inputs = rng.standard_normal((VALIDATION_ROWS, MODELS["mlp"].in_features)).astype(np.float32)
    data, expected = [], []
    for row in inputs:
        output = MODELS["mlp"].infer({"INPUT0": row[np.newaxis]})["OUTPUT0"][0]
        data.append({"INPUT0": {"content": row.tolist(), "shape": list(row.shape)}})
        expected.append({"OUTPUT0": {"content": output.tolist(), "shape": list(output.shape)}})
    path.write_text(json.dumps({"data": data, "validation_data": expected}))
    return path


def run_perf_analyzer(binary: str, fronts: Fronts, case: Case, work: Path, host_noise: HostNoise) -> Outcome:
    url = fronts.http_url if case.protocol == "http" else fronts.grpc_url
    data = (["--input-data", str(validation_data(work / "mlp-input.json"))] if case.model == "mlp"
            else ["--shape", "INPUT0:16"])
    cmd = [binary, "-m", case.model, "-u", url, "-i", case.protocol, *case.load_args(), *data, *case.extra,
           "--measurement-interval", str(WINDOW_MS), "--max-trials", str(MAX_TRIALS),
           "--stability-percentage", str(STABILITY_PERCENT),
           "-f", str(work / "out.csv"), "--profile-export-file", str(work / "export.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work)
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
    with open(work / "out.csv", newline="") as report:
        rows = list(csv.DictReader(report))
    experiments = json.loads((work / "export.json").read_text())["experiments"]
    return Outcome(rows, experiments, output)


def model_stats(fronts: Fronts, model: str) -> dict:
    reply = httpx.get(f"http://{fronts.http_url}/v2/models/{model}/stats", timeout=5)
    reply.raise_for_status()
    (stats,) = reply.json()["model_stats"]
    return stats


# -- the test -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.protocol}-{c.mode}-{c.model}")
def test_perf_analyzer_run(perf_analyzer: str, fronts: Fronts, case: Case, host_noise: HostNoise,
                           tmp_path: Path) -> None:
    before = model_stats(fronts, case.model)
    outcome = run_perf_analyzer(perf_analyzer, fronts, case, tmp_path, host_noise)
    after = model_stats(fronts, case.model)

    # The CSV lists the levels by throughput, the export in the order they ran.
    rows = {float(row[case.level_column]): row for row in outcome.rows}
    assert len(rows) == len(outcome.rows) and sorted(rows) == list(case.levels), outcome.output
    assert [e["experiment"]["value"] for e in outcome.experiments] == list(case.levels)
    for experiment in outcome.experiments:
        check_row(case, rows[experiment["experiment"]["value"]], experiment, host_noise)

    measured = sum(len(e["requests"]) for e in outcome.experiments)
    inferred = after["inference_count"] - before["inference_count"]
    succeeded = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    assert inferred >= measured, f"server counted {inferred} inferences, perf_analyzer measured {measured}"
    assert succeeded >= measured
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"]


def check_row(case: Case, row: dict[str, str], experiment: dict, host_noise: HostNoise) -> None:
    """One level: its throughput agrees with the requests it exported, latencies ordered and > 0, and
    the server-side columns (read from the statistics extension) were filled in."""
    level = row[case.level_column]
    requests = experiment["requests"]
    assert requests, f"no request measured at {case.level_column} {level}"
    assert all(r["response_timestamps"] and r["response_timestamps"][-1] > r["timestamp"] for r in requests)
    bounds = experiment["window_boundaries"]
    throughput = float(row["Inferences/Second"])
    exported = len(requests) / ((bounds[-1] - bounds[0]) / 1e9)  # requests per second of the windows
    assert throughput > 0
    agree = f"{level}: CSV {throughput}/s, export {exported:.1f}/s"
    assert throughput == pytest.approx(exported, rel=0.01), agree
    if case.mode == "request-rate":  # 20 % of a 500 ms window: only a 100 ms stall moves it so far
        host_noise.assert_holds(throughput == pytest.approx(float(level), rel=RATE_TOLERANCE),
                                what=f"rate {level}: {throughput}", margin_ms=RATE_TOLERANCE * WINDOW_MS)
    latencies = [float(row[column]) for column in LATENCY_COLUMNS]
    assert latencies[0] > 0 and latencies == sorted(latencies), f"{level}: {latencies}"
    assert sum(float(row[column]) for column in SERVER_COLUMNS) > 0, f"{level}: no server-side figures"
