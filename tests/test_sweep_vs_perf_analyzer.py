"""The sweep's saturation throughput agrees with NVIDIA perf_analyzer's concurrency sweep (integration).

Both tools measure the same Triton-compatible server, one after the other, on a model whose capacity
is set by its service time: a Python-backend model (one instance, no batching) that takes 4 ms per
execution, so about 250 requests/s whatever the client. perf_analyzer's best throughput over
concurrency 1 and 4 and `loadgen sweep --users 1,4`'s saturation_rps must agree within 10 %, and both
must be near the capacity the service time allows. One request in flight leaves the model idle between
requests; two already keep it busy (the next one waits in the queue while one executes), so 4 is past
the capacity for both tools, and a level between adds nothing to the comparison.
"""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import pin, run_loadgen, stop_process
from tests.support.triton import Fronts, start_fronts, write_paced_model

pytestmark = pytest.mark.integration

SERVICE_S = 0.004


@pytest.fixture(scope="module")
def fronts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fronts]:
    repository = tmp_path_factory.mktemp("repo")
    write_paced_model(repository, SERVICE_S, width=4)
    started = start_fronts("--model-repository", str(repository), "--allow-python-backend")
    yield started
    stop_process(started.proc)


def _perf_analyzer_best(binary: str, fronts: Fronts, work: Path) -> float:
    cmd = [binary, "-m", "paced", "-u", fronts.http_url, "-i", "http", "--concurrency-range", "1:4:3",
           "--measurement-interval", "800", "--max-trials", "4", "--stability-percentage", "1000",
           "-f", str(work / "pa.csv")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work)
    pin(proc.pid, 0)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    with open(work / "pa.csv", newline="") as report:
        return max(float(row["Inferences/Second"]) for row in csv.DictReader(report))


@pytest.mark.timing  # its verdict needs a generator with the cores to itself
def test_sweep_saturation_matches_perf_analyzer(perf_analyzer: str, fronts: Fronts,
                                                tmp_path: Path) -> None:
    peer = _perf_analyzer_best(perf_analyzer, fronts, tmp_path)
    run = run_loadgen("--target", f"http://{fronts.http_url}", "--model", "paced", "--users", "1,4",
                      "--step-duration", "2s", "--warmup", "1s", out=tmp_path / "sweep", verb="sweep", timeout=240)
    assert run.returncode == 0, run.stderr
    ours = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["saturation_rps"]
    capacity = 1 / SERVICE_S
    print(f"perf_analyzer best {peer:.1f} inf/s, loadgen saturation {ours:.1f} req/s, capacity {capacity:.0f}")
    assert 0.75 * capacity < peer <= 1.02 * capacity, peer
    assert abs(ours / peer - 1) < 0.10, (ours, peer)
