"""servers/triton over gRPC (servers/triton/_grpc.py), judged by tritonclient.grpc (integration).

One server process serves HTTP and gRPC for the whole module (port 0 for both); expected answers come
from the same built-in models run in this process.
"""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
import tritonclient.grpc.aio as tritonclient_grpc_aio
import tritonclient.http as tritonclient_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from servers.models.builtin import Identity
from servers.triton._grpc import start_grpc
from servers.triton._health import HEALTH_SERVICE, HealthCheckRequest, HealthCheckResponse, ServingStatus
from servers.triton._infer import ModelHost
from tests.support.processes import ROOT, stop_process
from tests.support.triton import MODELS, Fronts, assert_matches, sample_input, start_fronts, write_paced_model

pytestmark = pytest.mark.integration
BATCHING = [name for name, model in MODELS.items() if model.max_batch_size > 0]


@pytest.fixture(scope="module")
def fronts() -> Iterator[Fronts]:
    started = start_fronts()
    yield started
    stop_process(started.proc)


@pytest.fixture(scope="module")
def client(fronts: Fronts):
    client = tritonclient_grpc.InferenceServerClient(fronts.grpc_url)
    yield client
    client.close()


def _inputs(module, data: np.ndarray) -> list:
    tensor = module.InferInput("INPUT0", list(data.shape), "BYTES" if data.dtype == object else "FP32")
    tensor.set_data_from_numpy(data)
    return [tensor]


def _stats(client, name: str) -> dict:
    return client.get_inference_statistics(name, as_json=True)["model_stats"][0]


def test_grpc_line_comes_before_the_http_line(fronts: Fronts) -> None:
    assert [line.split()[0] for line in fronts.lines[-2:]] == ["grpc", "listening"]
    assert fronts.grpc_url.startswith("127.0.0.1:") and fronts.grpc_url != fronts.http_url


