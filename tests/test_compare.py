"""Integration: `loadgen compare` of digits model variants on the Triton-compatible server.

Every answer is scored: the accuracy compare reports for a variant equals the one computed here from
the same model's answers fetched with tritonclient, entry by entry (one user in closed loop, so each
request is a batch of one, as tritonclient's are). A variant the server does not have is reported as
failed and the others still run; an SLO no variant meets exits 1 with every file written.
"""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from loadgen.protocols.base import WARMUP_REQUESTS
from servers.models.make_repo import DATA_FOLDER
from tests.support.processes import ROOT, Server, loadgen_cmd, run_loadgen, start_server, stop_process

pytestmark = pytest.mark.integration

VARIANTS = ("digits_cnn", "digits_cnn_int8", "digits_student")


@pytest.fixture(scope="module")
def server(digits_repository: Path) -> Iterator[Server]:
    started = start_server(["--model-repository", str(digits_repository)], module="servers.triton",
                           port_flag="--http-port", timeout=60)
    yield started
    stop_process(started.proc)


def _correct_by_entry(server: Server, model: str, entries: list[dict], labels: list[int]) -> list[bool]:
    """Whether the model's answer to each entry, fetched with tritonclient, names the entry's label."""
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    correct = []
    for entry, label in zip(entries, labels):
        tensor = httpclient.InferInput("INPUT0", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.array([entry["INPUT0"]], dtype=np.float32))
        logits = client.infer(model, [tensor]).as_numpy("OUTPUT0")
        correct.append(int(np.argmax(logits[0])) == label)
    client.close()
    return correct


