"""servers/torchserve's limits (integration):

- the cap on open connections (--max-connections): within it a connection is served; beyond it the
  connection is answered 503 in TorchServe's error shape with the reason, and closed; the server goes on
  serving;
- max_request_size and max_response_size (config.properties, --max-request-size/--max-response-size
  over it), as TorchServe applies them: a request body over the limit is answered 413 with an empty body
  and the connection closed (HTTP), a request message over it RESOURCE_EXHAUSTED (gRPC); a handler's
  answer over max_response_size ends its worker (500 / INTERNAL "Worker died."), which is started again.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from loadgen.lowlevel.torchserve_proto import inference_pb2
from tests.support.processes import stop_process, wait_for
from tests.support.raw_http import read_answer
from tests.support.torchserve import Stubs, archive, start_torchserve

pytestmark = pytest.mark.integration

CAP = 3


def _ping(address: str) -> socket.socket:
    """A connection that sent GET /ping; its answer is still to be read."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")
    return sock


def test_a_connection_beyond_the_cap_gets_torchserves_503_and_is_closed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    server = start_torchserve(store, tmp_path, "--disable-token-auth", "--max-connections", str(CAP), grpc=False)
    held: list[socket.socket] = []
    try:
        url = server.server.url
        for _ in range(CAP):
            held.append(_ping(url))
            assert read_answer(held[-1])[0] == 200
        with _ping(url) as beyond:
            status, headers, body = read_answer(beyond)
            assert status == 503 and headers["connection"] == "close"
            assert json.loads(body) == {"code": 503, "type": "ServiceUnavailableException",
                                        "message": f"Too many open connections: the server's limit is {CAP} "
                                                   "(--max-connections)"}
            assert beyond.recv(65536) == b""
        for sock in held:  # the held ones are still served
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_answer(sock)[0] == 200
    finally:
        for sock in held:
            sock.close()
        stop_process(server.server.proc)
    assert "Traceback" not in server.server.proc.stderr.read()


SIZED_HANDLER = '''
"""Answers each request {"n": N} with N bytes of "x"."""
import json

from ts.torch_handler.base_handler import BaseHandler


class Sized(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        answers = []
        for row in data:
            body = row.get("body") or row.get("data")
            if isinstance(body, (bytes, bytearray, str)):
                body = json.loads(body)
            answers.append("x" * body["n"])
        return answers
'''

REQUEST_LIMIT = 100_000
RESPONSE_LIMIT = 50_000


def _sized_body(n: int, size: int) -> bytes:
    """A request {"n": N} padded with spaces to `size` bytes."""
    body = json.dumps({"n": n}).encode()
    return body + b" " * (size - len(body))


def test_requests_and_answers_over_the_size_limits_are_refused_as_torchserve_does(tmp_path: Path) -> None:
    """config.properties sets both limits to 1 MB; the flags set them to 100,000 and 50,000 bytes, and win.
    A body of exactly max_request_size is served and one byte more is refused (HTTP 413, empty, closed),
    on the management port as well; a gRPC request message over it is RESOURCE_EXHAUSTED. An answer of
    exactly max_response_size is served (HTTP and gRPC); one byte more ends the worker: 500 / INTERNAL
    "Worker died.", and the worker is started again and serves (so does a 3 MiB answer, judged from the
    length of the worker's message before it is read)."""
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "sized.py").write_text(SIZED_HANDLER)
    archive(store, "sized", tmp_path / "sized.py")
    server = start_torchserve(store, tmp_path, "--models", "sized=sized.mar", "--max-request-size",
                              str(REQUEST_LIMIT), "--max-response-size", str(RESPONSE_LIMIT),
                              config=["disable_token_authorization=true", "default_workers_per_model=1",
                                      "max_request_size=1000000", "max_response_size=1000000"])
    stubs = Stubs(server)
    try:
        url = f"{server.inference}/predictions/sized"
        served = httpx.post(url, content=_sized_body(RESPONSE_LIMIT, REQUEST_LIMIT), timeout=30)
        assert served.status_code == 200 and served.content == b"x" * RESPONSE_LIMIT
        for where, path in ((server.inference, "/predictions/sized"), (server.management, "/models")):
            host, port = where.removeprefix("http://").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {REQUEST_LIMIT + 1}\r\n\r\n"
                             .encode() + _sized_body(1, REQUEST_LIMIT + 1))
                status, headers, body = read_answer(sock)
                assert (status, headers.get("content-length"), body) == (413, "0", b""), where
                assert sock.recv(65536) == b"", where  # closed

        def predict(body: bytes) -> inference_pb2.PredictionResponse:
            return stubs.inference.Predictions(inference_pb2.PredictionsRequest(model_name="sized",
                                                                              input={"body": body}), timeout=30)

        assert predict(_sized_body(RESPONSE_LIMIT, REQUEST_LIMIT - 100)).prediction == b"x" * RESPONSE_LIMIT
        with pytest.raises(grpc.RpcError) as raised:
            predict(_sized_body(1, REQUEST_LIMIT))  # the message is the body and its envelope: over the limit
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        died = httpx.post(url, json={"n": RESPONSE_LIMIT + 1}, timeout=30)
        assert died.status_code == 500
        assert died.json() == {"code": 500, "type": "InternalServerException", "message": "Worker died."}

        def serves_again() -> bool:
            return httpx.post(url, json={"n": 3}, timeout=30).content == b"xxx"

        assert wait_for(serves_again, timeout=30)
        with pytest.raises(grpc.RpcError) as raised:
            predict(json.dumps({"n": RESPONSE_LIMIT + 1}).encode())
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert raised.value.details() == "Worker died.\norg.pytorch.serve.http.InternalServerException"
        assert wait_for(serves_again, timeout=30)
        huge = httpx.post(url, json={"n": 3 << 20}, timeout=30)  # judged from its message's length, unread
        assert (huge.status_code, huge.json()["message"]) == (500, "Worker died.")
        assert wait_for(serves_again, timeout=30)
    finally:
        stubs.close()
        stop_process(server.server.proc)
    said = server.server.proc.stderr.read()
    assert "Traceback" not in said
    assert said.count(f"answered {RESPONSE_LIMIT + 1} bytes, more than max_response_size {RESPONSE_LIMIT}") == 2, said
    assert said.count(f"more than max_response_size {RESPONSE_LIMIT}; stopping it") == 3, said


@pytest.mark.parametrize("flag", ["--max-request-size", "--max-response-size"])
def test_a_size_limit_below_one_byte_stops_the_start(flag: str) -> None:
    done = subprocess.run([sys.executable, "-m", "servers.torchserve", flag, "0"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2
    assert f"error: {flag} must be at least 1 byte, got 0" in done.stderr.splitlines(), done.stderr
