"""servers/triton's HTTP extras against a real server: compression, raw requests, oversized and stalled
bodies (integration).

One server per module serves a `make-repo` repository in explicit mode (identity, identity_bytes,
add_sub, and identity_one: identity_bytes declared [1], the only shape a raw BYTES request may have)
with a 1 s read timeout. Compression is judged by tritonclient's own request and response compression
(gzip and deflate): the outputs must equal the uncompressed ones. Raw requests go out with httpx,
stalled and oversized bodies over raw sockets.
"""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from servers.core.http1 import Request
from servers.models.builtin import Identity
from servers.models.make_repo import make_repo
from servers.triton._app import Reply, TritonApp
from tests.support.processes import ROOT, Server, start_server, stop_process

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 1.0
MAX_BODY = 64 * 1024 * 1024
_LOADED = ("identity", "identity_bytes", "identity_one", "add_sub")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    make_repo(root, digits=False, minilm=False, python=True)
    one = root / "identity_one"
    shutil.copytree(root / "identity_bytes", one)
    config = (one / "config.pbtxt").read_text().replace('"identity_bytes"', '"identity_one"')
    (one / "config.pbtxt").write_text(config.replace("dims: [ -1 ]", "dims: [ 1 ]"))
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Server]:
    loads = [arg for name in _LOADED for arg in ("--load-model", name)]
    started = start_server(["--model-repository", str(repository), "--allow-python-backend", "--model-control-mode", "explicit", *loads,
                            "--http-read-timeout", str(READ_TIMEOUT_S), "--grpc-port", "0"],
                           module="servers.triton", port_flag="--http-port", timeout=120)
    yield started
    stop_process(started.proc)
    assert "Traceback" not in started.proc.stderr.read()


def _address(server: Server) -> str:
    return server.url.removeprefix("http://")


def _connect(server: Server) -> socket.socket:
    host, port = _address(server).rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _infer(client: httpclient.InferenceServerClient, model: str, data: np.ndarray, datatype: str, binary: bool,
           request: str | None = None, response: str | None = None) -> np.ndarray:
    tensor = httpclient.InferInput("INPUT0", list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    result = client.infer(model, [tensor], outputs=[output], request_compression_algorithm=request,
                          response_compression_algorithm=response)
    return result.as_numpy("OUTPUT0")


def _raw_exchange(server: Server, request: bytes, then: bytes = b"") -> list[tuple[int, dict[str, str], bytes]]:
    """Send `request` (and `then` on the same connection); the answers, in order."""
    with _connect(server) as sock:
        sock.sendall(request + then)
        buffer, answers = b"", []
        while len(answers) < (2 if then else 1):
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(65536)
                assert chunk, f"connection closed: {buffer[:200]!r}"
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            status, *lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            while len(buffer) < int(headers["content-length"]):
                buffer += sock.recv(65536)
            size = int(headers["content-length"])
            answers.append((int(status.split()[1]), headers, buffer[:size]))
            buffer = buffer[size:]
    return answers


def _post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: triton", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_GOOD = _post("/v2/models/identity/infer", json.dumps(
    {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.5]}]}).encode())


# -- oversized and stalled bodies -----------------------------------------------------------------------

def test_oversized_body_is_400_from_its_head_and_closes(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                     % (MAX_BODY + 1) + bytes(1 << 16))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head
    assert json.loads(body) == {"error": f"Request body size of {MAX_BODY + 1} bytes exceeds the maximum "
                                         f"allowed value of {MAX_BODY} bytes"}