def test_server_health_metadata_and_repository_index(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "triton" and "statistics" in metadata["extensions"]
    index = client.get_model_repository_index(as_json=True)["models"]
    assert sorted((entry["name"], entry["state"]) for entry in index) == [
        (name, "READY") for name in sorted(MODELS)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_metadata_and_config(client, name: str) -> None:
    model = MODELS[name]
    assert client.is_model_ready(name) and client.is_model_ready(name, "1")
    metadata = client.get_model_metadata(name, as_json=True)
    expected = model.metadata()
    assert metadata["versions"] == ["1"] and metadata["platform"] == expected["platform"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]] == [
        (t["name"], t["datatype"], t["shape"]) for t in expected["inputs"]]
    config = client.get_model_config(name).config
    assert config.name == name and config.max_batch_size == model.max_batch_size
    assert [(t.name, list(t.dims)) for t in config.input] == [(s.name, list(s.dims)) for s in model.inputs]
    assert config.input[0].data_type == config.output[0].data_type != 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_infer_matches_the_model_run_here(client, name: str) -> None:
    data = sample_input(name, 1)
    result = client.infer(name, _inputs(tritonclient_grpc, data), request_id="r-7")
    assert_matches(name, result.as_numpy("OUTPUT0"), data)
    response = result.get_response()
    assert response.id == "r-7" and response.model_version == "1" and response.raw_output_contents


@pytest.mark.parametrize("name", BATCHING)
def test_batch_of_four_counts_four_inferences(client, name: str) -> None:
    before = _stats(client, name)
    data = sample_input(name, 4)
    result = client.infer(name, _inputs(tritonclient_grpc, data),
                          outputs=[tritonclient_grpc.InferRequestedOutput("OUTPUT0")])
    assert_matches(name, result.as_numpy("OUTPUT0"), data)
    after = _stats(client, name)
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 4
    assert int(after["execution_count"]) - int(before.get("execution_count", 0)) == 1


def test_typed_contents_inputs_are_accepted(fronts: Fronts) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_bytes")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2])
    tensor.contents.bytes_contents.extend([b"a", b"bc"])
    numbers = service_pb2.ModelInferRequest(model_name="identity")
    numbers.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(
        [1, 2.5, -3])
    with grpc.insecure_channel(fronts.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        text = stub.ModelInfer(request, timeout=5)
        floats = stub.ModelInfer(numbers, timeout=5)
    assert text.raw_output_contents[0] == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"
    assert np.frombuffer(floats.raw_output_contents[0], "<f4").tolist() == [1, 2.5, -3]
    assert list(floats.outputs[0].shape) == [1, 3] and floats.outputs[0].datatype == "FP32"


def test_http_and_grpc_share_the_statistics(client, fronts: Fronts) -> None:
    http = tritonclient_http.InferenceServerClient(fronts.http_url)
    try:
        before = _stats(client, "identity")
        data = sample_input("identity", 2)
        client.infer("identity", _inputs(tritonclient_grpc, data))
        http.infer("identity", _inputs(tritonclient_http, data))
        from_grpc = _stats(client, "identity")
        from_http = http.get_inference_statistics("identity")["model_stats"][0]
    finally:
        http.close()
    success = int(before.get("inference_stats", {}).get("success", {}).get("count", 0))
    assert int(from_grpc["inference_stats"]["success"]["count"]) == success + 2
    assert from_http["inference_stats"]["success"]["count"] == success + 2
    assert from_http["inference_count"] == int(from_grpc["inference_count"])


@pytest.mark.parametrize("call", ["metadata", "config", "stats", "infer", "version"])
def test_unknown_model_is_not_found_with_tritons_message(client, call: str) -> None:
    actions = {
        "metadata": lambda: client.get_model_metadata("nope"),
        "config": lambda: client.get_model_config("nope"),
        "stats": lambda: client.get_inference_statistics("nope"),
        "infer": lambda: client.infer("nope", _inputs(tritonclient_grpc, sample_input("identity", 1))),
        "version": lambda: client.get_model_metadata("identity", "7"),
    }
    with pytest.raises(InferenceServerException) as raised:
        actions[call]()
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    assert "Request for unknown model" in raised.value.message()
    assert not client.is_model_ready("nope") and client.is_server_live()


BAD_INPUTS = {
    "shape": (np.zeros((1, 5), np.float32), "FP32", "unexpected shape for input 'INPUT0' for model 'mlp'"),
    "batch": (np.zeros((33, 16), np.float32), "FP32", "batch-size must be <= 32"),
    "datatype": (np.zeros((1, 16), np.float64), "FP64", "data-type is 'FP64', but model 'mlp' expects 'FP32'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_invalid_argument_and_the_server_goes_on(client, case: str) -> None:
    data, datatype, expected = BAD_INPUTS[case]
    tensor = tritonclient_grpc.InferInput("INPUT0", list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    before = _stats(client, "mlp")
    with pytest.raises(InferenceServerException) as raised:
        client.infer("mlp", [tensor])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert expected in raised.value.message()
    fail = int(before.get("inference_stats", {}).get("fail", {}).get("count", 0))
    assert int(_stats(client, "mlp")["inference_stats"]["fail"]["count"]) == fail + 1
    assert client.is_server_ready()


def test_asyncio_client_infers(fronts: Fronts) -> None:
    async def run() -> list[np.ndarray]:
        async with tritonclient_grpc_aio.InferenceServerClient(fronts.grpc_url) as aio_client:
            assert await aio_client.is_server_live()
            calls = [aio_client.infer("mlp", _inputs(tritonclient_grpc_aio, sample_input("mlp", batch)))
                     for batch in (1, 2, 3)]
            return [result.as_numpy("OUTPUT0") for result in await asyncio.gather(*calls)]

    for batch, got in zip((1, 2, 3), asyncio.run(run())):
        assert_matches("mlp", got, sample_input("mlp", batch))


def test_stream_answers_each_request_in_order_and_errors_keep_it_open(fronts: Fronts) -> None:
    results: queue.Queue = queue.Queue()
    client = tritonclient_grpc.InferenceServerClient(fronts.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for index in range(6):
            name = "nope" if index == 3 else "identity"
            data = np.full((1, 4), index, np.float32)
            client.async_stream_infer(name, _inputs(tritonclient_grpc, data), request_id=str(index),
                                      enable_empty_final_response=index == 5)
        got = [results.get(timeout=5) for _ in range(6)]
        client.stop_stream()
    finally:
        client.close()
    for index, (result, error) in enumerate(got):
        if index == 3:
            assert result is None and "Request for unknown model: 'nope'" in error.message()
            continue
        assert error is None and result.get_response().id == str(index)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 4), index, np.float32))
    assert got[5][0].get_response().parameters["triton_final_response"].bool_param
    assert "triton_final_response" not in got[0][0].get_response().parameters


class _Threaded(Identity):
    """An identity that must run in a worker thread and says which thread ran it."""

    inline = False
    threads: ClassVar[list[str]] = []

    def infer(self, inputs):
        self.threads.append(threading.current_thread().name)
        return super().infer(inputs)


def test_models_not_inline_run_in_the_worker_pool_in_process() -> None:
    host = ModelHost({"threaded": _Threaded("threaded")})
    request = service_pb2.ModelInferRequest(model_name="threaded", raw_input_contents=[b"\x00\x00\x80\x3f"])
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])

    async def run() -> service_pb2.ModelInferResponse:
        with ThreadPoolExecutor(1, thread_name_prefix="infer") as executor:
            server, port = await start_grpc(host, executor, "127.0.0.1", 0)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    return await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
            finally:
                await server.stop(None)

    response = asyncio.run(run())
    assert response.raw_output_contents == [b"\x00\x00\x80\x3f"]
    assert _Threaded.threads and _Threaded.threads[0].startswith("infer")
    assert host.stats["threaded"].snapshot()["inference_stats"]["queue"]["count"] == 1


def test_help_describes_grpc() -> None:
    done = subprocess.run([sys.executable, "-m", "servers.triton", "--help"], check=True,
                          capture_output=True, text=True, cwd=ROOT, timeout=20)
    grpc_help = done.stdout.split("\n  --grpc-port")[1].split("\n  --")[0]
    assert "GRPCInferenceService" in " ".join(grpc_help.split())


def _health_check(channel: grpc.Channel, service: str) -> int:
    check = channel.unary_unary(f"/{HEALTH_SERVICE}/Check",
                                request_serializer=HealthCheckRequest.SerializeToString,
                                response_deserializer=HealthCheckResponse.FromString)
    return check(HealthCheckRequest(service=service), timeout=5).status


def test_health_messages_are_health_protos_wire_form() -> None:
    # grpc/health/v1/health.proto: HealthCheckRequest{string service = 1},
    # HealthCheckResponse{ServingStatus status = 1}
    assert HealthCheckRequest(service="inference.GRPCInferenceService").SerializeToString() == (
        b"\x0a\x1einference.GRPCInferenceService")
    assert HealthCheckResponse(status=ServingStatus.NOT_SERVING).SerializeToString() == b"\x08\x02"
    assert HealthCheckResponse.FromString(b"\x08\x01").status == ServingStatus.SERVING


@pytest.mark.parametrize("service", ["", "inference.GRPCInferenceService", "any.Other"])
def test_health_check_is_serving_when_ready(fronts: Fronts, service: str) -> None:
    # tritonserver answers Check from server readiness whatever the service name (grpc_server.cc)
    with grpc.insecure_channel(fronts.grpc_url) as channel:
        assert _health_check(channel, service) == ServingStatus.SERVING


def test_health_watch_is_unimplemented_as_in_tritonserver(fronts: Fronts) -> None:
    with grpc.insecure_channel(fronts.grpc_url) as channel:
        watch = channel.unary_stream(f"/{HEALTH_SERVICE}/Watch",
                                     request_serializer=HealthCheckRequest.SerializeToString,
                                     response_deserializer=HealthCheckResponse.FromString)
        with pytest.raises(grpc.RpcError) as raised:
            list(watch(HealthCheckRequest(), timeout=5))
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("strict", [True, False])
def test_health_check_follows_readiness_with_a_broken_model(tmp_path, strict: bool) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\ninput [ { name: "X" data_type: TYPE_NOPE dims: [ 1 ] } ]\n')
    host = ModelHost(repository=tmp_path, strict_readiness=strict, allow_python_backend=True)
    host.load_repository()

    async def run() -> tuple[int, bool]:
        with ThreadPoolExecutor(1) as executor:
            server, port = await start_grpc(host, executor, "127.0.0.1", 0)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    check = channel.unary_unary(f"/{HEALTH_SERVICE}/Check",
                                                request_serializer=HealthCheckRequest.SerializeToString,
                                                response_deserializer=HealthCheckResponse.FromString)
                    status = (await check(HealthCheckRequest(service=""), timeout=5)).status
                    ready = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                        service_pb2.ServerReadyRequest(), timeout=5)
                    return status, ready.ready
            finally:
                await server.stop(None)

    status, ready = asyncio.run(run())
    host.close()
    assert ready is not strict
    assert status == (ServingStatus.NOT_SERVING if strict else ServingStatus.SERVING)


