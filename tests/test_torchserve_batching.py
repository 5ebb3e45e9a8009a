"""Workers and batching of the TorchServe-compatible server, as TorchServe's (PROTOCOLS.md 5.9).

A probe handler answers each request with its own value and the size of the batch it ran in, so the
client side sees how batches formed. Checked: with batch_size 8 and 16 concurrent clients the handler
gets batches larger than 1 (never larger than 8) and every client gets exactly its own answer, on the
probe and on the captures' mlp compared with the model in-process; max_batch_delay holds a lone request
back that long and no longer once the batch is full; workers run in parallel and scale up and down.
Workers are processes (TorchServe's): one that dies answers its batch "Worker died." and is started
again, scaling down and unregistering end their processes; worker_mode=thread runs them as threads.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.support.processes import POLL, wait_for
from tests.support.timing import HostNoise
from tests.support.torchserve import (
    OPEN,
    TorchServe,
    archive,
    start_torchserve,
)

pytestmark = pytest.mark.integration

PROBE_HANDLER = '''
"""Answers each request with its value, the batch size it ran in, and the worker that ran it (its
process and thread: a process of its own by default, a thread of the server with worker_mode=thread)."""
import os
import signal
import threading
import time

from ts.torch_handler.base_handler import BaseHandler


class Probe(BaseHandler):
    def initialize(self, context):
        self.context = context
        self.pause = float((context.model_yaml_config or {}).get("pause_s", 0.02))
        time.sleep(float((context.model_yaml_config or {}).get("load_s", 0)))
        self.initialized = True

    def handle(self, data, context):
        if any(row.get("body") == "exit" for row in data):
            os._exit(3)  # a worker process that dies in the middle of a batch
        if any(row.get("body") == "kill" for row in data):
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        if any(row.get("body") == "hang" for row in data):
            time.sleep(30)  # past any responseTimeout the tests set
        time.sleep(self.pause)  # a model that takes a while: batches form behind a busy worker
        worker = f"{os.getpid()}/{threading.current_thread().name}"
        return [{"value": row.get("body"), "batch": len(data), "worker": worker} for row in data]
'''


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("store")
    shutil.copy(model_store / "mlp.mar", store / "mlp.mar")
    work = tmp_path_factory.mktemp("work")
    (work / "probe.py").write_text(PROBE_HANDLER)
    archive(store, "probe", work / "probe.py")
    (work / "slow.yaml").write_text("pause_s: 0.4\n")
    archive(store, "sleepy", work / "probe.py", None, "--config-file", str(work / "slow.yaml"))
    (work / "lazy.yaml").write_text("load_s: 30\n")
    archive(store, "lazy", work / "probe.py", None, "--config-file", str(work / "lazy.yaml"))
    running = start_torchserve(store, tmp_path_factory.mktemp("server"), config=OPEN, grpc=False)
    yield running
    running.stop()


def _register(server: TorchServe, query: str) -> None:
    response = httpx.post(f"{server.management}/models?{query}", timeout=120)
    assert response.status_code == 200, response.text


def _unregister(server: TorchServe, name: str) -> None:
    assert httpx.delete(f"{server.management}/models/{name}", timeout=30).status_code == 200


def _concurrently(count: int, call) -> list:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count)))


def test_batch_size_8_sixteen_clients_each_get_their_own(server: TorchServe) -> None:
    _register(server, "url=probe.mar&model_name=probe8&batch_size=8&max_batch_delay=50&initial_workers=1")
    url = f"{server.inference}/predictions/probe8"

    def client(index: int) -> list[tuple[int, dict]]:
        with httpx.Client(timeout=30) as session:
            return [(index * 100 + round_, session.post(url, json=index * 100 + round_).json())
                    for round_ in range(5)]

    answers = [pair for pairs in _concurrently(16, client) for pair in pairs]
    try:
        assert len(answers) == 80
        assert all(answer["value"] == sent for sent, answer in answers)
        sizes = [answer["batch"] for _, answer in answers]
        assert max(sizes) > 1 and max(sizes) <= 8, sizes
    finally:
        _unregister(server, "probe8")


def test_mlp_batched_over_two_workers_equals_in_process(server: TorchServe, tmp_path: Path) -> None:
    """The captures' mlp (float_handler stacks the rows of a batch) with batch_size 8 and 2 workers:
    16 clients with rows of their own each get that row's outputs."""
    _register(server, "url=mlp.mar&model_name=mlp8&batch_size=8&max_batch_delay=20&initial_workers=2")
    shutil.copy(server.store / "mlp.mar", tmp_path / "mlp.zip")
    shutil.unpack_archive(tmp_path / "mlp.zip", tmp_path / "mlp")
    model = torch.jit.load(str(tmp_path / "mlp" / "mlp.pt"))
    rows = torch.randn(16 * 4, 784, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = model(rows)
    url = f"{server.inference}/predictions/mlp8"

    def client(index: int) -> list[tuple[int, list[float]]]:
        with httpx.Client(timeout=30) as session:
            own = range(index * 4, index * 4 + 4)
            return [(row, session.post(url, json=rows[row].tolist()).json()) for row in own]

    try:
        for row, got in (pair for pairs in _concurrently(16, client) for pair in pairs):
            assert got == pytest.approx(expected[row].tolist(), rel=1e-5, abs=1e-6), row
    finally:
        _unregister(server, "mlp8")


def test_max_batch_delay_holds_a_lone_request_and_a_full_batch_leaves_at_once(server: TorchServe,
                                                                             host_noise: HostNoise) -> None:
    _register(server, "url=probe.mar&model_name=lone&batch_size=8&max_batch_delay=300&initial_workers=1")
    _register(server, "url=probe.mar&model_name=full&batch_size=8&max_batch_delay=5000&initial_workers=1")
    try:
        start = time.monotonic()
        answer = httpx.post(f"{server.inference}/predictions/lone", json=1, timeout=30).json()
        waited = time.monotonic() - start
        assert answer["batch"] == 1 and 0.3 <= waited, waited
        host_noise.assert_below(waited, 2.0, what="seconds a lone request waited", quantile="max", unit=1000.0)
        start = time.monotonic()
        answers = _concurrently(8, lambda i: httpx.post(f"{server.inference}/predictions/full", json=i,
                                                        timeout=30).json())
        # far less than the 5 s delay: 8 rows fill the batch
        host_noise.assert_below(time.monotonic() - start, 2.5, what="seconds for a full batch", quantile="max",
                                unit=1000.0)
        assert sorted(answer["value"] for answer in answers) == list(range(8))
        assert max(answer["batch"] for answer in answers) == 8
    finally:
        _unregister(server, "lone")
        _unregister(server, "full")


def test_workers_run_in_parallel_and_scale(server: TorchServe, host_noise: HostNoise) -> None:
    """`sleepy` pauses 0.4 s a batch: with 2 workers two requests take about 0.4 s together, with 1
    worker (scaled down synchronously) about 0.8 s."""
    _register(server, "url=sleepy.mar&initial_workers=2")
    url = f"{server.inference}/predictions/sleepy"
    try:
        start = time.monotonic()
        answers = _concurrently(2, lambda i: httpx.post(url, json=i, timeout=30).json())
        host_noise.assert_below(time.monotonic() - start, 0.75, what="seconds for two requests on two workers",
                                quantile="max", unit=1000.0)
        assert len({answer["worker"] for answer in answers}) == 2
        scaled = httpx.put(f"{server.management}/models/sleepy?min_worker=1&synchronous=true", timeout=30)
        assert scaled.json() == {"status": "Workers scaled to 1 for model: sleepy"}
        assert len(httpx.get(f"{server.management}/models/sleepy", timeout=10).json()[0]["workers"]) == 1
        start = time.monotonic()
        answers = _concurrently(2, lambda i: httpx.post(url, json=i, timeout=30).json())
        assert time.monotonic() - start >= 0.8
        assert len({answer["worker"] for answer in answers}) == 1
        scaled = httpx.put(f"{server.management}/models/sleepy?min_worker=3", timeout=30)
        assert (scaled.status_code, scaled.json()) == (202, {"status": "Processing worker updates..."})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = httpx.get(f"{server.management}/models/sleepy", timeout=10).json()[0]["workers"]
            if [worker["status"] for worker in workers] == ["READY"] * 3:
                break
            time.sleep(0.05)
        assert [worker["status"] for worker in workers] == ["READY"] * 3
    finally:
        _unregister(server, "sleepy")


def _workers(server: TorchServe, name: str) -> list[dict]:
    return httpx.get(f"{server.management}/models/{name}", timeout=10).json()[0]["workers"]


def _ready(server: TorchServe, name: str) -> bool:
    """Whether the first worker of `name` is READY, through the poll client (asked every 20 ms)."""
    return POLL.get(f"{server.management}/models/{name}").json()[0]["workers"][0]["status"] == "READY"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_worker_that_dies_answers_worker_died_and_is_started_again(server: TorchServe) -> None:
    """The handler's process exits in the middle of a batch: its request gets TorchServe's 500 "Worker
    died.", the worker is listed UNLOADING, started again with a new process, and serves again. One
    killed with SIGKILL (as the out-of-memory killer does) answers 413, TorchServe's code for an exit
    value of 137; one stopped from outside while idle is started again without a request failing."""
    _register(server, "url=probe.mar&model_name=mortal&initial_workers=1")
    url = f"{server.inference}/predictions/mortal"

    def restarted(previous: dict) -> dict:
        assert wait_for(lambda: _ready(server, "mortal"))
        worker = _workers(server, "mortal")[0]
        assert worker["id"] == previous["id"] and worker["pid"] != previous["pid"]
        assert not _alive(previous["pid"])
        return worker

    try:
        first = _workers(server, "mortal")[0]
        died = httpx.post(url, json="exit", timeout=30)
        assert died.status_code == 500 and died.headers["connection"] == "close"
        assert died.json() == {"code": 500, "type": "InternalServerException", "message": "Worker died."}
        assert _workers(server, "mortal")[0]["status"] == "UNLOADING"
        assert httpx.get(f"{server.inference}/ping", timeout=10).json() == {"status": "Unhealthy"}
        second = restarted(first)
        assert httpx.post(url, json=7, timeout=30).json()["value"] == 7
        killed = httpx.post(url, json="kill", timeout=30)
        assert (killed.status_code, killed.json()["message"]) == (413, "Worker died.")
        third = restarted(second)
        os.kill(third["pid"], signal.SIGTERM)
        assert wait_for(lambda: not _alive(third["pid"]), 10)
        assert httpx.post(url, json=8, timeout=30).json()["value"] == 8  # waits in the queue meanwhile
        restarted(third)
    finally:
        _unregister(server, "mortal")


def test_scaling_down_and_unregistering_end_the_worker_processes(server: TorchServe) -> None:
    _register(server, "url=probe.mar&model_name=ended&initial_workers=2")
    pids = [worker["pid"] for worker in _workers(server, "ended")]
    assert len(set(pids)) == 2 and all(_alive(pid) for pid in pids)
    assert server.server.proc.pid not in pids
    scaled = httpx.put(f"{server.management}/models/ended?min_worker=1&synchronous=true", timeout=30)
    assert scaled.status_code == 200
    left = [worker["pid"] for worker in _workers(server, "ended")]
    assert len(left) == 1 and wait_for(lambda: sum(map(_alive, pids)) == 1, 10)
    _unregister(server, "ended")
    assert wait_for(lambda: not _alive(left[0]), 10)


def test_thread_workers_on_request(model_store: Path, host_noise: HostNoise, tmp_path: Path) -> None:
    """worker_mode=thread: the workers are threads of the server process, and still run in parallel."""
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "probe.py").write_text(PROBE_HANDLER)
    (tmp_path / "slow.yaml").write_text("pause_s: 0.4\n")
    archive(store, "sleepy", tmp_path / "probe.py", None, "--config-file", str(tmp_path / "slow.yaml"))
    running = start_torchserve(store, tmp_path, config=[*OPEN, "worker_mode=thread"], grpc=False)
    try:
        _register(running, "url=sleepy.mar&initial_workers=2")
        workers = _workers(running, "sleepy")
        assert [worker["pid"] for worker in workers] == [running.server.proc.pid] * 2
        url = f"{running.inference}/predictions/sleepy"
        start = time.monotonic()
        answers = _concurrently(2, lambda i: httpx.post(url, json=i, timeout=30).json())
        host_noise.assert_below(time.monotonic() - start, 0.75, what="seconds for two requests on two workers",
                                quantile="max", unit=1000.0)
        assert len({answer["worker"] for answer in answers}) == 2
        assert {answer["worker"].split("/")[0] for answer in answers} == {str(running.server.proc.pid)}
    finally:
        running.stop()