@pytest.mark.parametrize("stall", ["half a body", "half a head"])
def test_stalled_request_is_closed_after_the_read_timeout(server: Server, stall: str) -> None:
    """The stalled connection is closed between the timeout and 1.25 times it (plus scheduling slack),
    while requests on other connections are answered throughout."""
    served: list[int] = []
    stop = threading.Event()

    def good_traffic() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                served.append(client.post(f"{server.url}/v2/models/identity/infer",
                                          content=_GOOD.partition(b"\r\n\r\n")[2]).status_code)
                time.sleep(0.02)

    thread = threading.Thread(target=good_traffic)
    thread.start()
    try:
        with _connect(server) as sock:
            sock.settimeout(READ_TIMEOUT_S * 5)
            sent = _GOOD[:len(_GOOD) - 10] if stall == "half a body" else _GOOD[:30]
            sock.sendall(sent)
            started = time.monotonic()
            assert sock.recv(65536) == b""  # closed without an answer
            waited = time.monotonic() - started
    finally:
        stop.set()
        thread.join(10)
    assert READ_TIMEOUT_S * 0.9 <= waited <= READ_TIMEOUT_S * 1.25 + 0.5, waited
    assert len(served) > 10 and set(served) == {200}


def test_idle_kept_alive_connection_outlives_the_read_timeout(server: Server) -> None:
    """Between requests a connection may wait as long as it likes: only a partial request times out."""
    with _connect(server) as sock:
        for _ in range(2):
            sock.sendall(_GOOD)
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 ")
            time.sleep(READ_TIMEOUT_S * 2)


def test_read_timeout_flag_is_checked() -> None:
    done = subprocess.run([sys.executable, "-m", "servers.triton", "--http-port", "0", "--http-read-timeout", "0"],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "--http-read-timeout must be > 0, got 0.0" in done.stderr


# -- compression ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_encoding", [None, "gzip", "deflate"])
@pytest.mark.parametrize("response_encoding", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_compressed_requests_and_responses_equal_plain_ones(server: Server, request_encoding: str | None,
                                                           response_encoding: str | None, binary: bool) -> None:
    client = httpclient.InferenceServerClient(_address(server))
    floats = np.random.default_rng(3).standard_normal((3, 40)).astype(np.float32)
    words = np.array([[f"w{i}-{j}".encode() * (j + 1) for j in range(4)] for i in range(2)], dtype=object)
    try:
        for model, data, datatype in (("identity", floats, "FP32"), ("identity_bytes", words, "BYTES")):
            plain = _infer(client, model, data, datatype, binary)
            got = _infer(client, model, data, datatype, binary, request_encoding, response_encoding)
            assert got.shape == plain.shape == data.shape
            assert got.tolist() == plain.tolist()
            if datatype == "FP32":
                np.testing.assert_array_equal(got, data)
    finally:
        client.close()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_response_framing(server: Server, encoding: str) -> None:
    """Content-Length counts the compressed bytes; Inference-Header-Content-Length the JSON part of the
    decompressed body, as tritonclient reads it."""
    data = np.arange(64, dtype=np.float32)
    head = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 64],
                                   "parameters": {"binary_data_size": 256}}],
                       "parameters": {"binary_data_output": True}}).encode()
    reply = httpx.post(f"{server.url}/v2/models/identity/infer", content=head + data.tobytes(),
                       headers={"Inference-Header-Content-Length": str(len(head)),
                                "Accept-Encoding": f"br;q=0.9, {encoding}"})
    assert reply.status_code == 200 and reply.headers["content-encoding"] == encoding
    raw = reply.read()  # httpx decodes gzip and deflate itself: compare with the wire length
    wire = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    assert abs(int(reply.headers["content-length"]) - len(wire)) < 64
    length = int(reply.headers["inference-header-content-length"])
    assert json.loads(raw[:length])["outputs"][0]["parameters"] == {"binary_data_size": 256}
    np.testing.assert_array_equal(np.frombuffer(raw[length:], "<f4"), data)
    assert int(reply.headers["content-length"]) < len(raw)


