"""kserve-http's tensor forms (integration): the binary tensor data extension (what tritonclient and
perf_analyzer send) and JSON values carry the same requests to the same answers, checked against the
model run in-process; "auto" picks binary only from a server that lists the extension."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loadgen.protocols.kserve_http import KServeHttpClient
from loadgen.scenario import make_target
from tests.support.processes import Server, run_loadgen, start_server, stop_process
from tests.support.triton import mlp_input_data

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def triton() -> Iterator[Server]:
    server = start_server([], module="servers.triton", port_flag="--http-port")
    yield server
    stop_process(server.proc)


@pytest.fixture(scope="module")
def calibration() -> Iterator[Server]:
    server = start_server([], module="servers.calibration", port_flag="--port")
    yield server
    stop_process(server.proc)


@pytest.mark.parametrize("tensor_format", ["binary", "json"])
def test_answers_validate_in_either_form(triton: Server, tensor_format: str, tmp_path: Path) -> None:
    common = ("--target", triton.url, "--model", "mlp", "--tensor-format", tensor_format, "--rate", "50",
              "--duration", "1s")
    good = run_loadgen(*common, "--input-data", str(mlp_input_data(tmp_path / "good.json")), out=tmp_path / "good")
    bad = run_loadgen(*common, "--input-data", str(mlp_input_data(tmp_path / "bad.json", wrong=True)),
                      out=tmp_path / "bad")
    assert good.returncode == 0, good.stderr
    assert good.summary["errors"] == {} and good.summary["ok"] == 50
    assert bad.returncode == 0, bad.stderr
    assert bad.summary["errors"] == {"invalid_response": 50} and bad.summary["ok"] == 0


def test_bytes_tensors_travel_binary(triton: Server, tmp_path: Path) -> None:
    run = run_loadgen("--target", triton.url, "--model", "identity_bytes", "--tensor-format", "binary",
                      "--rate", "50", "--duration", "1s", out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    assert run.summary["errors"] == {} and run.summary["ok"] == 50


def _prepared(server: Server, model: str = "mlp", tensor_format: str = "auto") -> KServeHttpClient:
    client = KServeHttpClient(make_target(url=server.url, model=model, tensor_format=tensor_format))
    client.prepare()
    client.close()
    return client


def test_auto_follows_the_servers_extensions(triton: Server, calibration: Server) -> None:
    on_triton = _prepared(triton)
    assert on_triton.binary
    assert b"Inference-Header-Content-Length: " in on_triton.request
    assert b'"binary_data_size":64' in on_triton.request  # INPUT0: 16 FP32 values as raw bytes
    on_calibration = _prepared(calibration, "any")
    assert not on_calibration.binary and b"Inference-Header-Content-Length" not in on_calibration.request
    assert not _prepared(triton, tensor_format="json").binary


def test_binary_forced_on_a_json_only_server_fails_before_the_run(calibration: Server, tmp_path: Path) -> None:
    run = run_loadgen("--target", calibration.url, "--model", "any", "--tensor-format", "binary", "--rate", "10",
                      "--duration", "1s", out=tmp_path / "run")
    assert run.returncode == 2 and "warm-up request" in run.stderr and "http_400" in run.stderr


def test_tensor_format_is_for_kserve_http_only(tmp_path: Path) -> None:
    run = run_loadgen("--protocol", "kserve-grpc", "--target", "grpc://127.0.0.1:9", "--model", "m",
                      "--tensor-format", "binary", "--rate", "10", "--duration", "1s", out=tmp_path / "run")
    assert run.returncode == 2 and "tensor_format" in run.stderr
