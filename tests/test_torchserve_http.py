"""Conformance of the TorchServe-compatible server's HTTP APIs with a real TorchServe 0.12.0.

Each recorded exchange of ../shared/torchserve-captures is sent again, in the recorded order, to this
server started as the recorded one was (same config.properties keys, same models), and the answer must
match: status, reason phrase, header names, and the body (JSON as data; request ids, times and pids
excepted). The files: B_open.json (token authorization off, model API on), A_default_security.json
(the defaults: tokens on, model API off), extra.json (a model whose initialize raises, a full job
queue), C_prometheus.json and metrics_prometheus.txt (metrics_mode=prometheus), raw_bytes.txt (bytes on
the wire). Where this server answers differently on purpose, the test says so beside the exchange.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.torchserve import (
    MLP_JSON,
    OPEN,
    TorchServe,
    assert_like,
    assert_same,
    by_name,
    captures,
    load_capture,
    replay,
    start_torchserve,
)

pytestmark = pytest.mark.integration

MLP_TWO_WORKERS = 'models={"mlp": {"1.0": {"minWorkers": 2, "maxWorkers": 2}}}'
"""The recorded server ran on 2 cores, so its startup model had 2 workers; say so whatever the cores."""


def _replay_all(server: TorchServe, exchanges: list[dict], special: dict | None = None,
                headers_for=lambda exchange: None) -> list[str]:
    """Replay exchanges in order; returns one line per mismatch (all of them, not just the first)."""
    special = special or {}
    failures = []
    with httpx.Client(timeout=60) as client:
        for exchange in exchanges:
            try:
                if exchange["name"] in special:
                    special[exchange["name"]](client, server, exchange)
                else:
                    assert_like(exchange, replay(client, server, exchange, headers_for(exchange)))
            except AssertionError as error:
                failures.append(f"{exchange['name']}: {error}")
    return failures


def _openapi_paths() -> dict[str, dict]:
    extra = by_name(load_capture("extra.json"))
    return {":8080/": extra["openapi_inference"]["paths"], ":8081/": extra["openapi_management"]["paths"],
            ":8082/": extra["openapi_metrics_port"].get("paths")}


def _check_api_description(client: httpx.Client, server: TorchServe, exchange: dict) -> None:
    """The description's head as recorded (the recorded body is cut at 400 characters), and the paths and
    methods extra.json lists for that port."""
    response = replay(client, server, exchange)
    assert response.status_code == 200 and response.reason_phrase == "OK"
    assert response.text.startswith(exchange["body"][:300])
    document = response.json()
    port = ":" + exchange["request"].split(":")[2].split("/")[0] + "/"
    want = _openapi_paths()[port]
    assert _methods(document["paths"]) == _methods(want)


def _methods(paths: dict) -> dict[str, list[str]]:
    return {path: sorted(operations) for path, operations in paths.items()}


def _check_concurrent_echo(client: httpx.Client, server: TorchServe, exchange: dict) -> None:
    """8 clients at once on echo (batch_size 8): each gets its own row back."""
    def one(index: int) -> tuple[int, str]:
        response = httpx.post(f"{server.inference}/predictions/echo", json=[float(index)] * 3, timeout=30)
        return response.status_code, response.text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert [list(result) for result in results] == exchange["results"]


@pytest.fixture(scope="module")
def open_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    server = start_torchserve(model_store, tmp_path_factory.mktemp("open"), "--models", "mlp=mlp.mar",
                              config=[*OPEN, MLP_TWO_WORKERS], grpc=False)
    yield server
    server.stop()


def test_open_settings_replay_b_open(open_server: TorchServe) -> None:
    """Every exchange of B_open.json: inference, management (list, describe, register, scale, set-default,
    unregister), metrics in log mode, errors."""
    special = {"predict_echo_8_concurrent_batched": _check_concurrent_echo,
               "api_description_inference_OPTIONS": _check_api_description,
               "api_description_management_OPTIONS": _check_api_description}
    assert _replay_all(open_server, load_capture("B_open.json"), special) == []


def test_extra_replay_broken_model_and_full_queue(model_store: Path, tmp_path: Path) -> None:
    """extra.json: the API descriptions of all three ports, a model whose initialize raises (500, the
    server stays up and keeps it registered with no workers), a model with 0 workers, bad scale and
    register parameters, and a slow model whose job queue (100 places) fills."""
    server = start_torchserve(model_store, tmp_path, "--models", "mlp=mlp.mar",
                              config=[*OPEN, MLP_TWO_WORKERS], grpc=False)
    try:
        special = {"openapi_inference": _check_openapi_head, "openapi_management": _check_openapi_head,
                   "openapi_metrics_port": _check_openapi_head,
                   "slow_130_concurrent_queue_full": _check_full_queue,
                   "describe_slow_busy": _check_busy_describe}
        assert _replay_all(server, load_capture("extra.json"), special) == []
    finally:
        server.stop()


def _check_openapi_head(client: httpx.Client, server: TorchServe, exchange: dict) -> None:
    response = replay(client, server, {**exchange, "request": "OPTIONS " + exchange["request"].split()[-1]})
    assert response.status_code == 200
    names = [key.lower() for key, _ in response.headers.multi_items()]
    assert names == [key.lower() for key, _ in exchange["headers"]]
    if "paths" in exchange:
        assert _methods(response.json()["paths"]) == _methods(exchange["paths"])
    else:  # the metrics port: its head is recorded
        assert response.text.startswith(exchange["body"][:250])


_busy: dict[str, object] = {}


def _check_full_queue(client: httpx.Client, server: TorchServe, exchange: dict) -> None:
    """130 requests at once on `slow` (one worker, 0.5 s a request, 100 queue places): the ones that find
    the queue full are refused at once with the recorded 503 body. The real server's remaining clients
    timed out after it unregistered the model; this server answers them 503 when it does."""
    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=30, limits=limits) as pool:
            tasks = [asyncio.ensure_future(pool.post(f"{server.inference}/predictions/slow", content=b"x"))
                     for _ in range(130)]
            refused: list[httpx.Response] = []
            for _ in range(200):  # the refusals come at once; wait for them, at most 10 s
                await asyncio.sleep(0.05)
                done = [task.result() for task in tasks if task.done() and task.exception() is None]
                if len(refused) >= 29 and len(refused) == sum(r.status_code == 503 for r in done):
                    break
                refused = [response for response in done if response.status_code == 503]
            _busy["describe"] = (await pool.get(f"{server.management}/models/slow")).json()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return refused

    loop = asyncio.new_event_loop()
    try:
        refused = loop.run_until_complete(flood())
    finally:
        loop.close()
    recorded = exchange["summary"]["503"]
    assert 29 <= len(refused) <= 30, len(refused)  # 130 - 100 queued - the one (or none yet) computing
    for response in refused:
        assert response.status_code == 503
        assert response.text == recorded["example"]


def _check_busy_describe(client: httpx.Client, server: TorchServe, exchange: dict) -> None:
    """Described while the queue is full: the queue status adds up to its 100 places."""
    described = _busy["describe"]
    assert_same(json.loads(exchange["body"]), described, values=False)
    status = described[0]["jobQueueStatus"]
    assert status["remainingCapacity"] + status["pendingRequests"] == 100
    assert status["pendingRequests"] >= 90


def test_default_security_replay_a(model_store: Path, tmp_path: Path) -> None:
    """A_default_security.json: token authorization on (keys from key_file.json), model API off."""
    server = start_torchserve(model_store, tmp_path, "--models", "mlp=mlp.mar", config=[MLP_TWO_WORKERS],
                              grpc=False)
    try:
        keys = server.keys()
        stat = server.key_file.stat()
        assert oct(stat.st_mode & 0o777) == "0o600"
        recorded_keys = {"Bearer uVLNaesK": "inference", "Bearer fLyM6p7c": "management",
                         "Bearer aPHvpk3D": "API"}

        def headers_for(exchange: dict) -> dict | None:
            given = exchange["request_headers"].get("Authorization")
            if given not in recorded_keys:
                return None
            return {"Authorization": f"Bearer {keys[recorded_keys[given]]}"}

        assert _replay_all(server, load_capture("A_default_security.json"), headers_for=headers_for) == []
        assert server.keys()["inference"] != keys["inference"]  # the token API replaced it
        assert server.keys()["management"] == keys["management"]
    finally:
        server.stop()


def _families(text: str) -> list[tuple[str, str, str, list[tuple[str, ...]]]]:
    """(name, HELP text, TYPE, label names of each sample) per family, in order."""
    families: list = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            families.append([name, help_text, "", []])
        elif line.startswith("# TYPE "):
            families[-1][2] = line.split()[-1]
        elif line:
            labels = tuple(re.findall(r'(\w+)="', line))
            families[-1][3].append(labels)
            assert re.fullmatch(r'\w+\{(\w+="[^"]*",)+\} \S+', line), line
    return [tuple(family) for family in families]


def test_prometheus_metrics_like_recorded(model_store: Path, tmp_path: Path) -> None:
    """C_prometheus.json and metrics_prometheus.txt: after the recorded traffic the page lists the same
    families (HELP, TYPE, order) with the same label names, and the counters count that traffic."""
    server = start_torchserve(model_store, tmp_path, "--models", "mlp=mlp.mar",
                              config=[*OPEN, "metrics_mode=prometheus", MLP_TWO_WORKERS], grpc=False)
    try:
        exchanges = load_capture("C_prometheus.json")
        with httpx.Client(timeout=60) as client:
            for exchange in exchanges[:-1]:
                assert_like(exchange, replay(client, server, exchange), values=False)
            response = replay(client, server, exchanges[-1])
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        recorded = _families((captures() / "metrics_prometheus.txt").read_text())
        got = _families(response.text)
        assert [family[:3] for family in got] == [family[:3] for family in recorded]
        for (name, _, _, want_labels), (_, _, _, got_labels) in zip(recorded, got):
            if want_labels and name not in ("WorkerLoadTime",):
                assert set(got_labels) == set(want_labels), name
        labels = 'model_name="mlp",model_version="default",hostname='
        assert f"ts_inference_requests_total{{{labels}" in response.text
        values = dict(re.findall(r"^(\w+)\{[^}]*\} (\S+)$", response.text, re.MULTILINE))
        assert values["ts_inference_requests_total"] == "6.0"  # 5 answered + 1 refused by the handler
        assert values["Requests4XX"] == "1.0" and values["Requests5XX"] == "1.0"
        latency, queue = (float(values[f"ts_{kind}_latency_microseconds"]) for kind in ("inference", "queue"))
        assert latency > queue > 0
        filtered = httpx.get(f"{server.metrics}/metrics?name[]=ts_inference_requests_total", timeout=10).text
        assert [family[0] for family in _families(filtered)] == ["ts_inference_requests_total"]
    finally:
        server.stop()


def _raw_exchanges() -> list[tuple[str, list[str]]]:
    """(title, status line + header names) of each response in raw_bytes.txt."""
    blocks = (captures() / "raw_bytes.txt").read_text().split("##### ")[1:]
    parsed = []
    for block in blocks:
        title, _, rest = block.partition("\n")
        head = rest.split("\n\n", 1)[0].splitlines()
        parsed.append((title.strip(), [head[0], *(line.split(":", 1)[0] for line in head[1:])]))
    return parsed


def _raw(address: str, request: bytes) -> bytes:
    host, port = address.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
    return data


def test_bytes_on_the_wire_like_raw_bytes(open_server: TorchServe) -> None:
    """raw_bytes.txt: status lines (an empty reason phrase on a prediction) and header names, in order.

    The HTTP/1.0 request asks for keep-alive: the recorded server answers `connection: keep-alive` to
    any HTTP/1.0 request, this one honours an HTTP/1.0 client that does not ask for it (and closes)."""
    mlp = (b"POST /predictions/mlp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(MLP_JSON), MLP_JSON.encode()))
    malformed = (b"POST /predictions/mlp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 9\r\n\r\n{not json")
    missing = b"POST /predictions/missing HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]"
    requests = {
        "GET /ping": (open_server.inference, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"),
        "POST /predictions/mlp (200)": (open_server.inference, mlp),
        "POST /predictions/missing (404)": (open_server.inference, missing),
        "POST /predictions/mlp malformed (503)": (open_server.inference, malformed),
        "GET /ping HTTP/1.0": (
            open_server.inference, b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
        "GET /models (mgmt)": (open_server.management, b"GET /models HTTP/1.1\r\nHost: x\r\n\r\n"),
        "GET /metrics (8082)": (open_server.metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
    }
    recorded = _raw_exchanges()
    assert [title for title, _ in recorded] == list(requests)
    for title, want in recorded:
        address, request = requests[title]
        head = _raw(address, request).split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        assert [head[0], *(line.split(":", 1)[0] for line in head[1:])] == want, title


def test_http10_without_keep_alive_is_closed(open_server: TorchServe) -> None:
    host, port = open_server.inference.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close\r\n" in data
    assert data.endswith(b'{\n  "status": "Healthy"\n}\n')
