"""servers/triton serving a Triton model repository (integration), judged by tritonclient.

One server per module serves a repository written by `make-repo` (TorchScript, ONNX and Python-backend
models) next to a broken model, over HTTP and gRPC. Every answer is compared with the same repository
model loaded in this process (servers/triton/repository.py). Further servers cover dynamic batching
under concurrent clients, explicit load/unload, and version policies.
"""

from __future__ import annotations

import asyncio
import base64
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from servers.core.model import NUMPY_DTYPES, Model
from servers.models.make_repo import make_repo
from servers.triton.repository import load_model
from tests.support.processes import stop_process
from tests.support.triton import Fronts, start_fronts

pytestmark = pytest.mark.integration

_BROKEN_CONFIG = 'name: "broken"\nbackend: "python"\nmax_batch_size: 4\ninput [ { name: "X" data_type: TYPE_NOPE dims: [ 1 ] } ]\n'


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    make_repo(root, digits=False, minilm=False, python=True)
    broken = root / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text(_BROKEN_CONFIG)
    return root


@pytest.fixture(scope="module")
def in_process(repository: Path) -> dict[str, Model]:
    """Each good model of the repository, loaded here: the expected answers."""
    names = [path.name for path in sorted(repository.iterdir()) if path.name != "broken"]
    return {name: load_model(repository, name, allow_python_backend=True).versions["1"].instances[0]
            for name in names}


@pytest.fixture(scope="module")
def fronts(repository: Path) -> Iterator[Fronts]:
    started = start_fronts("--model-repository", str(repository), "--allow-python-backend", timeout=120)
    yield started
    stop_process(started.proc)


