"""servers/triton under bad input: every bad request gets its error, every good one beside it its answer.

One server process (HTTP and gRPC, port 0, built-in models) serves the module. Bad requests go out over
raw sockets (HTTP) and a bare gRPC channel: wrong shape, datatype, missing input, malformed JSON, an
Inference-Header-Content-Length past the body, unknown model and version, an oversized body, a
truncated body, garbage instead of HTTP, and bad ModelInfer messages. Each must come back with its
status (a 4xx, or a gRPC code) and Triton's error body {"error": "..."} naming the problem; a bad
request that does not break HTTP framing leaves the connection usable (a good request pipelined
behind it is answered), one that does is answered and the connection closed, as Triton does.

The load test sends all of them, over and over for two seconds, while tritonclient HTTP and gRPC
clients run good requests against mlp and identity in a loop, each answer compared with the model run
in this process; every good request must succeed, the server must stay up, and its statistics must
count exactly the failures that reached a model and the successes that were sent.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
import tritonclient.http as tritonclient_http
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.processes import POLL, stop_process
from tests.support.triton import MODELS, Fronts, assert_matches, sample_input, start_fronts

pytestmark = pytest.mark.integration

MAX_BODY = 64 * 1024 * 1024  # Triton's --http-max-input-size default (PROTOCOLS.md 1.1)
LOAD_SECONDS = 2.0  # the load test sends the whole set of bad requests again until this long has passed


@pytest.fixture(scope="module")
def fronts() -> Iterator[Fronts]:
    started = start_fronts()
    yield started
    stop_process(started.proc)
    assert "Traceback" not in started.proc.stderr.read()  # no bad request may crash a handler


# -- HTTP over raw sockets -------------------------------------------------------------------------------

def _infer_request(model: str, body: bytes, *headers: str, path: str = "") -> bytes:
    lines = [f"POST {path or f'/v2/models/{model}/infer'} HTTP/1.1", "Host: triton",
             f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _json_body(inputs: list[dict], **extra: object) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def _fp32(model: str, shape: list[int], data: list | None = None, **fields: object) -> dict:
    tensor = {"name": "INPUT0", "datatype": "FP32", "shape": shape, **fields}
    if data is not None or "parameters" not in fields:
        tensor["data"] = data if data is not None else [0.5] * int(np.prod(shape))
    return tensor


def _binary(model: str, header: dict, blob: bytes, header_length: int | None = None) -> bytes:
    head = json.dumps(header).encode()
    length = len(head) if header_length is None else header_length
    return _infer_request(model, head + blob, f"Inference-Header-Content-Length: {length}")


def _good_json(model: str) -> tuple[bytes, np.ndarray]:
    """A valid JSON infer request for `model`, and the input it carries."""
    data = sample_input(model, 2)
    return _infer_request(model, _json_body([_fp32(model, list(data.shape), data.ravel().tolist())])), data


@dataclass(frozen=True)
class HttpCase:
    """A bad request as raw bytes and what the server must answer.

    `model` is the model whose failure count it adds to (None: it never reaches one); `closes` says the
    request breaks HTTP framing, so the server answers and closes; otherwise a good request pipelined
    on the same connection must be answered after it.
    """

    name: str
    request: bytes
    status: int
    error: str
    model: str | None = None
    closes: bool = False


_SHORT_BLOB = np.zeros(2, "<f4").tobytes()
HTTP_CASES = [
    HttpCase("wrong shape", _infer_request("mlp", _json_body([_fp32("mlp", [1, 15])])), 400,
             "unexpected shape for input 'INPUT0' for model 'mlp'. Expected [-1,16], got [1,15]", "mlp"),
    HttpCase("wrong datatype", _infer_request("mlp", _json_body(
        [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}])), 400,
        "inference input 'INPUT0' data-type is 'INT32', but model 'mlp' expects 'FP32'", "mlp"),
    HttpCase("missing input", _infer_request("identity", _json_body([])), 400,
             "expected 1 inputs but got 0 inputs for model 'identity'", "identity"),
    HttpCase("malformed JSON", _infer_request("mlp", b'{"inputs": [{"name": "INPUT0", '), 400,
             "failed to parse the request JSON buffer", "mlp"),
    HttpCase("JSON that is not an object", _infer_request("identity", b"[1, 2]"), 400,
             "must be an object with an 'inputs' array", "identity"),
    HttpCase("header length past the body",
             _binary("identity", {"inputs": [_fp32("identity", [1, 2], parameters={"binary_data_size": 8})]},
                     _SHORT_BLOB, header_length=4096), 400,
             "Inference-Header-Content-Length 4096 exceeds the body", "identity"),
    HttpCase("header length not a number",
             _infer_request("identity", b"{}", "Inference-Header-Content-Length: 12abc"), 400,
             "Unable to parse Inference-Header-Content-Length, got: 12abc", "identity"),
    HttpCase("binary data shorter than declared",
             _binary("identity", {"inputs": [_fp32("identity", [1, 5], parameters={"binary_data_size": 20})]},
                     _SHORT_BLOB), 400,
             "unexpected size for input 'INPUT0', expecting 12 additional bytes for model 'identity'", "identity"),
    HttpCase("binary data nobody claims",
             _binary("identity", {"inputs": [_fp32("identity", [1, 1], parameters={"binary_data_size": 4})]},
                     _SHORT_BLOB), 400, "unexpected additional input data for model 'identity'", "identity"),
    HttpCase("binary size that does not fit the shape",
             _binary("mlp", {"inputs": [_fp32("mlp", [1, 16], parameters={"binary_data_size": 8})]},
                     _SHORT_BLOB), 400, "input 'INPUT0' has 8 bytes of binary data", "mlp"),
    HttpCase("element count past int64",
             _binary("identity", {"inputs": [_fp32("identity", [4, 2**62], parameters={"binary_data_size": 0})]},
                     b""), 400, "more than 9223372036854775807 elements", "identity"),
    HttpCase("booleans for FP32", _infer_request("mlp", _json_body([_fp32("mlp", [1, 16], [True] * 16)])), 400,
             "input 'INPUT0' data does not fit FP32: its elements must be JSON numbers, got a boolean", "mlp"),
    HttpCase("strings for FP32", _infer_request("identity", _json_body([_fp32("identity", [1, 2], ["a", "b"])])),
             400, "its elements must be JSON numbers, got a string", "identity"),
    HttpCase("fewer elements than the shape", _infer_request("mlp", _json_body([_fp32("mlp", [2, 16], [0.0] * 16)])),
             400, "unexpected number of elements for input 'INPUT0': shape [2, 16] needs 32, data has 16", "mlp"),
    HttpCase("same input twice", _infer_request("identity", _json_body([_fp32("identity", [1, 3])] * 2)), 400,
             "input 'INPUT0' already exists in request", "identity"),
    HttpCase("unknown input", _infer_request("identity", _json_body(
        [{"name": "INPUT9", "datatype": "FP32", "shape": [1, 1], "data": [1]}])), 400,
        "unexpected inference input 'INPUT9' for model 'identity'", "identity"),
    HttpCase("id that is not a string", _infer_request("mlp", _json_body([_fp32("mlp", [1, 16])], id={"a": 1})),
             400, "Unable to parse 'id': expected a JSON string, got an object", "mlp"),
    HttpCase("output name that is not a string",
             _infer_request("mlp", _json_body([_fp32("mlp", [1, 16])], outputs=[{"name": ["OUTPUT0"]}])), 400,
             "Unable to parse 'name' of a requested output", "mlp"),
    HttpCase("unknown output", _infer_request("mlp", _json_body([_fp32("mlp", [1, 16])], outputs=[{"name": "X"}])),
             400, "unexpected inference output 'X' for model 'mlp'", "mlp"),
    HttpCase("batch larger than the model takes", _infer_request("mlp", _json_body([_fp32("mlp", [33, 16])])), 400,
             "inference request batch-size must be <= 32 for 'mlp'", "mlp"),
    HttpCase("unknown model", _infer_request("nope", _json_body([_fp32("nope", [1, 1])])), 404,
             "Request for unknown model: 'nope' is not found"),
    HttpCase("unknown version", _infer_request("mlp", _json_body([_fp32("mlp", [1, 16])]),
                                               path="/v2/models/mlp/versions/9/infer"), 404,
             "Request for unknown model: 'mlp' version 9 is not found"),
    HttpCase("unknown path", b"GET /v2/nowhere HTTP/1.1\r\nHost: triton\r\n\r\n", 404, "Not Found"),
    HttpCase("infer with GET", b"GET /v2/models/mlp/infer HTTP/1.1\r\nHost: triton\r\n\r\n", 405,
             "Method Not Allowed"),
    HttpCase("oversized body", b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: triton\r\nContent-Length: %d\r\n\r\n"
             % (MAX_BODY + 1) + b"\0" * 65536, 400,
             f"Request body size of {MAX_BODY + 1} bytes exceeds the maximum allowed value of {MAX_BODY} bytes",
             closes=True),
    HttpCase("Content-Length not a number",
             b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: triton\r\nContent-Length: -5\r\n\r\n", 400,
             "invalid Content-Length: '-5'", closes=True),
    HttpCase("garbage bytes", bytes([0x16]) + random.Random(7).randbytes(4096), 400, "malformed request line",
             closes=True),
    HttpCase("TLS hello on the HTTP port", bytes.fromhex("160301020001000200fc0303") + bytes(64), 400,
             "malformed request line", closes=True),
    HttpCase("request line without a version", b"GET /v2/health/live\r\nHost: triton\r\n\r\n", 400,
             "malformed request line: 'GET /v2/health/live'", closes=True),
    HttpCase("header line without a colon", b"GET /v2 HTTP/1.1\r\nno colon here\r\n\r\n", 400,
             "malformed header line: 'no colon here'", closes=True),
    HttpCase("head past 64 KiB", b"GET /v2 HTTP/1.1\r\nX-Pad: " + b"a" * (65 * 1024), 431,
             "request head longer than 65536 bytes", closes=True),
]


class _Responses:
    """HTTP/1.1 responses read off one socket, one at a time (framed by Content-Length)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _fill(self) -> bool:
        chunk = self._sock.recv(65536)
        self._buffer += chunk
        return bool(chunk)

    def next(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill():
                raise ConnectionError(f"connection closed before a response: {self._buffer[:200]!r}")
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self._buffer) < length:
            if not self._fill():
                raise ConnectionError("connection closed inside a response body")
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        """True when the server closes with nothing more to say (EOF, or a reset after its answer)."""
        try:
            return not self._fill() and not self._buffer
        except ConnectionResetError:
            return not self._buffer