_SLEEPER = '''
import time
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            time.sleep(float(x[0]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", x)]))
        return responses
'''


def _write_sleeper(repository: Path) -> None:
    """The `sleeper` model (four instances, FP32 [1]) in `repository`: the paced model's config, _SLEEPER's code."""
    write_paced_model(repository, 0.0, width=1, instances=4, name="sleeper")
    (repository / "sleeper" / "1" / "model.py").write_text(_SLEEPER)


@pytest.fixture(scope="module")
def sleeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fronts]:
    """A server whose `sleeper` model (four instances) sleeps as many seconds as its first input says."""
    repository = tmp_path_factory.mktemp("repo")
    _write_sleeper(repository)
    started = start_fronts("--model-repository", str(repository), "--allow-python-backend")
    yield started
    stop_process(started.proc)


def test_stream_requests_run_concurrently_and_answer_as_they_complete(sleeper: Fronts) -> None:
    delays = [0.6, 0.2, 0.2, 0.2]  # four instances: all at once take 0.6 s, one after another 1.2 s
    results: queue.Queue = queue.Queue()
    client = tritonclient_grpc.InferenceServerClient(sleeper.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((time.perf_counter(), result, error)))
        start = time.perf_counter()
        for index, delay in enumerate(delays):
            tensor = tritonclient_grpc.InferInput("INPUT0", [1], "FP32")
            tensor.set_data_from_numpy(np.array([delay], np.float32))
            client.async_stream_infer("sleeper", [tensor], request_id=f"r{index}")
        got = [results.get(timeout=10) for _ in delays]
        client.stop_stream()
    finally:
        client.close()
    assert all(error is None for _, _, error in got), got
    ids = [result.get_response().id for _, result, _ in got]
    assert sorted(ids) == ["r0", "r1", "r2", "r3"]  # each answered once
    assert ids[-1] == "r0"  # the slow first request does not hold back the quick ones after it
    for _, result, _ in got:
        assert result.as_numpy("OUTPUT0").tolist() == [np.float32(delays[int(result.get_response().id[1:])])]
    elapsed = got[-1][0] - start
    assert max(delays) <= elapsed < max(delays) + 0.35 < sum(delays)
    quick_done = got[-2][0] - start
    assert quick_done < 0.45  # the 0.2 s requests were answered before the 0.6 s one finished


