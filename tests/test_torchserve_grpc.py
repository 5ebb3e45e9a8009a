"""The TorchServe-compatible server's gRPC APIs through the stubs of loadgen/lowlevel/torchserve_proto.

grpc.json's calls are made again, in order, against this server started as the recorded one was
(config.properties, mlp loaded at start): the same status code, and the same response message (compared
as protobuf text, as recorded; describe as JSON structure). Two recorded answers come from a failure of
the recorded server, and this one answers as a working TorchServe does instead: its StreamPredictions
on the mlp killed the worker ("Worker died."), and the ScaleWorker after it found that worker still
restarting ("Workers scaling in progress..."). Also: streaming handlers over StreamPredictions,
StreamPredictions2, the generated stubs matching the .proto, and token authorization over gRPC.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2, text_format

from loadgen.lowlevel.torchserve_proto import (
    inference_pb2,
    management_pb2,
)
from loadgen.lowlevel.torchserve_proto.generate import generate
from tests.support.torchserve import (
    MLP_JSON,
    ONE_MLP_WORKER,
    OPEN,
    Stubs,
    TorchServe,
    archive,
    assert_same,
    load_capture,
    start_torchserve,
)

pytestmark = pytest.mark.integration

NOT_FOUND_CLASS = "org.pytorch.serve.archive.model.ModelNotFoundException"
BAD_REQUEST_CLASS = "org.pytorch.serve.http.BadRequestException"

STREAM_HANDLER = '''
from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    for part in ("one", "two"):
        send_intermediate_predict_response([part] * len(data), context.request_ids, "Intermediate", 200,
                                           context)
    return ["three"] * len(data)
'''


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("store")
    for name in ("mlp", "echo"):
        shutil.copy(model_store / f"{name}.mar", store / f"{name}.mar")
    work = tmp_path_factory.mktemp("work")
    (work / "stream_handler.py").write_text(STREAM_HANDLER)
    archive(store, "stream", work / "stream_handler.py")
    running = start_torchserve(store, tmp_path_factory.mktemp("server"), "--models", "mlp=mlp.mar",
                               "stream=stream.mar", config=[*OPEN, ONE_MLP_WORKER])
    yield running
    running.stop()


@pytest.fixture
def stubs(server: TorchServe):
    made = Stubs(server)
    yield made
    made.close()


def _calls(stubs: Stubs) -> dict:
    """The recorded calls, by their names in grpc.json."""
    inference, management = stubs.inference, stubs.management
    mlp = MLP_JSON.encode()

    def predictions(model: str, key: str, value: bytes, version: str = "") -> object:
        return inference.Predictions(inference_pb2.PredictionsRequest(model_name=model, model_version=version,
                                                                      input={key: value}), timeout=30)

    echo = management_pb2.RegisterModelRequest(url="echo.mar", initial_workers=1, synchronous=True)
    return {
        "Ping": lambda: inference.Ping(empty_pb2.Empty(), timeout=10),
        "Predictions mlp (input key 'data')": lambda: predictions("mlp", "data", mlp),
        "Predictions mlp (input key 'body')": lambda: predictions("mlp", "body", mlp),
        "Predictions missing": lambda: predictions("missing", "data", mlp),
        "Predictions malformed": lambda: predictions("mlp", "data", b"{not json"),
        "Predictions bad version": lambda: predictions("mlp", "data", mlp, version="9.9"),
        "StreamPredictions mlp": lambda: list(inference.StreamPredictions(
            inference_pb2.PredictionsRequest(model_name="mlp", input={"data": mlp}), timeout=30)),
        "ListModels": lambda: management.ListModels(management_pb2.ListModelsRequest(), timeout=10),
        "DescribeModel mlp": lambda: management.DescribeModel(
            management_pb2.DescribeModelRequest(model_name="mlp"), timeout=10),
        "DescribeModel missing": lambda: management.DescribeModel(
            management_pb2.DescribeModelRequest(model_name="missing"), timeout=10),
        "ScaleWorker mlp min 1 sync": lambda: management.ScaleWorker(
            management_pb2.ScaleWorkerRequest(model_name="mlp", min_worker=1, synchronous=True), timeout=60),
        "RegisterModel echo": lambda: management.RegisterModel(echo, timeout=120),
        "RegisterModel echo again": lambda: management.RegisterModel(echo, timeout=120),
        "Predictions echo": lambda: predictions("echo", "data", b"[1.0, 2.0]"),
        "SetDefault echo 1.0": lambda: management.SetDefault(
            management_pb2.SetDefaultRequest(model_name="echo", model_version="1.0"), timeout=10),
        "UnregisterModel echo": lambda: management.UnregisterModel(
            management_pb2.UnregisterModelRequest(model_name="echo"), timeout=10),
        "UnregisterModel missing": lambda: management.UnregisterModel(
            management_pb2.UnregisterModelRequest(model_name="missing"), timeout=10),
    }


def test_grpc_calls_replay_grpc_json(stubs: Stubs) -> None:
    calls = _calls(stubs)
    failures = []
    for recorded in load_capture("grpc.json"):
        name = recorded["name"]
        try:
            _check(name, recorded, calls[name])
        except AssertionError as error:
            failures.append(f"{name}: {error}")
    assert failures == []


def _check(name: str, recorded: dict, call) -> None:
    if name == "StreamPredictions mlp":  # the recorded server's worker died here; a working one answers
        responses = call()
        predictions = load_capture("grpc.json")[1]["response"]
        assert [str(response) for response in responses] == [predictions]
        return
    try:
        response = call()
    except grpc.RpcError as error:
        assert not recorded["ok"], (error.code(), error.details())
        assert str(error.code()) == recorded["code"]
        assert error.details() == recorded["details"]
        return
    assert recorded["ok"], response
    if name == "DescribeModel mlp":
        want = json.loads(text_format.Parse(recorded["response"], management_pb2.ManagementResponse()).msg)
        assert_same(want, json.loads(response.msg), values=False)
        assert json.loads(response.msg)[0]["workers"][0]["status"] == "READY"
    elif name == "ScaleWorker mlp min 1 sync":  # recorded "Workers scaling in progress..." (a worker died)
        assert response.msg == "Workers scaled to 1 for model: mlp"
    else:
        assert str(response) == recorded["response"]


def test_stream_predictions_yield_each_part(stubs: Stubs) -> None:
    request = inference_pb2.PredictionsRequest(model_name="stream", input={"data": b"go"})
    responses = list(stubs.inference.StreamPredictions(request, timeout=30))
    assert [response.prediction for response in responses] == [b"one", b"two", b"three"]
    unary = stubs.inference.Predictions(request, timeout=30)
    assert unary.prediction == b"three"


def test_stream_predictions2_answers_each_request_and_reports_errors_inline(stubs: Stubs) -> None:
    requests = [inference_pb2.PredictionsRequest(model_name=model, input={"data": data}, sequence_id="s")
                for model, data in (("mlp", MLP_JSON.encode()), ("missing", b"[]"), ("mlp", b"{bad"))]
    responses = list(stubs.inference.StreamPredictions2(iter(requests), timeout=30))
    assert len(responses) == 3 and all(response.sequence_id == "s" for response in responses)
    assert len(json.loads(responses[0].prediction)) == 10 and not responses[0].HasField("status")
    assert responses[1].status.code == grpc.StatusCode.INTERNAL.value[0]
    assert responses[1].status.message == f"Model not found: missing\n{NOT_FOUND_CLASS}"
    assert responses[2].status.code == grpc.StatusCode.UNAVAILABLE.value[0]


def test_management_errors_over_grpc(stubs: Stubs) -> None:
    management = stubs.management
    with pytest.raises(grpc.RpcError) as refused:
        management.ScaleWorker(management_pb2.ScaleWorkerRequest(model_name="mlp", min_worker=2,
                                                                 max_worker=1), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == f"max_worker cannot be less than min_worker.\n{BAD_REQUEST_CLASS}"
    with pytest.raises(grpc.RpcError) as missing:
        management.RegisterModel(management_pb2.RegisterModelRequest(url="nope.mar"), timeout=10)
    assert (missing.value.code(), missing.value.details()) == (
        grpc.StatusCode.NOT_FOUND, f"Model not found at: nope.mar\n{NOT_FOUND_CLASS}")
    with pytest.raises(grpc.RpcError) as no_url:
        management.RegisterModel(management_pb2.RegisterModelRequest(), timeout=10)
    assert (no_url.value.code(), no_url.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, f"Parameter url is required.\n{BAD_REQUEST_CLASS}")
    listed = json.loads(management.ListModels(management_pb2.ListModelsRequest(limit=1), timeout=10).msg)
    assert listed == {"nextPageToken": "1", "models": [{"modelName": "mlp", "modelUrl": "mlp.mar"}]}


def test_token_authorization_and_model_api_gate_over_grpc(model_store: Path, tmp_path: Path) -> None:
    """With TorchServe's default security: no key or a wrong one is PERMISSION_DENIED, each service takes
    its own key, and register/unregister are refused while the model API is off."""
    server = start_torchserve(model_store, tmp_path, "--models", "mlp=mlp.mar", config=[ONE_MLP_WORKER])
    stubs = Stubs(server)
    try:
        keys = server.keys()
        request = inference_pb2.PredictionsRequest(model_name="mlp", input={"data": MLP_JSON.encode()})
        for metadata in ((), (("authorization", "Bearer wrong"),),
                         (("authorization", f"Bearer {keys['management']}"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stubs.inference.Predictions(request, metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert refused.value.details().startswith("Token Authorization failed.")
        inference_key = (("authorization", f"Bearer {keys['inference']}"),)
        answer = stubs.inference.Predictions(request, metadata=inference_key, timeout=30)
        assert len(json.loads(answer.prediction)) == 10
        management_key = (("authorization", f"Bearer {keys['management']}"),)
        listing = management_pb2.ListModelsRequest(limit=5)
        listed = stubs.management.ListModels(listing, metadata=management_key, timeout=10)
        assert json.loads(listed.msg)["models"] == [{"modelName": "mlp", "modelUrl": "mlp.mar"}]
        with pytest.raises(grpc.RpcError) as gated:
            stubs.management.RegisterModel(management_pb2.RegisterModelRequest(url="echo.mar"),
                                           metadata=management_key, timeout=10)
        assert gated.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert gated.value.details() == "Model API disabled\norg.pytorch.serve.archive.model.ModelException"
    finally:
        stubs.close()
        server.stop()


def test_committed_stubs_are_what_the_protos_generate(tmp_path: Path) -> None:
    """Regenerating from the .proto files gives the committed stubs, byte for byte."""
    proto_dir = Path(inference_pb2.__file__).parent
    committed = {path.name: path.read_bytes() for path in proto_dir.rglob("*_pb2*.py")}
    copy = tmp_path / "proto"
    shutil.copytree(proto_dir, copy, ignore=shutil.ignore_patterns("*_pb2*.py", "__pycache__"))
    generated = {path.name: path.read_bytes() for path in generate(copy)}
    assert generated == committed