def _connect(fronts: Fronts) -> socket.socket:
    host, port = fronts.http_url.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _error_of(status: int, headers: dict[str, str], body: bytes, case: HttpCase) -> str:
    """'' when the answer is the case's error, else what is wrong with it."""
    if status != case.status:
        return f"{case.name}: status {status}, wanted {case.status}: {body[:300]!r}"
    if not headers.get("content-type", "").startswith("application/json"):
        return f"{case.name}: content type {headers.get('content-type')!r}"
    try:
        answer = json.loads(body)
    except ValueError:
        return f"{case.name}: body is not JSON: {body[:300]!r}"
    if set(answer) != {"error"} or not isinstance(answer["error"], str) or case.error not in answer["error"]:
        return f"{case.name}: body {answer!r} does not name {case.error!r}"
    return ""


def send_http_case(fronts: Fronts, case: HttpCase) -> tuple[list[str], str | None]:
    """Send one bad request (plus a good one pipelined behind it unless the case closes the connection);
    returns the problems found and the model that answered the good request."""
    good, data = _good_json("mlp" if case.model != "mlp" else "identity")
    good_model = "identity" if case.model == "mlp" else "mlp"
    with _connect(fronts) as sock:
        sock.sendall(case.request if case.closes else case.request + good)
        responses = _Responses(sock)
        status, headers, body = responses.next()
        problems = [_error_of(status, headers, body, case)]
        if case.closes:
            if headers.get("connection", "").lower() != "close":
                problems.append(f"{case.name}: answered without Connection: close")
            if not responses.closed():
                problems.append(f"{case.name}: the connection stayed open after a framing error")
            return [problem for problem in problems if problem], None
        status, _, body = responses.next()
        if status != 200:
            problems.append(f"{case.name}: the good request behind it got {status}: {body[:300]!r}")
        else:
            try:
                output = json.loads(body)["outputs"][0]
                got = np.array(output["data"], np.float32).reshape(output["shape"])
                assert_matches(good_model, got, data)
            except (AssertionError, KeyError, ValueError) as exc:
                problems.append(f"{case.name}: the good request behind it got a wrong answer: {exc}")
    return [problem for problem in problems if problem], good_model