@pytest.mark.parametrize(("encoding", "body", "error"), [
    ("br", b"\x0b\x02\x80hi\x03", "Unsupported compression type"),
    ("gzip", b"\x1f\x8b not really gzip", "failed to decompress the gzip request body"),
    ("deflate", zlib.compress(b'{"inputs": []}')[:-6], "failed to decompress the deflate request body"),
    ("gzip", gzip.compress(b"{}", mtime=0) + b"junk", "failed to decompress the gzip request body"),
])
def test_bad_encodings_get_400_and_the_connection_goes_on(server: Server, encoding: str, body: bytes,
                                                          error: str) -> None:
    request = _post("/v2/models/identity/infer", body, f"Content-Encoding: {encoding}")
    (status, headers, answer), (good_status, _, good) = _raw_exchange(server, request, _GOOD)
    assert status == 400 and error in json.loads(answer)["error"]
    if encoding == "br":
        assert headers["accept-encoding"] == "gzip, deflate"
    assert good_status == 200 and json.loads(good)["outputs"][0]["data"] == [1.5, 2.5]


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_zip_bomb_is_refused_without_inflating_it(server: Server) -> None:
    """512 MiB of zeros in half a MiB of gzip: refused once past the 64 MiB body limit, and the server's
    peak memory grows by about that limit, not by the bomb."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(512)) + compressor.flush()
    assert len(bomb) < MAX_BODY // 64
    before = _peak_rss_kib(server.proc.pid)
    request = _post("/v2/models/identity/infer", bomb, "Content-Encoding: gzip")
    (status, _, answer), (good_status, _, _) = _raw_exchange(server, request, _GOOD)
    assert status == 400
    assert f"exceeds the maximum allowed value of {MAX_BODY} bytes" in json.loads(answer)["error"]
    assert good_status == 200
    assert (_peak_rss_kib(server.proc.pid) - before) * 1024 < 3 * MAX_BODY


# -- raw requests ---------------------------------------------------------------------------------------

def _raw(server: Server, model: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/infer", content=body,
                      headers={"Inference-Header-Content-Length": "0", **headers}, timeout=10)


@pytest.mark.parametrize("count", [0, 1, 37])
def test_raw_request_to_identity_answers_the_input(server: Server, count: int) -> None:
    data = np.random.default_rng(count).standard_normal(count).astype(np.float32)
    reply = _raw(server, "identity", data.tobytes())
    assert reply.status_code == 200, reply.text
    length = int(reply.headers["inference-header-content-length"])
    assert reply.headers["content-type"] == "application/octet-stream"
    output = json.loads(reply.content[:length])["outputs"][0]
    assert output["shape"] == [1, count] and output["parameters"] == {"binary_data_size": 4 * count}
    np.testing.assert_array_equal(np.frombuffer(reply.content[length:], "<f4"), data)


def test_raw_request_compressed_both_ways(server: Server) -> None:
    data = np.arange(100, dtype=np.float32)
    reply = _raw(server, "identity", gzip.compress(data.tobytes()), **{"Content-Encoding": "gzip",
                                                                        "Accept-Encoding": "deflate"})
    assert reply.status_code == 200 and reply.headers["content-encoding"] == "deflate"
    length = int(reply.headers["inference-header-content-length"])
    np.testing.assert_array_equal(np.frombuffer(reply.content[length:], "<f4"), data)


def test_raw_bytes_request_is_one_element(server: Server) -> None:
    reply = _raw(server, "identity_one", b"427 and more")
    assert reply.status_code == 200, reply.text
    length = int(reply.headers["inference-header-content-length"])
    output = json.loads(reply.content[:length])["outputs"][0]
    assert output["shape"] == [1, 1] and output["datatype"] == "BYTES"
    assert reply.content[length:] == struct.pack("<I", 12) + b"427 and more"


@pytest.mark.parametrize(("model", "body", "error"), [
    ("add_sub", np.zeros(16, np.float32).tobytes(),
     "Raw request must only have 1 input (found 1) to be deduced but got 2 inputs in 'add_sub' model configuration"),
    ("identity", b"\0" * 7, "raw input 'INPUT0' has 7 bytes, not a whole number of FP32 elements"),
    ("identity_bytes", b"427", "For BYTE datatype raw input 'INPUT0', the model must have input shape [1]"),
])
def test_raw_requests_a_model_cannot_take_are_400(server: Server, model: str, body: bytes, error: str) -> None:
    reply = _raw(server, model, body)
    assert reply.status_code == 400 and error in reply.json()["error"]
    assert _raw(server, "identity", b"\0" * 8).status_code == 200


# -- load parameters ------------------------------------------------------------------------------------

def _identity_onnx(width: int) -> bytes:
    """An ONNX graph Y = Identity(X), FP32 [batch, width]."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])], "identity",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", width])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _load(server: Server, name: str, parameters: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/repository/models/{name}/load", json={"parameters": parameters}, timeout=60)


def test_config_parameter_overrides_the_repository_config(server: Server) -> None:
    client = httpclient.InferenceServerClient(_address(server))
    data = np.ones((3, 2), np.float32)
    try:
        config = client.get_model_config("identity")
        assert config["max_batch_size"] == 8
        client.load_model("identity", config=json.dumps({**config, "max_batch_size": 2}))
        assert client.get_model_config("identity")["max_batch_size"] == 2
        np.testing.assert_array_equal(_infer(client, "identity", data[:2], "FP32", True), data[:2])
        with pytest.raises(Exception, match="batch-size must be <= 2"):
            _infer(client, "identity", data, "FP32", True)
        client.load_model("identity")  # no parameters: the repository's folder again
        assert client.get_model_config("identity")["max_batch_size"] == 8
        np.testing.assert_array_equal(_infer(client, "identity", data, "FP32", True), data)
    finally:
        client.load_model("identity")
        client.close()


def test_files_parameters_load_a_model_from_nothing_but_the_request(server: Server) -> None:
    """An ONNX model the repository does not have: its folder is the request's files, its config the
    'config' parameter (inputs and outputs completed from the graph). tritonclient 2.73.0's
    load_model(files=...) cannot send this (it puts base64 bytes in json.dumps), so httpx sends the
    body it means to."""
    config = {"backend": "onnxruntime", "max_batch_size": 4}
    reply = _load(server, "from_files", {"config": json.dumps(config),
                                         "file:1/model.onnx": base64.b64encode(_identity_onnx(3)).decode()})
    assert reply.status_code == 200, reply.text
    folders = [path for path in Path(tempfile.gettempdir()).glob("triton-load-*") if (path / "from_files").is_dir()]
    assert len(folders) == 1 and (folders[0] / "from_files" / "1" / "model.onnx").is_file()
    client = httpclient.InferenceServerClient(_address(server))
    try:
        metadata = client.get_model_metadata("from_files")
        assert metadata["platform"] == "onnxruntime_onnx" and metadata["inputs"][0]["shape"] == [-1, 3]
        data = np.arange(12, dtype=np.float32).reshape(4, 3)
        tensor = httpclient.InferInput("X", [4, 3], "FP32")
        tensor.set_data_from_numpy(data)
        np.testing.assert_array_equal(client.infer("from_files", [tensor]).as_numpy("Y"), data)
        client.unload_model("from_files")
        assert not client.is_model_ready("from_files")
        assert not folders[0].exists()  # the temporary folder goes with the model
    finally:
        client.close()


@pytest.mark.parametrize(("parameters", "error"), [
    ({"config": "{not json"}, "load parameter 'config' is not a ModelConfig in JSON"),
    ({"config": '{"max_batch_size": "many"}'}, "load parameter 'config' is not a ModelConfig in JSON"),
    ({"config": {"max_batch_size": 2}}, "load parameter 'config' must be a string"),
    ({"config": "{}", "file:1/model.onnx": "not base64!"}, "load parameter 'file:1/model.onnx' is not valid base64"),
    ({"file:1/model.onnx": "AAAA"}, "load parameter 'file:1/model.onnx' needs the 'config' parameter too"),
    ({"config": "{}", "file:../escape/model.onnx": "AAAA"}, "load parameter 'file:../escape/model.onnx': the path"),
    ({"config": "{}", "file:model.onnx": "AAAA"}, "load parameter 'file:model.onnx': the path"),
    ({"cofnig": "{}"}, "load parameter 'cofnig' is not supported"),
])
def test_bad_load_parameters_are_400_naming_the_parameter(server: Server, parameters: dict, error: str) -> None:
    reply = _load(server, "identity", parameters)
    assert reply.status_code == 400 and error in reply.json()["error"], reply.text
    assert httpx.get(f"{server.url}/v2/models/identity/ready").status_code == 200
    assert httpx.post(f"{server.url}/v2/models/identity/infer",
                      content=_GOOD.partition(b"\r\n\r\n")[2]).status_code == 200


def test_a_config_the_model_cannot_load_with_keeps_the_serving_version(server: Server) -> None:
    config = httpx.get(f"{server.url}/v2/models/identity_bytes/config").json()
    reply = _load(server, "identity_bytes", {"config": json.dumps({**config, "backend": "tensorflow"})})
    assert reply.status_code == 400 and "backend 'tensorflow' is not supported" in reply.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/identity_bytes/ready").status_code == 200


# -- in process: every kind of reply compresses ---------------------------------------------------------

class _Pooled(Identity):
    """The built-in identity, run in the worker pool (a Job) instead of inline."""

    inline = False


@pytest.mark.parametrize("model", [Identity("inline"), _Pooled("pooled")], ids=["inline", "job"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_inline_and_job_replies_are_compressed(model: Identity, encoding: str) -> None:
    app = TritonApp({model.name: model})
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]})
    packed = gzip.compress(body.encode()) if encoding == "gzip" else zlib.compress(body.encode())
    request = Request("POST", f"/v2/models/{model.name}/infer", "HTTP/1.1",
                      {"content-encoding": encoding, "accept-encoding": encoding}, packed)
    outcome = app.handle(request)
    reply = outcome if isinstance(outcome, Reply) else outcome()
    assert isinstance(outcome, Reply) == model.inline
    assert reply.status == 200 and f"Content-Encoding: {encoding}\r\n" in reply.headers
    plain = gzip.decompress(reply.body) if encoding == "gzip" else zlib.decompress(reply.body)
    assert json.loads(plain)["outputs"][0]["data"] == [1.0, 2.0, 3.0]
    failed = app.handle(Request("POST", f"/v2/models/{model.name}/infer", "HTTP/1.1",
                                {"accept-encoding": encoding}, b'{"inputs": []}'))
    failed = failed if isinstance(failed, Reply) else failed()
    assert failed.status == 400 and "Content-Encoding" not in failed.headers  # errors go out plain
    assert "expected 1 inputs" in json.loads(failed.body)["error"]


def test_grpc_load_parameters_make_the_same_load(server: Server) -> None:
    """RepositoryModelLoad's parameters over real gRPC (tritonclient.grpc: config a string_param, files
    bytes_param): the model loads from them and serves; a bad config is INVALID_ARGUMENT naming it."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.fronts["grpc"])
    try:
        client.load_model("over_grpc", config=json.dumps({"backend": "onnxruntime", "max_batch_size": 2}),
                          files={"file:1/model.onnx": _identity_onnx(5)})
        data = np.arange(10, dtype=np.float32).reshape(2, 5)
        infer_input = grpcclient.InferInput("X", [2, 5], "FP32")
        infer_input.set_data_from_numpy(data)
        np.testing.assert_array_equal(client.infer("over_grpc", [infer_input]).as_numpy("Y"), data)
        with pytest.raises(InferenceServerException, match="config"):
            client.load_model("over_grpc", config="{not json")
        assert client.is_model_ready("over_grpc")  # a refused reload keeps the serving version
        client.unload_model("over_grpc")
    finally:
        client.close()