def test_compare_scores_every_answer_and_reports_a_failed_variant(server: Server, digits_repository: Path,
                                                                   tmp_path: Path) -> None:
    data = digits_repository / DATA_FOLDER / "digits_test.json"
    labels_path = digits_repository / DATA_FOLDER / "digits_test_labels.json"
    out = tmp_path / "compare"
    run = run_loadgen("--target", server.url, "--models", ",".join((*VARIANTS, "digits_absent")),
                      "--input-data", str(data), "--labels", str(labels_path), "--users", "1", "--duration", "1.5s",
                      "--model-repository", str(digits_repository), "--cost-per-hour", "3.6",
                      "--slo", "p99<0.001ms", out=out, verb="compare", timeout=180)
    assert run.returncode == 1, run.stderr  # no variant meets a p99 of a microsecond
    document = json.loads((out / "compare.json").read_text())
    by_model = {entry["model"]: entry for entry in document["models"]}
    assert list(by_model) == [*VARIANTS, "digits_absent"]
    absent = by_model["digits_absent"]
    assert absent["status"] == "failed" and "digits_absent" in absent["error"] and "not ready" in absent["error"]
    assert "FAILED" in run.stdout and "digits_absent" in run.stdout

    entries = json.loads(data.read_text())["data"]
    labels = json.loads(labels_path.read_text())
    for model in VARIANTS:
        entry = by_model[model]
        assert entry["status"] == "ok", entry
        summary = json.loads((out / model / "summary.json").read_text())
        scored = summary["accuracy"]["scored"]
        assert scored == summary["ok"] == summary["requests"] > 50
        # the warm-up requests went first, then the run went on through the entries in turn
        correct = _correct_by_entry(server, model, entries, labels)
        expected = sum(correct[(WARMUP_REQUESTS + k) % len(entries)] for k in range(scored))
        assert summary["accuracy"]["correct"] == expected, model
        assert entry["accuracy"] == pytest.approx(expected / scored, abs=1e-6)
        assert entry["accuracy"] > 0.9
        assert entry["model_bytes"] == sum(p.stat().st_size for p in (digits_repository / model).rglob("*")
                                           if p.is_file())
        assert entry["memory_mb"] is not None and entry["memory_mb"] > 0  # the server measured the load
        assert entry["slo_met"] is False
        # $ per million at 3.6 $/h: 1000 / (inferences per second)
        assert entry["cost_per_million"] == pytest.approx(1000 / summary["achieved_inferences_per_s"], rel=1e-3)
    # the student is smaller on disk than the CNN it learnt from
    assert by_model["digits_student"]["model_bytes"] < by_model["digits_cnn"]["model_bytes"] / 4
    assert any(entry["pareto_latency"] for entry in document["models"])
    with (out / "compare.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [row["model"] for row in rows] == [*VARIANTS, "digits_absent"]

    report = subprocess.run(loadgen_cmd("report", str(out)), cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert report.returncode == 0, report.stderr
    assert (out / "plots" / "accuracy-vs-p99.png").stat().st_size > 1000
    assert "digits_student" in (out / "report.html").read_text()


def test_compare_against_a_reference_model(server: Server, digits_repository: Path, tmp_path: Path) -> None:
    """No labels: each variant is scored by agreement with the fp32 model's answers, fetched once. The
    reference itself agrees with itself exactly; the student less than the fp16 copy."""
    data = digits_repository / DATA_FOLDER / "digits_test.json"
    out = tmp_path / "reference"
    run = run_loadgen("--target", server.url, "--models", "digits_cnn,digits_cnn_fp16,digits_student",
                      "--reference", "digits_cnn", "--input-data", str(data), "--users", "1", "--duration", "1s",
                      out=out, verb="compare", timeout=180)
    assert run.returncode == 0, run.stderr
    reference = json.loads((out / "reference_outputs.json").read_text())
    assert reference["model"] == "digits_cnn" and reference["output"] == "OUTPUT0"
    assert len(reference["data"]) == len(json.loads(data.read_text())["data"]) and len(reference["data"][0]) == 10
    models = {entry["model"]: entry for entry in json.loads((out / "compare.json").read_text())["models"]}
    assert models["digits_cnn"]["accuracy"] == 1.0 and models["digits_cnn"]["mean_cosine"] == pytest.approx(1.0)
    assert models["digits_cnn_fp16"]["accuracy"] > 0.97 and models["digits_cnn_fp16"]["mean_cosine"] > 0.999
    assert models["digits_student"]["accuracy"] < models["digits_cnn_fp16"]["accuracy"]


@pytest.mark.timing  # its verdict needs a generator with the cores to itself
def test_compare_sweep_reports_saturation_and_the_knee_figures(tmp_path: Path) -> None:
    """--sweep against a server of known capacity (one worker, 10 ms a request: 100 req/s): each variant
    shows its sweep's saturation throughput and the latency of its knee step, not the queueing of the
    overloaded step (which grows with the step's length)."""
    server = start_server(["--service-ms", "10", "--workers", "1"])
    try:
        out = tmp_path / "swept"
        run = run_loadgen("--target", server.url, "--models", "a", "--sweep", "--rates", "40,80,160",
                          "--step-duration", "1s", "--warmup", "0.5s", out=out, verb="compare", timeout=120)
    finally:
        stop_process(server.proc)
    assert run.returncode == 0, run.stderr
    for entry in json.loads((out / "compare.json").read_text())["models"]:
        sweep = json.loads((out / entry["model"] / "sweep.json").read_text())
        assert entry["saturation_rps"] == sweep["saturation_rps"]
        if sweep["saturation_step"] == 3:  # the overloaded step was healthy: it measured the capacity
            assert 90 <= entry["saturation_rps"] <= 105, sweep["steps"]
        knee = sweep["knee"]
        if knee is None and sweep["generator_bound_steps"]:
            pytest.skip(f"the host was too noisy to judge: steps {sweep['generator_bound_steps']} of "
                        f"{entry['model']} were generator-bound ({[s['generator_reasons'] for s in sweep['steps']]})")
        assert knee is not None and knee["load"] in (40, 80), sweep["steps"]
        at_knee = json.loads((out / entry["model"] / sweep["steps"][knee["step"] - 1]["dir"] / "summary.json")
                             .read_text())
        assert entry["latency_ms"] == at_knee["latency_ms"] and entry["achieved_rps"] == at_knee["achieved_rps"]
        assert entry["latency_ms"]["p99"] < 100  # the 160 req/s step queued for hundreds of ms
        assert entry["memory_mb"] is None  # the calibration server reports no memory_usage


def test_compare_of_llm_endpoints_reports_each_variants_goodput(tmp_path: Path) -> None:
    """Two models of an OpenAI mock whose TTFT alternates 20 ms / 120 ms: with --goodput "ttft<70ms" about
    half of each variant's requests are good, and compare.json / compare.csv carry each one's goodput."""
    server = start_server(["--ttft-ms", "20,120", "--itl-ms", "2", "--model", "big", "--model", "small"],
                          module="servers.openai_mock")
    try:
        out = tmp_path / "llm"
        run = run_loadgen("--protocol", "openai", "--target", server.url, "--models", "big,small", "--rate", "20",
                          "--duration", "1.5s", "--max-tokens", "4", "--goodput", "ttft<70ms", out=out,
                          verb="compare", timeout=120)
    finally:
        stop_process(server.proc)
    assert run.returncode == 0, run.stderr
    for entry in json.loads((out / "compare.json").read_text())["models"]:
        summary = json.loads((out / entry["model"] / "summary.json").read_text())
        assert entry["goodput_rps"] == summary["goodput"]["goodput_rps"] > 0
        assert entry["goodput_share"] == summary["goodput"]["share"]
        assert 0.3 < entry["goodput_share"] < 0.7  # one request in two is answered in 120 ms
    with (out / "compare.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [row["model"] for row in rows] == ["big", "small"] and all(row["goodput_rps"] for row in rows)
