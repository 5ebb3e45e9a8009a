"""--max-connections on the calibration server, the OpenAI mock and llm-sim (servers/core/connection.py's
cap, as the Triton- and TorchServe-compatible servers have it): with a cap of 2, two connections are
served, a third is answered 503 in the server's error shape and closed, the first two are still served,
and once one of them closes a new connection is served again. A cap below 1 exits 2 naming the flag.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from tests.support.processes import ROOT, start_server, stop_process
from tests.support.raw_http import read_answer

pytestmark = pytest.mark.integration

CAP = 2
_REASON = f"too many open connections: the server's limit is {CAP} (--max-connections)"
SERVERS = {
    # module: (a GET answered 200, the refusal's body)
    "servers.calibration": ("/v2/health/live", {"error": _REASON}),
    "servers.openai_mock": ("/v1/models", {"error": {"message": _REASON, "type": "server_error", "param": None,
                                                     "code": None}}),
    "servers.llm_sim": ("/v1/models", {"error": {"message": _REASON, "type": "server_error", "param": None,
                                                 "code": None}}),
}


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _get(sock: socket.socket, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET on `sock`: status, lower-case headers, body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return read_answer(sock)


@pytest.mark.parametrize("module", list(SERVERS))
def test_a_connection_beyond_the_cap_gets_503_and_is_closed_while_the_others_are_served(module: str) -> None:
    path, refusal = SERVERS[module]
    server = start_server(["--max-connections", str(CAP), "--no-keep-awake"], module=module)
    held: list[socket.socket] = []
    try:
        for _ in range(CAP):
            held.append(_connect(server.url))
            assert _get(held[-1], path)[0] == 200
        with _connect(server.url) as beyond:
            status, headers, body = _get(beyond, path)
            assert status == 503 and headers["connection"] == "close"
            assert json.loads(body) == refusal
            assert beyond.recv(65536) == b""
        for sock in held:  # the two within the cap are still served
            assert _get(sock, path)[0] == 200
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # once the server has seen it close, a new connection is served
            with _connect(server.url) as again:
                status = _get(again, path)[0]
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert status == 200
    finally:
        for sock in held:
            sock.close()
        stop_process(server.proc)
    stderr = server.proc.stderr.read()
    assert "Traceback" not in stderr
    assert stderr.count("--max-connections cap") == 1, stderr


@pytest.mark.parametrize("module", list(SERVERS))
def test_a_cap_below_one_is_refused_naming_the_flag(module: str) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--port", "0", "--max-connections", "0"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)
    assert done.returncode == 2
    assert "error: --max-connections must be >= 1, got 0" in done.stderr