def test_response_and_startup_timeouts_stop_the_worker(server: TorchServe) -> None:
    """A batch that runs past responseTimeout: its worker is killed, the request answered 500 "Worker
    died.", the worker started again. A worker that has not loaded after startupTimeout is killed and
    the registration fails as one whose handler does not load."""
    _register(server, "url=probe.mar&model_name=hung&initial_workers=1&response_timeout=1")
    try:
        first = _workers(server, "hung")[0]
        start = time.monotonic()
        hung = httpx.post(f"{server.inference}/predictions/hung", json="hang", timeout=30)
        assert 1.0 <= time.monotonic() - start < 10
        assert (hung.status_code, hung.json()["message"]) == (500, "Worker died.")
        assert wait_for(lambda: _ready(server, "hung"))
        assert _workers(server, "hung")[0]["pid"] != first["pid"] and not _alive(first["pid"])
    finally:
        _unregister(server, "hung")
    start = time.monotonic()
    late = httpx.post(f"{server.management}/models?url=lazy.mar&initial_workers=1&startup_timeout=2", timeout=60)
    assert 2.0 <= time.monotonic() - start < 20
    assert (late.status_code, late.json()["message"]) == (500, "Failed to start workers for model lazy version: 1.0")
    try:
        assert _workers(server, "lazy") == []
    finally:
        _unregister(server, "lazy")
