"""The TorchServe-compatible server when workers fail or go away: no job is left hanging (integration).

A gated handler lets each test decide when a worker acts: it waits for a file (the gate) named by its
request or its model-config before it dies, fails to load, or answers, so jobs are queued behind it
for certain (describe's pendingRequests says how many) before the fault happens. Checked, over HTTP
and gRPC: jobs queued for a model whose only worker is given up (maxRetryTimeoutInSec) or whose
workers all fail to load, or that is scaled to 0 or unregistered while they wait, are answered at once
with TorchServe's 503 no-worker refusal (INTERNAL over gRPC, as TorchServe refuses a model without
workers there), never left to time out; the server goes on serving its other models. And min_worker
(register, scale, the model's config, default_workers_per_model) is bounded by
--max-workers-per-model: beyond it, 400 with the reason and no worker started.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from loadgen.lowlevel.torchserve_proto import (
    inference_pb2,
    management_pb2,
)
from tests.support.processes import POLL, wait_for
from tests.support.torchserve import OPEN, Stubs, TorchServe, archive, start_torchserve

pytestmark = pytest.mark.integration

MAX_WORKERS = 3
ANSWER_S = 20.0
"""How long a queued job may take to be answered here; a job left hanging fails the test after it."""

GATED_HANDLER = '''
"""Waits for a gate file before it acts: a request {"gate": PATH, "started": PATH, "die": bool} marks
`started`, waits for the gate, then dies (os._exit) or answers; a model-config with `fail_load` makes
initialize wait for its `gate` and raise."""
import os
import time
from pathlib import Path

from ts.torch_handler.base_handler import BaseHandler


def _wait(path):
    deadline = time.monotonic() + 60
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.01)


class Gated(BaseHandler):
    def initialize(self, context):
        config = context.model_yaml_config or {}
        if config.get("fail_load"):
            _wait(config["gate"])
            raise RuntimeError("deliberately broken model")
        self.initialized = True

    def handle(self, data, context):
        for row in data:
            body = row.get("body")
            if isinstance(body, dict) and "gate" in body:
                Path(body["started"]).touch()
                _wait(body["gate"])
                if body.get("die"):
                    os._exit(3)
        return [{"served": True}] * len(data)
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("store")
    work = tmp_path_factory.mktemp("work")
    (work / "gated.py").write_text(GATED_HANDLER)
    archive(store, "steady", work / "gated.py")
    running = start_torchserve(store, tmp_path_factory.mktemp("server"), "--models", "steady=steady.mar",
                               "--max-workers-per-model", str(MAX_WORKERS),
                               config=[*OPEN, "default_workers_per_model=1"])
    yield running
    running.stop()
    assert "Traceback" not in running.server.proc.stderr.read()


@pytest.fixture
def stubs(server: TorchServe):
    made = Stubs(server)
    yield made
    made.close()


def _gated_archive(server: TorchServe, name: str, folder: Path, config: dict | None = None) -> None:
    """An archive NAME.mar of the gated handler in the server's store, with `config` as its model-config."""
    (folder / "gated.py").write_text(GATED_HANDLER)
    extra: list[str] = []
    if config is not None:
        (folder / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML
        extra = ["--config-file", str(folder / f"{name}.yaml")]
    archive(server.store, name, folder / "gated.py", None, *extra)


def _register(server: TorchServe, query: str, status: int = 200) -> None:
    response = httpx.post(f"{server.management}/models?{query}", timeout=120)
    assert response.status_code == status, response.text


def _unregister(server: TorchServe, name: str) -> None:
    httpx.delete(f"{server.management}/models/{name}", timeout=30)


def _describe(server: TorchServe, name: str) -> dict:
    return POLL.get(f"{server.management}/models/{name}").json()[0]


def _post(server: TorchServe, name: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.inference}/predictions/{name}", json=body, timeout=ANSWER_S)


def _grpc_predict(stubs: Stubs, name: str) -> grpc.RpcError | bytes:
    """A gRPC prediction's answer, or the error it ended with."""
    try:
        return stubs.inference.Predictions(inference_pb2.PredictionsRequest(model_name=name, input={"body": b"1"}),
                                           timeout=ANSWER_S).prediction
    except grpc.RpcError as error:
        return error


def _no_worker(name: str) -> dict:
    return {"code": 503, "type": "ServiceUnavailableException",
            "message": f'Model "{name}" has no worker to serve inference request. Please use scale workers API '
                       "to add workers. If this is a sequence inference, please check if it is closed, or "
                       "expired; or exceeds maxSequenceJobQueueSize"}


def _assert_refused_no_worker(name: str, http: Future, over_grpc: Future) -> None:
    """Both queued jobs answered (not timed out) with TorchServe's refusal of a model without workers."""
    answer = http.result(ANSWER_S + 5)
    assert answer.status_code == 503 and answer.json() == _no_worker(name), answer.text
    error = over_grpc.result(ANSWER_S + 5)
    assert isinstance(error, grpc.RpcError), error
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == f"{_no_worker(name)['message']}\nInternalServerException.()"


def _queue_two(pool: ThreadPoolExecutor, server: TorchServe, stubs: Stubs, name: str,
               pending: int = 2) -> tuple[Future, Future]:
    """One HTTP and one gRPC job for `name`, once both wait in its queue."""
    http = pool.submit(_post, server, name, 2)
    over_grpc = pool.submit(_grpc_predict, stubs, name)
    assert wait_for(lambda: _describe(server, name)["jobQueueStatus"]["pendingRequests"] == pending)
    return http, over_grpc


def _assert_steady_serves(server: TorchServe) -> None:
    answer = _post(server, "steady", 1)
    assert answer.status_code == 200 and answer.json() == {"served": True}


def test_jobs_queued_for_a_worker_that_is_given_up_are_answered(server: TorchServe, stubs: Stubs,
                                                                tmp_path: Path) -> None:
    """maxRetryTimeoutInSec 0: the worker that dies is not started again. The request it ran gets "Worker
    died."; the two queued behind it, and any that arrive after, the 503 of a model without workers."""
    _gated_archive(server, "mortal", tmp_path, {"maxRetryTimeoutInSec": 0})
    _register(server, "url=mortal.mar&initial_workers=1")
    gate, started = tmp_path / "gate", tmp_path / "started"
    try:
        assert _describe(server, "mortal")["maxRetryTimeoutInSec"] == 0
        with ThreadPoolExecutor(3) as pool:
            dying = pool.submit(_post, server, "mortal", {"gate": str(gate), "started": str(started), "die": True})
            assert wait_for(started.exists)
            http, over_grpc = _queue_two(pool, server, stubs, "mortal")
            gate.touch()
            died = dying.result(ANSWER_S + 5)
            assert died.status_code == 500 and died.json()["message"] == "Worker died."
            _assert_refused_no_worker("mortal", http, over_grpc)
        later = _post(server, "mortal", 3)
        assert later.status_code == 503 and later.json() == _no_worker("mortal")
        assert _describe(server, "mortal")["workers"] == []
        _assert_steady_serves(server)
    finally:
        gate.touch()
        _unregister(server, "mortal")


def test_jobs_queued_for_a_model_whose_workers_all_fail_to_load_are_answered(server: TorchServe, stubs: Stubs,
                                                                            tmp_path: Path) -> None:
    """Registered without waiting (202); jobs queue while both workers load; both fail: every queued job
    gets the 503 of a model without workers, and the model stays registered with 0 workers."""
    gate = tmp_path / "gate"
    _gated_archive(server, "doomed", tmp_path, {"fail_load": True, "gate": str(gate)})
    _register(server, "url=doomed.mar&initial_workers=2&synchronous=false", status=202)
    try:
        with ThreadPoolExecutor(2) as pool:
            http, over_grpc = _queue_two(pool, server, stubs, "doomed")
            gate.touch()
            _assert_refused_no_worker("doomed", http, over_grpc)
        # the registration's own task records the failure after the pool has answered its queue
        assert wait_for(lambda: _describe(server, "doomed")["minWorkers"] == 0, timeout=10)
        described = _describe(server, "doomed")
        assert (described["workers"], described["minWorkers"], described["maxWorkers"]) == ([], 0, 0)
        _assert_steady_serves(server)
    finally:
        gate.touch()
        _unregister(server, "doomed")


def test_scaling_to_zero_and_unregistering_answer_the_waiting_jobs(server: TorchServe, stubs: Stubs,
                                                                 tmp_path: Path) -> None:
    """While a worker runs a batch and two jobs wait: scaling to 0 answers the waiting ones 503 at once
    and the running batch still gets its answer; unregistering does the same."""
    _gated_archive(server, "leaving", tmp_path)
    _register(server, "url=leaving.mar&initial_workers=1")
    try:
        for step, leave in enumerate(("scale", "unregister")):
            gate, started = tmp_path / f"gate{step}", tmp_path / f"started{step}"
            with ThreadPoolExecutor(3) as pool:
                running = pool.submit(_post, server, "leaving", {"gate": str(gate), "started": str(started)})
                assert wait_for(started.exists)
                http, over_grpc = _queue_two(pool, server, stubs, "leaving")
                if leave == "scale":
                    scaled = httpx.put(f"{server.management}/models/leaving?min_worker=0&synchronous=true",
                                       timeout=30)
                    assert scaled.status_code == 200, scaled.text
                else:
                    assert httpx.delete(f"{server.management}/models/leaving", timeout=30).status_code == 200
                _assert_refused_no_worker("leaving", http, over_grpc)  # before the running batch ends
                assert not running.done()
                gate.touch()
                answer = running.result(ANSWER_S + 5)
                assert answer.status_code == 200 and answer.json() == {"served": True}
            if leave == "scale":
                scaled = httpx.put(f"{server.management}/models/leaving?min_worker=1&synchronous=true", timeout=60)
                assert scaled.status_code == 200, scaled.text
        _assert_steady_serves(server)
    finally:
        for step in range(2):
            (tmp_path / f"gate{step}").touch()
        _unregister(server, "leaving")


def _bad_request(message: str) -> dict:
    return {"code": 400, "type": "BadRequestException", "message": message}


def _beyond(what: str, count: int) -> str:
    return (f"{what} {count} is more than this server's limit of {MAX_WORKERS} workers per model "
            "(--max-workers-per-model)")


def test_min_worker_beyond_the_limit_is_refused_and_starts_nothing(server: TorchServe, stubs: Stubs,
                                                                   tmp_path: Path) -> None:
    """Register (query, model-config, gRPC) and scale (HTTP, gRPC) asking for more workers than
    --max-workers-per-model: 400 / INVALID_ARGUMENT with the reason; the model is not registered, or
    keeps its workers."""
    _gated_archive(server, "many", tmp_path)
    refused = httpx.post(f"{server.management}/models?url=many.mar&initial_workers={MAX_WORKERS + 1}", timeout=30)
    assert refused.status_code == 400 and refused.json() == _bad_request(_beyond("initial_workers", MAX_WORKERS + 1))
    assert httpx.get(f"{server.management}/models/many", timeout=10).status_code == 404
    with pytest.raises(grpc.RpcError) as raised:
        stubs.management.RegisterModel(management_pb2.RegisterModelRequest(
            url="many.mar", initial_workers=MAX_WORKERS + 2, synchronous=True), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == (f"{_beyond('initial_workers', MAX_WORKERS + 2)}\n"
                                      "org.pytorch.serve.http.BadRequestException")
    config_folder = tmp_path / "configured"
    config_folder.mkdir()
    _gated_archive(server, "crowd", config_folder, {"minWorkers": 5, "maxWorkers": 5})
    crowd = httpx.post(f"{server.management}/models?url=crowd.mar", timeout=30)
    assert crowd.status_code == 400 and crowd.json() == _bad_request(_beyond("minWorkers", 5))
    assert httpx.get(f"{server.management}/models/crowd", timeout=10).status_code == 404

    before = [worker["pid"] for worker in _describe(server, "steady")["workers"]]
    scaled = httpx.put(f"{server.management}/models/steady?min_worker={MAX_WORKERS + 1}&synchronous=true",
                       timeout=30)
    assert scaled.status_code == 400 and scaled.json() == _bad_request(_beyond("min_worker", MAX_WORKERS + 1))
    with pytest.raises(grpc.RpcError) as raised:
        stubs.management.ScaleWorker(management_pb2.ScaleWorkerRequest(
            model_name="steady", min_worker=100_000, synchronous=True), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(_beyond("min_worker", 100_000))
    described = _describe(server, "steady")
    assert [worker["pid"] for worker in described["workers"]] == before
    assert (described["minWorkers"], described["maxWorkers"]) == (1, 1)
    _assert_steady_serves(server)


def test_default_workers_per_model_beyond_the_limit_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "config.properties").write_text("default_workers_per_model=8\n")
    done = subprocess.run([sys.executable, "-m", "servers.torchserve", "--ts-config", str(tmp_path / "config.properties"),
                           "--max-workers-per-model", "4"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert ("error: default_workers_per_model 8 is more than this server's limit of 4 workers per model "
            "(--max-workers-per-model)") in done.stderr.splitlines()
    done = subprocess.run([sys.executable, "-m", "servers.torchserve", "--max-workers-per-model", "0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "error: --max-workers-per-model must be at least 1, got 0" in done.stderr.splitlines()


def test_a_negative_min_worker_is_refused_and_changes_nothing(server: TorchServe, stubs: Stubs,
                                                              tmp_path: Path) -> None:
    """PUT ?min_worker=-1 (with or without max_worker): 400 BadRequestException, the workers and
    minWorkers/maxWorkers as they were. TorchServe 0.12 stores the -1, stops every worker and then fails
    with a 500 IndexOutOfBoundsException (WorkLoadManager.modelChanged removes index -1); this server
    refuses it instead. Where TorchServe reads a negative count as "not given", so does this server: a
    register's initial_workers=-1 registers with 0 workers, and gRPC ScaleWorker's min_worker=-1 is the
    default, 1."""
    _gated_archive(server, "few", tmp_path)
    _register(server, "url=few.mar&initial_workers=2&synchronous=true")
    try:
        before = sorted(worker["pid"] for worker in _describe(server, "few")["workers"])
        assert len(before) == 2
        for query in ("min_worker=-1", "min_worker=-1&synchronous=true", "min_worker=-1&max_worker=3",
                      "min_worker=-2&max_worker=-1"):
            refused = httpx.put(f"{server.management}/models/few?{query}", timeout=30)
            assert refused.status_code == 400, (query, refused.text)
            assert refused.json() == _bad_request("min_worker cannot be negative."), query
        described = _describe(server, "few")
        assert sorted(worker["pid"] for worker in described["workers"]) == before
        assert (described["minWorkers"], described["maxWorkers"]) == (2, 2)
        assert _post(server, "few", 1).json() == {"served": True}

        scaled = stubs.management.ScaleWorker(management_pb2.ScaleWorkerRequest(
            model_name="few", min_worker=-1, max_worker=-1, synchronous=True), timeout=30)
        assert scaled.msg == "Workers scaled to 1 for model: few"
        described = _describe(server, "few")
        assert (described["minWorkers"], described["maxWorkers"], len(described["workers"])) == (1, 1, 1)
    finally:
        _unregister(server, "few")
    registered = httpx.post(f"{server.management}/models?url=few.mar&initial_workers=-1", timeout=30)
    try:
        assert registered.status_code == 200
        assert registered.json() == {"status": 'Model "few" Version: 1.0 registered with 0 initial workers. '
                                               "Use scale workers API to add workers for the model."}
        described = _describe(server, "few")
        assert (described["minWorkers"], described["maxWorkers"], described["workers"]) == (0, 0, [])
    finally:
        _unregister(server, "few")
