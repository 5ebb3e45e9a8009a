"""servers/triton under overload and abuse: it answers what it cannot take, in Triton's error shape, and
keeps serving (integration).

- a model's bounded queue (dynamic_batching's default_queue_policy.max_queue_size): a request that finds
  it full is refused at once, HTTP 503 / gRPC UNAVAILABLE with Triton's "Exceeds maximum queue size",
  and counted as a failure in the model's statistics;
- --grpc-max-concurrent-rpcs: a call beyond the cap fails at once with RESOURCE_EXHAUSTED;
- --max-connections: with 2,000 idle connections open, a new one within the cap is served and one
  beyond it is answered 503 with the reason and closed;
- --http-read-timeout is a deadline for the whole request: a client that drips a byte every 50 ms is
  cut off at the deadline, not kept alive by its bytes; --http-idle-timeout closes a connection idle
  between requests.

The paced models are Python-backend identities that sleep 0.4 s a request on one instance, so the true
outcome of N simultaneous requests is known: one executes, the queue takes its limit, the rest are
refused (the first finishes 0.4 s after all have arrived, checked with HostNoise.assert_holds).
"""

from __future__ import annotations

import json
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.support.processes import stop_process
from tests.support.raw_http import read_answer
from tests.support.timing import HostNoise
from tests.support.triton import Fronts, start_fronts, write_paced_model

pytestmark = pytest.mark.integration

SERVICE_S = 0.4
READ_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 1.0
GRPC_CAP = 4
IDLE_CONNECTIONS = 2000


def _bounded_model(repository: Path, name: str, max_queue_size: int) -> None:
    """The paced model with batching (max_batch_size 1) and a queue of `max_queue_size` places."""
    write_paced_model(repository, SERVICE_S, 2, name=name)
    (repository / name / "config.pbtxt").write_text(
        f'backend: "python"\nmax_batch_size: 1\ninstance_group [ {{ count: 1 }} ]\n'
        f'input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 2 ] }} ]\n'
        f'output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2 ] }} ]\n'
        f'dynamic_batching {{ default_queue_policy {{ max_queue_size: {max_queue_size} }} }}\n')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fronts]:
    repository = tmp_path_factory.mktemp("repo")
    _bounded_model(repository, "bounded", 2)
    write_paced_model(repository, SERVICE_S, 2, name="paced")
    started = start_fronts("--model-repository", str(repository), "--allow-python-backend", "--http-read-timeout", str(READ_TIMEOUT_S),
                           "--http-idle-timeout", str(IDLE_TIMEOUT_S),
                           "--grpc-max-concurrent-rpcs", str(GRPC_CAP), timeout=60)
    yield started
    stop_process(started.proc)
    assert "Traceback" not in started.proc.stderr.read()


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _request(path: str, body: bytes = b"", method: str = "POST") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{length}\r\n".encode() + body


_INFER = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2],
                                 "data": [1.5, 2.5]}]}).encode()


_IDENTITY = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 5],
                                    "data": [1.0, 2.0, 3.0, 4.0, 5.0]}]}).encode()


def _simultaneously(count: int, call: Callable[[], object], prepare: Callable[[], object] | None = None,
                    ) -> list[object]:
    """`call()` from `count` threads released together (after each ran `prepare`); the results or errors."""
    barrier = threading.Barrier(count)

    def one() -> object:
        state = prepare() if prepare is not None else None
        barrier.wait(10)
        try:
            return call() if state is None else call(state)  # type: ignore[call-arg]
        except Exception as exc:  # noqa: BLE001 - the error is the outcome under test
            return exc

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: one(), range(count)))


def _fail_count(server: Fronts, model: str) -> int:
    with _connect(server.http_url) as sock:
        sock.sendall(_request(f"/v2/models/{model}/stats", method="GET"))
        status, _, body = read_answer(sock)
    assert status == 200
    return int(json.loads(body)["model_stats"][0]["inference_stats"]["fail"]["count"])


# -- bounded queue --------------------------------------------------------------------------------------

def test_http_request_beyond_the_queue_is_503_with_tritons_message(server: Fronts, host_noise: HostNoise) -> None:
    before = _fail_count(server, "bounded")

    def send(sock: socket.socket) -> int:
        with sock:
            sock.sendall(_request("/v2/models/bounded/infer", _INFER))
            status, _, body = read_answer(sock)
        if status == 503:
            assert json.loads(body) == {"error": "Exceeds maximum queue size"}
        else:
            assert status == 200, body
        return status

    statuses = _simultaneously(6, send, prepare=lambda: _connect(server.http_url))
    # one executes, two wait in the queue, three find it full (the first takes 0.4 s: all six have come)
    host_noise.assert_holds(sorted(statuses) == [200] * 3 + [503] * 3, what=f"statuses {statuses}",
                            margin_ms=SERVICE_S * 1000)
    assert _fail_count(server, "bounded") - before == statuses.count(503)
    with _connect(server.http_url) as sock:  # and it goes on serving
        sock.sendall(_request("/v2/models/bounded/infer", _INFER))
        assert read_answer(sock)[0] == 200