def send_truncated_body(fronts: Fronts, half_close: bool) -> list[str]:
    """A body shorter than its Content-Length, then the client closes (or half-closes and waits):
    the server must neither answer nor count it, and must close its side."""
    good, _ = _good_json("mlp")
    head, _, body = good.partition(b"\r\n\r\n")
    with _connect(fronts) as sock:
        sock.sendall(head.replace(b"Content-Length: ", b"Content-Length: 9") + b"\r\n\r\n" + body[:40])
        if not half_close:
            return []
        sock.shutdown(socket.SHUT_WR)
        if not _Responses(sock).closed():
            return ["truncated body: the server answered or kept the connection after the client's EOF"]
    return []


# -- gRPC ------------------------------------------------------------------------------------------------

def _message(model: str, shape: list[int], datatype: str = "FP32", raw: list[bytes] | None = None,
             version: str = "", names: tuple[str, ...] = ("INPUT0",)) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for name in names:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is None:
        raw = [np.zeros(shape, np.float32).tobytes()] * len(names)
    message.raw_input_contents.extend(raw)
    return message


@dataclass(frozen=True)
class GrpcCase:
    """A bad ModelInfer message and the status it must get; `model` as in HttpCase."""

    name: str
    message: service_pb2.ModelInferRequest | bytes
    code: grpc.StatusCode
    error: str
    model: str | None = None


