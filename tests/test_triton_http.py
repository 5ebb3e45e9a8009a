"""servers/triton over HTTP, judged by tritonclient and by loadgen itself (integration).

One server process (port 0, built-in models) serves the whole module; expected answers come from the
same built-in models run in this process.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.http as tritonclient_http
from tritonclient.utils import InferenceServerException

from tests.support.processes import ROOT, Server, loadgen_cmd, run_loadgen, start_server
from tests.support.triton import MODELS, assert_matches, sample_input

pytestmark = pytest.mark.integration
BATCHING = [name for name, model in MODELS.items() if model.max_batch_size > 0]


@pytest.fixture(scope="module")
def client(triton_server: Server):
    client = tritonclient_http.InferenceServerClient(triton_server.url.removeprefix("http://"))
    yield client
    client.close()


def _infer(client, name: str, data: np.ndarray, binary: bool, request_id: str = ""):
    datatype = "BYTES" if data.dtype == object else "FP32"
    tensor = tritonclient_http.InferInput("INPUT0", list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    outputs = [tritonclient_http.InferRequestedOutput("OUTPUT0", binary_data=binary)]
    return client.infer(name, [tensor], outputs=outputs, request_id=request_id)


def test_server_health_and_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "triton"
    assert {"binary_tensor_data", "statistics", "model_configuration", "model_repository"} <= set(
        metadata["extensions"])


@pytest.mark.parametrize("name", list(MODELS))
def test_model_metadata_and_config(client, name: str) -> None:
    model = MODELS[name]
    assert client.is_model_ready(name) and client.is_model_ready(name, "1")
    metadata = client.get_model_metadata(name)
    assert metadata["name"] == name and metadata["versions"] == ["1"]
    lead = [-1] if model.max_batch_size > 0 else []
    assert metadata["inputs"][0]["shape"] == lead + list(model.inputs[0].dims)
    assert metadata["outputs"][0]["datatype"] == model.outputs[0].datatype
    config = client.get_model_config(name, "1")
    assert config["name"] == name and config["max_batch_size"] == model.max_batch_size
    expected_type = "TYPE_STRING" if name == "identity_bytes" else "TYPE_FP32"
    assert config["input"][0]["data_type"] == expected_type
    assert config["output"][0]["dims"] == list(model.outputs[0].dims)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("name", list(MODELS))
def test_infer_matches_the_model_run_here(client, name: str, binary: bool) -> None:
    data = sample_input(name, 1)
    result = _infer(client, name, data, binary, request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["model_name"] == name
    assert_matches(name, result.as_numpy("OUTPUT0"), data)


@pytest.mark.parametrize("name", BATCHING)
def test_batch_of_four_counts_four_inferences(client, name: str) -> None:
    before = client.get_inference_statistics(name)["model_stats"][0]
    data = sample_input(name, 4)
    assert_matches(name, _infer(client, name, data, True).as_numpy("OUTPUT0"), data)
    after = client.get_inference_statistics(name)["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 4
    assert after["execution_count"] == before["execution_count"] + 1
    success = after["inference_stats"]["success"]
    assert success["count"] == before["inference_stats"]["success"]["count"] + 1
    assert success["ns"] > before["inference_stats"]["success"]["ns"]
    assert after["inference_stats"]["compute_infer"]["count"] == success["count"]


def test_no_requested_outputs_come_back_binary(client) -> None:
    data = sample_input("mlp", 2)
    tensor = tritonclient_http.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("mlp", [tensor])
    assert result.get_output("OUTPUT0")["parameters"]["binary_data_size"] == 2 * 10 * 4
    assert_matches("mlp", result.as_numpy("OUTPUT0"), data)


def test_all_model_stats_and_repository_index(client) -> None:
    stats = client.get_inference_statistics()["model_stats"]
    assert sorted(entry["name"] for entry in stats) == sorted(MODELS)
    index = client.get_model_repository_index()
    assert sorted(index, key=lambda entry: entry["name"]) == [
        {"name": name, "version": "1", "state": "READY"} for name in sorted(MODELS)]


@pytest.mark.parametrize("call", ["metadata", "config", "infer", "stats", "version"])
def test_unknown_model_is_an_error_with_tritons_message(client, call: str) -> None:
    with pytest.raises(InferenceServerException) as raised:
        if call == "metadata":
            client.get_model_metadata("nope")
        elif call == "config":
            client.get_model_config("nope")
        elif call == "stats":
            client.get_inference_statistics("nope")
        elif call == "version":
            client.get_model_metadata("mlp", "2")
        else:
            _infer(client, "nope", sample_input("identity", 1), True)
    assert "Request for unknown model" in raised.value.message()
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("case", ["wrong dims", "wrong datatype", "batch too large", "short binary"])
def test_bad_inputs_are_errors_and_the_server_goes_on(client, case: str) -> None:
    before = client.get_inference_statistics("mlp")["model_stats"][0]["inference_stats"]["fail"]["count"]
    data = {"wrong dims": np.zeros((1, 8), np.float32), "wrong datatype": np.zeros((1, 16), np.float64),
            "batch too large": np.zeros((33, 16), np.float32), "short binary": np.zeros((1, 17), np.float32)}[case]
    tensor = tritonclient_http.InferInput("INPUT0", list(data.shape), "FP64" if case == "wrong datatype" else "FP32")
    tensor.set_data_from_numpy(data)
    if case == "short binary":  # shape [1, 16] declared over 17 floats of data
        tensor.set_shape([1, 16])
    with pytest.raises(InferenceServerException) as raised:
        client.infer("mlp", [tensor])
    assert raised.value.message()
    after = client.get_inference_statistics("mlp")["model_stats"][0]["inference_stats"]["fail"]["count"]
    assert after == before + 1
    assert client.is_server_live()
    assert_matches("mlp", _infer(client, "mlp", sample_input("mlp", 1), True).as_numpy("OUTPUT0"), sample_input("mlp", 1))


def _raw(server: Server, data: bytes) -> tuple[str, dict]:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"inputs": [{"name": "INPUT0"}]}',
                                  b'{"inputs": "x"}', b"\xff\xfe"])
def test_malformed_infer_body_is_400_with_error(triton_server: Server, body: bytes) -> None:
    request = (b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    status, answer = _raw(triton_server, request)
    assert status == "HTTP/1.1 400 Bad Request"
    assert isinstance(answer["error"], str) and answer["error"]


@pytest.mark.parametrize(("request_line", "status", "error"), [
    (b"GET /v2/nowhere HTTP/1.1", "HTTP/1.1 404 Not Found", "Not Found"),
    (b"GET /v2/models/identity/infer HTTP/1.1", "HTTP/1.1 405 Method Not Allowed", "Method Not Allowed"),
    (b"DELETE /v2/health/live HTTP/1.1", "HTTP/1.1 405 Method Not Allowed", "Method Not Allowed"),
])
def test_unknown_path_and_wrong_verb(triton_server: Server, request_line: bytes, status: str,
                                     error: str) -> None:
    got_status, answer = _raw(triton_server, request_line + b"\r\nConnection: close\r\n\r\n")
    assert (got_status, answer) == (status, {"error": error})


def test_loadgen_runs_clean_against_mlp(triton_server: Server, tmp_path) -> None:
    run = run_loadgen("--target", triton_server.url, "--model", "mlp", "--rate", "50", "--duration", "2s",
                      out=tmp_path / "run")
    assert run.returncode == 0, run.stderr
    summary = run.summary
    assert summary["ok"] == summary["requests"] > 60 and summary["errors"] == {}, summary


def test_missing_model_repository_is_refused_with_exit_2() -> None:
    done = subprocess.run([sys.executable, "-m", "servers.triton", "--http-port", "0", "--model-repository", "/m"],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "--model-repository /m: not a folder" in done.stderr


def test_loadgen_serve_triton_passes_flags_through() -> None:
    done = subprocess.run(loadgen_cmd("serve", "triton", "--help"), check=False, capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0
    assert "usage: loadgen serve triton" in done.stdout and "--grpc-port" in done.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_server_with_exit_0(signum: int) -> None:
    server = start_server([], module="servers.triton", port_flag="--http-port")
    try:
        server.proc.send_signal(signum)
        assert server.proc.wait(10) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(5)
