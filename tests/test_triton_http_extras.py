"""servers/triton's HTTP extras against a real server: compression, raw requests, oversized and stalled
bodies (integration).

One server per module serves a `make-repo` repository in explicit mode (identity, identity_bytes,
add_sub, and identity_one: identity_bytes declared [1], the only shape a raw BYTES request may have)
with a 1 s read timeout. Compression is judged by tritonclient's own request and response compression
(gzip and deflate): the outputs must equal the uncompressed ones. Raw requests go out with httpx,
stalled and oversized bodies over raw sockets.
"""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from servers.models.make_repo import make_repo
from tests.conftest import ROOT, Server, start_server, stop_process

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 1.0
MAX_BODY = 64 * 1024 * 1024
_LOADED = ("identity", "identity_bytes", "identity_one", "add_sub")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    make_repo(root)
    one = root / "identity_one"
    shutil.copytree(root / "identity_bytes", one)
    config = (one / "config.pbtxt").read_text().replace('"identity_bytes"', '"identity_one"')
    (one / "config.pbtxt").write_text(config.replace("dims: [ -1 ]", "dims: [ 1 ]"))
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Server]:
    loads = [arg for name in _LOADED for arg in ("--load-model", name)]
    started = start_server(["--model-repository", str(repository), "--model-control-mode", "explicit", *loads,
                            "--http-read-timeout", str(READ_TIMEOUT_S)],
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