GRPC_CASES = [
    GrpcCase("wrong shape", _message("mlp", [1, 15]), grpc.StatusCode.INVALID_ARGUMENT,
             "unexpected shape for input 'INPUT0' for model 'mlp'. Expected [-1,16], got [1,15]", "mlp"),
    GrpcCase("raw contents of the wrong size", _message("mlp", [1, 16], raw=[b"\0" * 60]),
             grpc.StatusCode.INVALID_ARGUMENT, "input 'INPUT0' has 60 bytes of binary data; shape [1, 16] of "
             "FP32 needs 64", "mlp"),
    GrpcCase("raw contents not one per input", _message("identity", [1, 2], raw=[b"\0" * 8] * 2),
             grpc.StatusCode.INVALID_ARGUMENT, "expected 1 raw_input_contents entries, one per input, got 2",
             "identity"),
    GrpcCase("wrong datatype", _message("identity", [1, 2], datatype="INT64", raw=[b"\0" * 16]),
             grpc.StatusCode.INVALID_ARGUMENT, "data-type is 'INT64', but model 'identity' expects 'FP32'",
             "identity"),
    GrpcCase("same input twice", _message("identity", [1, 2], names=("INPUT0", "INPUT0")),
             grpc.StatusCode.INVALID_ARGUMENT, "input 'INPUT0' already exists in request", "identity"),
    GrpcCase("element count past int64", _message("identity", [4, 2**62], raw=[b""]),
             grpc.StatusCode.INVALID_ARGUMENT, "more than 9223372036854775807 elements", "identity"),
    GrpcCase("no inputs", service_pb2.ModelInferRequest(model_name="mlp"), grpc.StatusCode.INVALID_ARGUMENT,
             "expected 1 inputs but got 0 inputs for model 'mlp'", "mlp"),
    GrpcCase("unknown model", _message("nope", [1, 16]), grpc.StatusCode.NOT_FOUND,
             "Request for unknown model: 'nope' is not found"),
    GrpcCase("unknown version", _message("mlp", [1, 16], version="9"), grpc.StatusCode.NOT_FOUND,
             "Request for unknown model: 'mlp' version 9 is not found"),
]
UNPARSABLE_MESSAGE = b"\x2a\x05\x12\x01"  # field 5 (inputs) says 5 bytes follow; 2 do


def _raw_infer(channel: grpc.Channel) -> Callable:
    return channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=lambda message: message if isinstance(message, bytes)
                               else message.SerializeToString(),
                               response_deserializer=service_pb2.ModelInferResponse.FromString)


def send_grpc_case(channel: grpc.Channel, case: GrpcCase) -> list[str]:
    try:
        _raw_infer(channel)(case.message, timeout=10)
    except grpc.RpcError as exc:
        if exc.code() != case.code or case.error not in (exc.details() or ""):
            return [f"grpc {case.name}: {exc.code()} {exc.details()!r}, wanted {case.code} naming {case.error!r}"]
        return []
    return [f"grpc {case.name}: succeeded"]