def _inputs(model: Model, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in model.inputs:
        dims = [4 if dim == -1 else dim for dim in spec.dims]
        shape = [batch, *dims] if model.max_batch_size > 0 else dims
        if spec.datatype == "BYTES":
            arrays[spec.name] = np.array([f"s{seed}-{i}".encode() for i in range(int(np.prod(shape)))],
                                         dtype=object).reshape(shape)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(NUMPY_DTYPES[spec.datatype])
    return arrays


def _assert_same(model: Model, got: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> None:
    expected = model.infer(inputs)
    for spec in model.outputs:
        if spec.datatype == "BYTES":
            def as_bytes(array: np.ndarray) -> list[bytes]:
                return [x if isinstance(x, bytes) else str(x).encode() for x in array.ravel()]

            assert as_bytes(got[spec.name]) == as_bytes(expected[spec.name])
        else:
            np.testing.assert_allclose(got[spec.name], expected[spec.name], rtol=1e-5, atol=1e-5)


def _http_infer(client: httpclient.InferenceServerClient, model: Model, inputs: dict, binary: bool) -> dict:
    wire = []
    for spec in model.inputs:
        tensor = httpclient.InferInput(spec.name, list(inputs[spec.name].shape), spec.datatype)
        tensor.set_data_from_numpy(inputs[spec.name], binary_data=binary)
        wire.append(tensor)
    outputs = [httpclient.InferRequestedOutput(spec.name, binary_data=binary) for spec in model.outputs]
    result = client.infer(model.name, wire, outputs=outputs)
    return {spec.name: result.as_numpy(spec.name) for spec in model.outputs}


def _grpc_inputs(module, model: Model, inputs: dict) -> list:
    wire = []
    for spec in model.inputs:
        tensor = module.InferInput(spec.name, list(inputs[spec.name].shape), spec.datatype)
        tensor.set_data_from_numpy(inputs[spec.name])
        wire.append(tensor)
    return wire


def test_index_readiness_and_the_broken_model(fronts: Fronts, in_process: dict[str, Model]) -> None:
    index = httpx.post("http://" + fronts.http_url + "/v2/repository/index").json()
    states = {row["name"]: row for row in index}
    assert {name for name, row in states.items() if row.get("state") == "READY"} == set(in_process)
    assert states["broken"]["state"] == "UNAVAILABLE"
    assert "broken" in states["broken"]["reason"] and "data_type" in states["broken"]["reason"]
    assert httpx.get("http://" + fronts.http_url + "/v2/health/ready").status_code == 400  # strict readiness
    assert httpx.get("http://" + fronts.http_url + "/v2/health/live").status_code == 200
    assert httpx.get("http://" + fronts.http_url + "/v2/models/broken/ready").status_code == 400
    client = grpcclient.InferenceServerClient(fronts.grpc_url)
    assert not client.is_server_ready()
    assert not client.is_model_ready("broken")
    assert all(client.is_model_ready(name) for name in in_process)
    ready_only = client.get_model_repository_index(as_json=True)["models"]
    assert any(row["name"] == "broken" and row["state"] == "UNAVAILABLE" for row in ready_only)


def test_metadata_and_config_are_the_repository_config(fronts: Fronts, in_process: dict[str, Model]) -> None:
    http = httpclient.InferenceServerClient(fronts.http_url)
    grpc = grpcclient.InferenceServerClient(fronts.grpc_url)
    for name, model in in_process.items():
        metadata = http.get_model_metadata(name)
        assert metadata["versions"] == ["1"]
        assert [tensor["name"] for tensor in metadata["inputs"]] == [spec.name for spec in model.inputs]
        config = http.get_model_config(name)
        assert config["name"] == name and config["max_batch_size"] == model.max_batch_size
        assert grpc.get_model_config(name, as_json=True)["config"]["name"] == name
    assert http.get_model_metadata("mlp")["platform"] == "pytorch_libtorch"
    assert http.get_model_metadata("mlp_onnx")["platform"] == "onnxruntime_onnx"
    assert http.get_model_metadata("identity")["platform"] == "python"
    batching = http.get_model_config("mlp")["dynamic_batching"]
    assert batching["preferred_batch_size"] and isinstance(batching["max_queue_delay_microseconds"], int)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_http_infer_equals_the_model_in_process(fronts: Fronts, in_process: dict[str, Model], binary: bool) -> None:
    client = httpclient.InferenceServerClient(fronts.http_url)
    for seed, (name, model) in enumerate(in_process.items()):
        inputs = _inputs(model, 3, seed)
        _assert_same(model, _http_infer(client, model, inputs, binary), inputs)


def test_grpc_sync_async_and_stream_equal_the_model_in_process(fronts: Fronts,
                                                               in_process: dict[str, Model]) -> None:
    client = grpcclient.InferenceServerClient(fronts.grpc_url)
    for seed, (name, model) in enumerate(in_process.items()):
        inputs = _inputs(model, 2, seed)
        result = client.infer(name, _grpc_inputs(grpcclient, model, inputs))
        _assert_same(model, {spec.name: result.as_numpy(spec.name) for spec in model.outputs}, inputs)

    async def over_aio() -> None:
        async with grpcclient_aio.InferenceServerClient(fronts.grpc_url) as aio:
            for seed, (name, model) in enumerate(in_process.items()):
                inputs = _inputs(model, 1, 100 + seed)
                result = await aio.infer(name, _grpc_inputs(grpcclient_aio, model, inputs))
                _assert_same(model, {spec.name: result.as_numpy(spec.name) for spec in model.outputs}, inputs)

    asyncio.run(over_aio())

    answers: list = []
    done = threading.Event()

    def callback(result, error) -> None:
        answers.append((result, error))
        if len(answers) == len(in_process):
            done.set()

    stream = grpcclient.InferenceServerClient(fronts.grpc_url)
    stream.start_stream(callback)
    sent = {}
    for seed, (name, model) in enumerate(in_process.items()):
        sent[f"r{seed}"] = (model, _inputs(model, 1, 200 + seed))
        stream.async_stream_infer(name, _grpc_inputs(grpcclient, model, sent[f"r{seed}"][1]), request_id=f"r{seed}")
    assert done.wait(60)
    stream.stop_stream()
    for result, error in answers:
        assert error is None
        model, inputs = sent[result.get_response().id]
        _assert_same(model, {spec.name: result.as_numpy(spec.name) for spec in model.outputs}, inputs)


def test_bad_requests_name_the_problem_and_leave_models_serving(fronts: Fronts,
                                                               in_process: dict[str, Model]) -> None:
    client = httpclient.InferenceServerClient(fronts.http_url)
    wrong = httpclient.InferInput("INPUT0", [1, 7], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 7), np.float32))
    with pytest.raises(InferenceServerException, match="unexpected shape"):
        client.infer("mlp", [wrong])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("broken", [wrong])
    with pytest.raises(InferenceServerException, match="version 7"):
        client.infer("mlp", [wrong], model_version="7")
    with pytest.raises(InferenceServerException, match="explicit model load"):
        client.load_model("mlp")  # control mode none
    inputs = _inputs(in_process["mlp"], 1, 9)
    _assert_same(in_process["mlp"], _http_infer(client, in_process["mlp"], inputs, True), inputs)
    stats = client.get_inference_statistics("mlp")["model_stats"][0]
    assert stats["inference_stats"]["fail"]["count"] >= 1


