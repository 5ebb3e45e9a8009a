"""`loadgen run --protocol torchserve-http|torchserve-grpc` against the TorchServe-compatible server
(integration): every request answered, the server's own count agrees, bad payloads and unknown models
are clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import run_loadgen
from tests.support.torchserve import (
    MLP_F32,
    MLP_JSON,
    ONE_MLP_WORKER,
    OPEN,
    TorchServe,
    start_torchserve,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def torchserve(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    folder = tmp_path_factory.mktemp("ts")
    server = start_torchserve(model_store, folder, "--models", "mlp=mlp.mar",
                              config=[*OPEN, ONE_MLP_WORKER, "metrics_mode=prometheus"])
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


@pytest.mark.parametrize("protocol", ["torchserve-http", "torchserve-grpc"])
def test_a_payload_folder_is_cycled_through(torchserve: TorchServe, tmp_path: Path, protocol: str) -> None:
    target = torchserve.inference if protocol.endswith("http") else f"grpc://{torchserve.grpc_inference}"
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.json").write_text(MLP_JSON)
    (good / "b.bin").write_bytes(MLP_F32)  # the same input as raw little-endian floats
    (good / ".hidden").write_text("not a payload")
    before = _served(torchserve)
    run = run_loadgen("--protocol", protocol, "--target", target, "--model", "mlp", "--payload", str(good),
                      "--rate", "50", "--duration", "1s", out=tmp_path / "good-run")
    assert run.returncode == 0, run.stderr
    assert run.summary["errors"] == {} and run.summary["sent"] == 50
    assert _served(torchserve) - before == run.summary["sent"] + run.summary["warmup_requests"]
    # a rejected file anywhere in the folder is met by the warm-up, which sends every file in turn
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.json").write_text(MLP_JSON)
    (mixed / "b.json").write_text('{"not": "floats"}')
    run = run_loadgen("--protocol", protocol, "--target", target, "--model", "mlp", "--payload", str(mixed),
                      "--rate", "10", "--duration", "1s", out=tmp_path / "mixed-run")
    assert run.returncode == 2 and "warm-up request" in run.stderr


def test_an_empty_payload_folder_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run = run_loadgen("--protocol", "torchserve-http", "--target", "http://127.0.0.1:9", "--model", "mlp",
                      "--payload", str(tmp_path / "empty"), "--rate", "10", "--duration", "1s", out=tmp_path / "run")
    assert run.returncode == 2 and "target.payload" in run.stderr and "holds no files" in run.stderr


def test_payload_content_types_follow_the_extension() -> None:
    from loadgen.protocols.torchserve_http import _content_type
    from loadgen.scenario import make_target

    target = make_target(url="http://127.0.0.1:1", model="m", protocol="torchserve-http", payload=__file__)
    kinds = {name: _content_type(target, Path(name)) for name in ("x.json", "cat.jpg", "a.png", "s.wav", "t.txt", "raw")}
    assert kinds.pop("s.wav").startswith("audio/")  # audio/wav or audio/x-wav, by the host's mime table
    assert kinds == {"x.json": "application/json", "cat.jpg": "image/jpeg", "a.png": "image/png",
                     "t.txt": "application/octet-stream", "raw": "application/octet-stream"}
    forced = target.model_copy(update={"content_type": "image/webp"})
    assert _content_type(forced, Path("x.json")) == "image/webp"
