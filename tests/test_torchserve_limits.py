"""servers/torchserve's cap on open connections (--max-connections): within it a connection is served;
beyond it the connection is answered 503 in TorchServe's error shape with the reason, and closed; the
server goes on serving (integration)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.support.processes import stop_process
from tests.support.raw_http import read_answer
from tests.support.torchserve import start_torchserve

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
