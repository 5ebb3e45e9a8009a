"""`loadgen run --protocol torchserve-http|torchserve-grpc` against the TorchServe-compatible server
(integration): every request answered, the server's own count agrees, bad payloads and unknown models
are clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_loadgen
from tests.test_torchserve_support import MLP_JSON, OPEN, TorchServe, model_store, start_torchserve  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def torchserve(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:  # noqa: F811
    folder = tmp_path_factory.mktemp("ts")
    server = start_torchserve(model_store, folder, "--models", "mlp=mlp.mar", config=[*OPEN, "metrics_mode=prometheus"])
    yield server
    server.stop()


def _served(server: TorchServe) -> float:
    """ts_inference_requests_total of mlp, from the metrics API."""
    text = httpx.get(server.metrics + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ts_inference_requests_total") and 'model_name="mlp"' in line)


@pytest.mark.parametrize("protocol", ["torchserve-http", "torchserve-grpc"])
def test_every_request_is_answered_and_counted(torchserve: TorchServe, tmp_path: Path, protocol: str) -> None:
    payload = tmp_path / "input.json"
    payload.write_text(MLP_JSON)
    target = torchserve.inference if protocol.endswith("http") else f"grpc://{torchserve.grpc_inference}"
    before = _served(torchserve)
    run = run_loadgen("--protocol", protocol, "--target", target, "--model", "mlp", "--payload", str(payload),
                      "--rate", "100", "--duration", "2s", out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    # all 200 arrivals were sent and none failed; an answer still in flight when the window closed is
    # not in `ok`, but the server counted it (the run drains before it ends)
    assert summary["errors"] == {} and summary["sent"] == 200 and summary["ok"] == summary["requests"]
    assert _served(torchserve) - before == summary["sent"] + summary["warmup_requests"]
    assert 0 < summary["latency_ms"]["p50"] < 100


def test_a_payload_the_model_rejects_stops_before_the_run(torchserve: TorchServe, tmp_path: Path) -> None:
    payload = tmp_path / "bad.json"
    payload.write_text('{"not": "floats"}')
    run = run_loadgen("--protocol", "torchserve-http", "--target", torchserve.inference, "--model", "mlp",
                      "--payload", str(payload), "--rate", "10", "--duration", "1s", out=tmp_path / "run")
    assert run.returncode == 2 and "warm-up request" in run.stderr and "http_" in run.stderr


def test_missing_payload_and_unknown_model_are_input_errors(torchserve: TorchServe, tmp_path: Path) -> None:
    run = run_loadgen("--protocol", "torchserve-http", "--target", torchserve.inference, "--model", "mlp",
                      "--rate", "10", "--duration", "1s", out=tmp_path / "a")
    assert run.returncode == 2 and "needs payload" in run.stderr
    payload = tmp_path / "input.json"
    payload.write_text(MLP_JSON)
    run = run_loadgen("--protocol", "torchserve-grpc", "--target", f"grpc://{torchserve.grpc_inference}",
                      "--model", "nope", "--payload", str(payload), "--rate", "10", "--duration", "1s",
                      out=tmp_path / "b")
    # TorchServe answers an unknown model over gRPC with INTERNAL and its Java exception's message
    assert run.returncode == 2 and "Model not found: nope" in run.stderr
