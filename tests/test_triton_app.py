"""Unit tests of servers/triton/_tensors.py and _app.py: wire codec, routes, worker-thread jobs, ordering."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from servers.core.http1 import Request
from servers.models.builtin import Identity, builtin_models
from servers.triton._app import Reply, TritonApp
from servers.triton._server import ServerContext, run_server
from servers.triton._tensors import (
    MAX_PLAN_HEAD_BYTES,
    PLAN_BYTES_PER_MODEL,
    InferError,
    encode_response,
    parse_infer,
    plan_bytes,
)

MODELS = builtin_models()


def _post(path: str, body: bytes, **headers: str) -> Request:
    return Request("POST", path, "HTTP/1.1", {k.replace("_", "-"): v for k, v in headers.items()}, body)


def test_binary_request_with_bytes_elements_and_id() -> None:
    blob = b"".join(struct.pack("<I", len(w)) + w for w in (b"ab", b"", b"xyz"))
    head = json.dumps({"id": "9", "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 3],
                                               "parameters": {"binary_data_size": len(blob)}}]}).encode()
    request = parse_infer(head + blob, str(len(head)), MODELS["identity_bytes"])
    assert request.id == "9" and request.batch_size == 1 and request.outputs == (("OUTPUT0", False),)
    assert request.inputs["INPUT0"].tolist() == [[b"ab", b"", b"xyz"]]


def test_binary_response_layout() -> None:
    model = MODELS["identity"]
    head = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}],
                       "parameters": {"binary_data_output": True}}).encode()
    request = parse_infer(head, None, model)
    body, length = encode_response(model, request, model.infer(request.inputs))
    meta = json.loads(body[:length])
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert np.frombuffer(body[length:], "<f4").tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(("body", "header", "message"), [
    (b'{"inputs": []}', None, "expected 1 inputs but got 0"),
    (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}]}', None, "unexpected inference input"),
    (b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1]}]}', None, "number of elements"),
    (b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": ["a"]}]}', None, "does not fit"),
    (b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1]}], "outputs": [{"name": "Y"}]}',
     None, "unexpected inference output 'Y'"),
    (b'{"inputs": []}', "0", "raw input 'INPUT0' has 14 bytes, not a whole number of FP32 elements"),
    (b'{"inputs": []}', "99", "exceeds the body"),
    (b'{"inputs": []}', "x", "Inference-Header-Content-Length"),
])
def test_bad_requests_raise_infer_error(body: bytes, header: str | None, message: str) -> None:
    with pytest.raises(InferError, match=message):
        parse_infer(body, header, MODELS["identity"])


def _padded_binary_request(pad: int) -> tuple[bytes, str]:
    """A binary identity request whose JSON header carries `pad` spaces: a distinct header per `pad`."""
    blob = np.arange(4, dtype="<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4],
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    head = b"{" + b" " * pad + head[1:]
    return head + blob, str(len(head))


def test_decoded_header_plans_are_bounded_by_bytes_not_count() -> None:
    """Clients choose their headers' sizes: distinct large headers never make the plans hold more than
    PLAN_BYTES_PER_MODEL, one over MAX_PLAN_HEAD_BYTES is not kept, and a usual one still is."""
    model = Identity()
    count = 2 * PLAN_BYTES_PER_MODEL // (MAX_PLAN_HEAD_BYTES // 2)  # heads worth twice the bound
    for index in range(count):
        body, header = _padded_binary_request(MAX_PLAN_HEAD_BYTES // 2 + index)
        assert parse_infer(body, header, model).inputs["INPUT0"].tolist() == [[0, 1, 2, 3]]
        assert plan_bytes(model) <= PLAN_BYTES_PER_MODEL
    assert plan_bytes(model) > PLAN_BYTES_PER_MODEL * 0.9  # kept up to the bound, the oldest dropped
    fresh = Identity()
    for pad in (MAX_PLAN_HEAD_BYTES + 1, 64 * MAX_PLAN_HEAD_BYTES):
        parse_infer(*_padded_binary_request(pad), fresh)
    assert plan_bytes(fresh) == 0
    body, header = _padded_binary_request(0)
    parse_infer(body, header, fresh)
    assert 0 < plan_bytes(fresh) < 2048
    assert parse_infer(body, header, fresh).inputs["INPUT0"].tolist() == [[0, 1, 2, 3]]  # from its plan


def test_huge_declared_bytes_shape_is_refused_before_allocating() -> None:
    head = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 10**12],
                                   "parameters": {"binary_data_size": 4}}]}).encode()
    with pytest.raises(InferError, match="too few"):
        parse_infer(head + b"\0\0\0\0", str(len(head)), MODELS["identity_bytes"])


def test_requested_output_subset_and_per_output_binary() -> None:
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [0] * 16}],
                       "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()
    assert parse_infer(body, None, MODELS["mlp"]).outputs == (("OUTPUT0", True),)


class _Slow(Identity):
    inline = False

    def infer(self, inputs):
        time.sleep(0.2)
        return super().infer(inputs)


def test_models_not_inline_become_jobs_that_count_queue_time() -> None:
    app = TritonApp({"slow": _Slow("slow")})
    body = b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [5]}]}'
    job = app.handle(_post("/v2/models/slow/infer", body))
    assert not isinstance(job, Reply)
    reply = job()
    assert reply.status == 200 and json.loads(reply.body)["outputs"][0]["data"] == [5.0]
    stats = app.host.stats["slow"].snapshot()["inference_stats"]
    assert stats["queue"]["count"] == 1 and stats["compute_infer"]["ns"] >= 200_000_000


def test_pipelined_replies_keep_request_order_across_worker_threads() -> None:
    app = TritonApp({"slow": _Slow("slow"), "identity": Identity()})
    ready, stop_box = threading.Event(), {}

    def serve() -> None:
        async def main() -> None:
            stop_box["stop"], stop_box["loop"] = asyncio.Event(), asyncio.get_running_loop()
            with ThreadPoolExecutor(2) as pool:
                await run_server(ServerContext(app, pool), "127.0.0.1", 0, stop_box["stop"],
                                 lambda host, port: (stop_box.__setitem__("port", port), ready.set()))
        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(5)
    body = b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [%d]}]}'
    requests = b""
    for model, value in (("slow", 1), ("identity", 2)):
        payload = body % value
        requests += (b"POST /v2/models/%s/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (model.encode(), len(payload))
                     + payload)
    try:
        with socket.create_connection(("127.0.0.1", stop_box["port"]), timeout=5) as sock:
            sock.sendall(requests)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    finally:
        stop_box["loop"].call_soon_threadsafe(stop_box["stop"].set)
        thread.join(5)
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert answer.index(b'"model_name":"slow"') < answer.index(b'"model_name":"identity"')