def send_unparsable_message(channel: grpc.Channel) -> list[str]:
    """Bytes that are no ModelInferRequest: refused with a status that says the message did not parse.

    grpc.aio answers UNKNOWN here (its handler sees the DecodeError); Triton, in C++, answers INTERNAL.
    """
    try:
        _raw_infer(channel)(UNPARSABLE_MESSAGE, timeout=10)
    except grpc.RpcError as exc:
        parse_error = exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                     grpc.StatusCode.INVALID_ARGUMENT) and "pars" in (exc.details() or "").lower()
        return [] if parse_error else [f"grpc unparsable message: {exc.code()} {exc.details()!r}"]
    return ["grpc unparsable message: succeeded"]


def send_stream_with_a_bad_request(channel: grpc.Channel) -> list[str]:
    """ModelStreamInfer: a bad request's error comes in error_message and the stream goes on."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    data = sample_input("mlp", 1)
    good = _message("mlp", [1, 16], raw=[data.tobytes()])
    answers = list(stub.ModelStreamInfer(iter([GRPC_CASES[0].message, good]), timeout=10))
    problems = []
    if len(answers) != 2 or GRPC_CASES[0].error not in answers[0].error_message:
        problems.append(f"grpc stream: first answer {answers[:1]!r}")
    elif answers[1].error_message:
        problems.append(f"grpc stream: the good request after the bad one failed: {answers[1].error_message}")
    else:
        got = np.frombuffer(answers[1].infer_response.raw_output_contents[0], "<f4").reshape(1, -1)
        try:
            assert_matches("mlp", got, data)
        except AssertionError as exc:
            problems.append(f"grpc stream: wrong answer after the bad request: {exc}")
    return problems


# -- statistics ------------------------------------------------------------------------------------------

def _counts(fronts: Fronts) -> dict[str, tuple[int, int]]:
    """(success, fail) request counts of each built-in model, from the statistics extension."""
    reply = POLL.get(f"http://{fronts.http_url}/v2/models/stats")
    reply.raise_for_status()
    return {entry["name"]: (entry["inference_stats"]["success"]["count"], entry["inference_stats"]["fail"]["count"])
            for entry in reply.json()["model_stats"] if entry["name"] in MODELS}


def _still_up(fronts: Fronts) -> None:
    assert fronts.proc.poll() is None, "the server exited"
    assert POLL.get(f"http://{fronts.http_url}/v2/health/live").status_code == 200
    client = tritonclient_grpc.InferenceServerClient(fronts.grpc_url)
    try:
        assert client.is_server_live()
    finally:
        client.close()


# -- one bad request at a time ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", HTTP_CASES, ids=lambda case: case.name)
def test_each_bad_http_request_gets_its_error(fronts: Fronts, case: HttpCase) -> None:
    before = _counts(fronts)
    problems, good_model = send_http_case(fronts, case)
    assert problems == []
    after = _counts(fronts)
    for name in MODELS:
        fails = int(name == case.model)
        successes = int(name == good_model)
        assert after[name] == (before[name][0] + successes, before[name][1] + fails), name
    _still_up(fronts)


@pytest.mark.parametrize("half_close", [False, True], ids=["client closes", "client half-closes"])
def test_truncated_body_is_dropped_uncounted(fronts: Fronts, half_close: bool) -> None:
    before = _counts(fronts)
    assert send_truncated_body(fronts, half_close) == []
    time.sleep(0.1)  # the server has seen the EOF
    assert _counts(fronts) == before
    _still_up(fronts)


@pytest.mark.parametrize("case", GRPC_CASES, ids=lambda case: case.name)
def test_each_bad_grpc_request_gets_its_status(fronts: Fronts, case: GrpcCase) -> None:
    before = _counts(fronts)
    with grpc.insecure_channel(fronts.grpc_url) as channel:
        assert send_grpc_case(channel, case) == []
    after = _counts(fronts)
    for name in MODELS:
        assert after[name] == (before[name][0], before[name][1] + int(name == case.model)), name
    _still_up(fronts)


def test_unparsable_grpc_message_and_a_bad_request_in_a_stream(fronts: Fronts) -> None:
    before = _counts(fronts)
    with grpc.insecure_channel(fronts.grpc_url) as channel:
        assert send_unparsable_message(channel) == []
        assert send_stream_with_a_bad_request(channel) == []
    assert _counts(fronts)["mlp"] == (before["mlp"][0] + 1, before["mlp"][1] + 1)
    _still_up(fronts)


# -- all of them, interleaved with good traffic ----------------------------------------------------------

@dataclass
class GoodTraffic:
    """One client thread sending valid requests until stopped; tallies successes by model."""

    name: str
    send: Callable[[str, np.ndarray], np.ndarray]
    done: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = random.Random(self.name)
        while not self.stop.is_set():
            model = rng.choice(["mlp", "identity"])
            data = sample_input(model, rng.randint(1, 4))
            try:
                assert_matches(model, self.send(model, data), data)
            except Exception as exc:  # noqa: BLE001 - every failure of a good request is reported
                self.failures.append(f"{self.name} {model}: {type(exc).__name__}: {exc}")
            else:
                self.done[model] += 1

    @property
    def total(self) -> int:
        return sum(self.done.values())


def _http_sender(fronts: Fronts, binary: bool) -> tuple[Callable[[str, np.ndarray], np.ndarray], Callable]:
    client = tritonclient_http.InferenceServerClient(fronts.http_url)

    def send(model: str, data: np.ndarray) -> np.ndarray:
        tensor = tritonclient_http.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data, binary_data=binary)
        output = tritonclient_http.InferRequestedOutput("OUTPUT0", binary_data=binary)
        return client.infer(model, [tensor], outputs=[output]).as_numpy("OUTPUT0")

    return send, client.close


def _grpc_sender(fronts: Fronts) -> tuple[Callable[[str, np.ndarray], np.ndarray], Callable]:
    client = tritonclient_grpc.InferenceServerClient(fronts.grpc_url)

    def send(model: str, data: np.ndarray) -> np.ndarray:
        tensor = tritonclient_grpc.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        return client.infer(model, [tensor]).as_numpy("OUTPUT0")

    return send, client.close


def _wait_for(traffic: list[GoodTraffic], each: int, timeout: float = 30.0) -> None:
    """Until every client has `each` more successes than now (or has failed)."""
    targets = [client.total + each for client in traffic]
    deadline = time.monotonic() + timeout
    while any(client.total < target and not client.failures for client, target in zip(traffic, targets)):
        assert time.monotonic() < deadline, [client.total for client in traffic]
        time.sleep(0.01)


def test_bad_requests_interleaved_with_good_traffic(fronts: Fronts) -> None:
    before = _counts(fronts)
    senders = {"http binary": _http_sender(fronts, True), "http json": _http_sender(fronts, False),
               "grpc": _grpc_sender(fronts)}
    traffic = [GoodTraffic(name, send) for name, (send, _) in senders.items()]
    threads = [threading.Thread(target=client.run, name=client.name) for client in traffic]
    problems: list[str] = []
    expected_fails: Counter = Counter()
    pipelined_goods: Counter = Counter()
    try:
        for thread in threads:
            thread.start()
        _wait_for(traffic, 5)  # good traffic flows before the first bad request
        started = [client.total for client in traffic]
        deadline = time.monotonic() + LOAD_SECONDS
        with grpc.insecure_channel(fronts.grpc_url) as channel:
            while time.monotonic() < deadline:
                for http_case, grpc_case in zip(HTTP_CASES, GRPC_CASES * len(HTTP_CASES)):
                    found, good_model = send_http_case(fronts, http_case)
                    problems += found
                    problems += send_grpc_case(channel, grpc_case)
                    expected_fails.update(name for name in (http_case.model, grpc_case.model) if name)
                    pipelined_goods.update([good_model] if good_model else [])
                problems += send_truncated_body(fronts, half_close=False)
                problems += send_truncated_body(fronts, half_close=True)
                problems += send_unparsable_message(channel)
                problems += send_stream_with_a_bad_request(channel)
                expected_fails["mlp"] += 1
                pipelined_goods["mlp"] += 1
        during = [client.total - count for client, count in zip(traffic, started)]
        _wait_for(traffic, 5)  # and goes on after the last one
    finally:
        for client in traffic:
            client.stop.set()
        for thread in threads:
            thread.join(30)
        for _, close in senders.values():
            close()
    assert problems == []
    assert [failure for client in traffic for failure in client.failures] == []
    assert all(count > 0 for count in during), during  # every client was sending while the bad ones went out
    _still_up(fronts)
    after = _counts(fronts)
    for name in MODELS:
        good = sum(client.done[name] for client in traffic) + pipelined_goods[name]
        assert after[name] == (before[name][0] + good, before[name][1] + expected_fails[name]), name