def _grpc_infer(server: Fronts, model: str) -> Callable[[], object]:
    """One gRPC infer of `model`: "bounded" batches (shape [1, 2]), "paced" does not (shape [2])."""
    data = np.array([[1.5, 2.5]] if model == "bounded" else [1.5, 2.5], dtype=np.float32)

    def call() -> object:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
            tensor.set_data_from_numpy(data)
            return client.infer(model, [tensor]).as_numpy("OUTPUT0")

    return call


def test_grpc_request_beyond_the_queue_is_unavailable(server: Fronts, host_noise: HostNoise) -> None:
    outcomes = _simultaneously(GRPC_CAP, _grpc_infer(server, "bounded"))
    refused = [o for o in outcomes if isinstance(o, InferenceServerException)]
    answered = [o for o in outcomes if isinstance(o, np.ndarray)]
    host_noise.assert_holds(len(answered) == 3 and len(refused) == 1, what=f"outcomes {outcomes}",
                            margin_ms=SERVICE_S * 1000)
    for error in refused:
        assert error.status() == "StatusCode.UNAVAILABLE" and error.message() == "Exceeds maximum queue size"


def test_grpc_calls_beyond_the_cap_are_resource_exhausted(server: Fronts, host_noise: HostNoise) -> None:
    """The paced model has no queue limit: only the server's cap on calls in progress refuses."""
    outcomes = _simultaneously(GRPC_CAP + 2, _grpc_infer(server, "paced"))
    refused = [o for o in outcomes if isinstance(o, InferenceServerException)]
    host_noise.assert_holds(len(refused) == 2, what=f"outcomes {outcomes}", margin_ms=SERVICE_S * 1000)
    assert {error.status() for error in refused} == {"StatusCode.RESOURCE_EXHAUSTED"}
    assert isinstance(_grpc_infer(server, "paced")(), np.ndarray)


# -- read deadline and idle timeout ---------------------------------------------------------------------

def test_a_dripping_request_is_cut_off_at_the_deadline(server: Fronts) -> None:
    """A byte every 50 ms would take 20 s for the whole request; the deadline cuts it at 1 s to 1.25 s
    after its first byte (plus scheduling slack), though no gap between bytes comes near the timeout."""
    request = _request("/v2/models/paced/infer", _INFER)
    with _connect(server.http_url) as sock:
        started = time.monotonic()
        closed_at = None
        for byte in request[:-1]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # reset: the server closed it
                closed_at = time.monotonic()
                break
            time.sleep(0.05)
            if time.monotonic() - started > READ_TIMEOUT_S * 3:
                break
        if closed_at is None:
            sock.settimeout(0.5)
            try:
                assert sock.recv(65536) == b""
            except OSError:
                pass
            closed_at = time.monotonic()
    waited = closed_at - started
    assert READ_TIMEOUT_S * 0.95 <= waited <= READ_TIMEOUT_S * 1.25 + 0.5, waited


def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(server: Fronts) -> None:
    with _connect(server.http_url) as sock:
        sock.sendall(_request("/v2/health/live", method="GET"))
        assert read_answer(sock)[0] == 200
        idle_from = time.monotonic()
        sock.settimeout(IDLE_TIMEOUT_S * 5)
        assert sock.recv(65536) == b""
        waited = time.monotonic() - idle_from
    assert IDLE_TIMEOUT_S * 0.95 <= waited <= IDLE_TIMEOUT_S * 1.25 + 0.5, waited


# -- connection cap -------------------------------------------------------------------------------------

@pytest.fixture
def enough_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * IDLE_CONNECTIONS + 200  # this process's sockets and the server's (it inherits the limit)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the file descriptor limit {hard} is below the {needed} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.mark.usefixtures("enough_descriptors")
def test_with_2000_idle_connections_a_new_one_is_served_within_the_cap_and_refused_beyond() -> None:
    capped = start_fronts("--max-connections", str(IDLE_CONNECTIONS + 1))
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            sock = _connect(capped.http_url)
            idle.append(sock)
            sock.sendall(_request("/v2/health/live", method="GET"))
        for sock in idle:  # each answered: the server holds all of them
            assert read_answer(sock)[0] == 200
        with _connect(capped.http_url) as last:  # the 2,001st: within the cap
            last.sendall(_request("/v2/models/identity/infer", _IDENTITY))
            status, _, body = read_answer(last)
            assert status == 200, body
            with _connect(capped.http_url) as beyond:
                beyond.sendall(_request("/v2/health/live", method="GET"))
                status, headers, body = read_answer(beyond)
                assert status == 503 and headers["connection"] == "close"
                assert json.loads(body) == {"error": f"too many open connections: the server's limit is "
                                                     f"{IDLE_CONNECTIONS + 1} (--max-connections)"}
                assert beyond.recv(65536) == b""
        for sock in idle[:10]:
            sock.close()
        deadline = time.monotonic() + 5
        while True:  # once they are gone, new connections are served again
            with _connect(capped.http_url) as again:
                again.sendall(_request("/v2/health/live", method="GET"))
                if read_answer(again)[0] == 200 or time.monotonic() > deadline:
                    break
        with _connect(capped.http_url) as again:
            again.sendall(_request("/v2/health/live", method="GET"))
            assert read_answer(again)[0] == 200
    finally:
        for sock in idle:
            sock.close()
        stop_process(capped.proc)
    stderr = capped.proc.stderr.read()
    assert "Traceback" not in stderr
    assert stderr.count("--max-connections cap") == 1, stderr