def test_stream_end_waits_for_the_requests_in_flight_and_errors_name_their_request(sleeper: Fronts) -> None:
    request = service_pb2.ModelInferRequest(model_name="sleeper", id="slow",
                                            raw_input_contents=[np.array([0.3], np.float32).tobytes()])
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
    unknown = service_pb2.ModelInferRequest(model_name="nope", id="bad")
    wrong = service_pb2.ModelInferRequest(model_name="sleeper", id="wrong", raw_input_contents=[b"\x00" * 8])
    wrong.inputs.add(name="INPUT0", datatype="FP64", shape=[1])
    with grpc.insecure_channel(sleeper.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        # the client half-closes at once after its requests; the slow answer still comes before the end
        responses = list(stub.ModelStreamInfer(iter([request, unknown, wrong]), timeout=10))
    assert [response.infer_response.id for response in responses] == ["bad", "wrong", "slow"]
    assert "Request for unknown model: 'nope'" in responses[0].error_message
    assert "data-type is 'FP64', but model 'sleeper' expects 'FP32'" in responses[1].error_message
    assert responses[2].error_message == "" and responses[2].infer_response.raw_output_contents


def test_stream_requests_for_a_model_in_the_worker_pool_are_answered_in_process() -> None:
    host = ModelHost({"threaded": _Threaded("threaded")})
    requests = []
    for index in range(3):
        request = service_pb2.ModelInferRequest(model_name="threaded", id=str(index),
                                                raw_input_contents=[np.float32(index).tobytes()])
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
        requests.append(request)

    async def run() -> list[service_pb2.ModelStreamInferResponse]:
        with ThreadPoolExecutor(2, thread_name_prefix="infer") as executor:
            server, port = await start_grpc(host, executor, "127.0.0.1", 0)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests))
                    return [response async for response in call]
            finally:
                await server.stop(None)

    responses = asyncio.run(run())
    assert sorted(response.infer_response.id for response in responses) == ["0", "1", "2"]
    for response in responses:
        assert response.error_message == ""
        index = int(response.infer_response.id)
        assert response.infer_response.raw_output_contents == [np.float32(index).tobytes()]
    assert host.stats["threaded"].snapshot()["inference_stats"]["success"]["count"] == 3


def test_stream_requests_in_flight_are_bounded(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import servers.triton._grpc as grpc_front

    monkeypatch.setattr(grpc_front, "STREAM_CONCURRENCY", 2)
    _write_sleeper(tmp_path)
    host = ModelHost(repository=tmp_path, allow_python_backend=True)
    host.load_repository()
    requests = []
    for index in range(4):
        request = service_pb2.ModelInferRequest(model_name="sleeper", id=str(index),
                                                raw_input_contents=[np.float32(0.2).tobytes()])
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
        requests.append(request)

    async def run() -> tuple[list[str], float]:
        with ThreadPoolExecutor(1) as executor:
            server, port = await start_grpc(host, executor, "127.0.0.1", 0)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    start = time.perf_counter()
                    call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests))
                    ids = [response.infer_response.id async for response in call]
                    return ids, time.perf_counter() - start
            finally:
                await server.stop(None)

    try:
        ids, elapsed = asyncio.run(run())
    finally:
        host.close()
    assert sorted(ids) == ["0", "1", "2", "3"]
    # four instances could run all four at once (0.2 s); two in flight at a time take two rounds
    assert 0.4 <= elapsed < 0.75