def test_concurrent_clients_are_batched_and_each_gets_its_own_rows(fronts: Fronts,
                                                                  in_process: dict[str, Model]) -> None:
    model = in_process["mlp"]
    client = httpclient.InferenceServerClient(fronts.http_url)
    before = client.get_inference_statistics("mlp")["model_stats"][0]
    failures: list[str] = []
    rounds, clients = 20, 16

    def one_client(index: int) -> None:
        own = httpclient.InferenceServerClient(fronts.http_url)
        for round_ in range(rounds):
            inputs = {"INPUT0": np.full((1, 16), index * 100 + round_, dtype=np.float32)}
            got = _http_infer(own, model, inputs, True)
            try:
                _assert_same(model, got, inputs)
            except AssertionError as exc:
                failures.append(f"client {index} round {round_}: {exc}")

    threads = [threading.Thread(target=one_client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    after = client.get_inference_statistics("mlp")["model_stats"][0]
    requests = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    executions = after["execution_count"] - before["execution_count"]
    assert requests == rounds * clients
    assert after["inference_count"] - before["inference_count"] == requests
    assert executions < requests, (executions, requests)
    assert any(entry["batch_size"] > 1 for entry in after["batch_stats"])


_VERSIONED_MODEL = textwrap.dedent('''
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            self.scale = float(args["model_version"])

        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                out = pb_utils.Tensor("OUTPUT0", (x * self.scale).astype(np.float32))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            return responses
''')


def _scaled_model(root: Path, name: str, versions: list[int], policy: str = "") -> None:
    folder = root / name
    for version in versions:
        (folder / str(version)).mkdir(parents=True)
        (folder / str(version) / "model.py").write_text(_VERSIONED_MODEL)
    (folder / "config.pbtxt").write_text(
        f'backend: "python"\nmax_batch_size: 4\n{policy}\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n')


def _scaled_infer(client: httpclient.InferenceServerClient, name: str, version: str = "") -> float:
    tensor = httpclient.InferInput("INPUT0", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
    return float(client.infer(name, [tensor], model_version=version).as_numpy("OUTPUT0")[0, 0])


def test_versions_policy_and_explicit_load_unload(tmp_path: Path) -> None:
    _scaled_model(tmp_path, "latest", [1, 2, 3])
    _scaled_model(tmp_path, "two", [1, 2, 3], "version_policy: { latest: { num_versions: 2 } }")
    _scaled_model(tmp_path, "later", [5])
    started = start_fronts("--model-repository", str(tmp_path), "--allow-python-backend",
                           "--model-control-mode", "explicit", "--load-model", "latest", "--load-model", "two",
                           timeout=60)
    try:
        client = httpclient.InferenceServerClient(started.http_url)
        assert client.get_model_metadata("latest")["versions"] == ["3"]
        assert _scaled_infer(client, "latest") == 3.0
        assert client.get_model_metadata("two")["versions"] == ["2", "3"]
        assert _scaled_infer(client, "two", "2") == 2.0 and _scaled_infer(client, "two") == 3.0
        with pytest.raises(InferenceServerException, match="version 1"):
            _scaled_infer(client, "two", "1")
        assert not client.is_model_ready("later")
        assert client.is_server_ready()  # only what was asked for counts
        client.load_model("later")
        assert client.is_model_ready("later") and _scaled_infer(client, "later") == 5.0
        grpc = grpcclient.InferenceServerClient(started.grpc_url)
        grpc.unload_model("later")
        assert not client.is_model_ready("later")
        with pytest.raises(InferenceServerException, match="unknown model"):
            _scaled_infer(client, "later")
        rows = {row["name"]: row for row in client.get_model_repository_index()}
        assert rows["later"]["state"] == "UNAVAILABLE" and rows["later"]["reason"] == "unloaded"
        grpc.load_model("later")
        assert _scaled_infer(client, "later") == 5.0
        with pytest.raises(InferenceServerException, match="missing"):
            client.load_model("missing")
    finally:
        stop_process(started.proc)


_MARKING_MODEL = textwrap.dedent('''
    from pathlib import Path

    import triton_python_backend_utils as pb_utils

    Path({marker!r}).write_text("ran")  # on import: proof that the server ran this file


    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())]) for r in requests]
''')
_MARKING_CONFIG = ('backend: "python"\nmax_batch_size: 0\n'
                   'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                   'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')


def test_python_backend_code_runs_only_with_the_flag(tmp_path: Path) -> None:
    """Without --allow-python-backend neither the repository's model.py nor one sent in a load request is
    run (a file it writes on import never appears); the model is UNAVAILABLE with the reason, the load
    request fails with it, and the other models serve. With the flag the same folder loads and serves."""
    marker = tmp_path / "ran"
    repository = tmp_path / "repo"
    (repository / "marking" / "1").mkdir(parents=True)
    (repository / "marking" / "1" / "model.py").write_text(_MARKING_MODEL.format(marker=str(marker)))
    (repository / "marking" / "config.pbtxt").write_text(_MARKING_CONFIG)
    make_repo(repository, digits=False, minilm=False)  # mlp and the rest: they serve either way
    started = start_fronts("--model-repository", str(repository), "--model-control-mode", "explicit",
                           "--load-model", "marking", "--load-model", "mlp", timeout=120)
    try:
        client = httpclient.InferenceServerClient(started.http_url)
        rows = {row["name"]: row for row in client.get_model_repository_index()}
        assert rows["marking"]["state"] == "UNAVAILABLE"
        assert "--allow-python-backend" in rows["marking"]["reason"]
        assert client.is_model_ready("mlp") and not client.is_model_ready("marking")
        with pytest.raises(InferenceServerException, match="--allow-python-backend"):
            client.load_model("marking")
        files = {"config": '{"backend": "python", "max_batch_size": 0}',
                 "file:1/model.py": base64.b64encode(_MARKING_MODEL.format(marker=str(marker)).encode()).decode()}
        answer = httpx.post(f"http://{started.http_url}/v2/repository/models/sent/load",
                            json={"parameters": files}, timeout=30)
        assert answer.status_code == 400 and "--allow-python-backend" in answer.json()["error"]
        assert not marker.exists()
        assert client.is_server_live() and client.is_model_ready("mlp")
    finally:
        stop_process(started.proc)
    assert "--allow-python-backend" in started.proc.stderr.read()
    assert not marker.exists()

    started = start_fronts("--model-repository", str(repository), "--allow-python-backend",
                           "--model-control-mode", "explicit", "--load-model", "marking", timeout=60)
    try:
        client = httpclient.InferenceServerClient(started.http_url)
        assert client.is_model_ready("marking") and marker.read_text() == "ran"
        tensor = httpclient.InferInput("INPUT0", [1], "FP32")
        tensor.set_data_from_numpy(np.array([2.5], np.float32))
        assert client.infer("marking", [tensor]).as_numpy("OUTPUT0").tolist() == [2.5]
    finally:
        stop_process(started.proc)
