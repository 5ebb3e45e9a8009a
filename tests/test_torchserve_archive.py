"""Model archives made by the real torch-model-archiver, served by the TorchServe-compatible server.

Archives are built in the tests (the captures' float_handler.py, TorchScript and eager models made
here, handlers written here) and registered through the management API; answers are compared with the
model run in-process. Also: the handler contract beyond BaseHandler (module-level handle, the context's
fields, extra files, model-config YAML, custom status codes and headers, streaming), the other archive
formats (tgz, folder), form bodies, and archives that do not load: TorchServe's codes, and the server
keeps serving the other models.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest
import torch

from tests.support.torchserve import (
    ONE_MLP_WORKER,
    OPEN,
    TorchServe,
    archive,
    captures,
    start_torchserve,
)

pytestmark = pytest.mark.integration


class SmallMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.ReLU(), torch.nn.Linear(48, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODEL_FILE = '''
import torch


class SmallMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.ReLU(), torch.nn.Linear(48, 6))

    def forward(self, x):
        return self.net(x)
'''

CONTEXT_HANDLER = '''
"""A module-level handler: reads the context, uses an extra file, sets statuses and headers."""
import json
import os

from helper import scale
from ts.utils.util import PredictionException

state = {"calls": 0}


def handle(data, context):
    if data is None:  # TorchServe's load call
        state["initialized"] = True
        return None
    state["calls"] += 1
    answers = []
    for index, row in enumerate(data):
        value = row.get("data") or row.get("body")
        if value == {"fail": True}:
            raise PredictionException("refused on purpose", 418)
        if value == {"teapot": True}:
            context.set_response_status(299, "Fine Thanks", index)
        context.set_response_header(index, "x-handled-by", context.model_name)
        properties = context.system_properties
        shown = value.hex() if isinstance(value, (bytes, bytearray)) else value
        answers.append({
            "value": scale(shown) if isinstance(shown, (int, float)) else shown,
            "type": type(value).__name__,
            "model_dir_exists": os.path.isdir(properties["model_dir"]),
            "batch_size": properties["batch_size"],
            "manifest_model": context.manifest["model"]["modelName"],
            "yaml": context.model_yaml_config,
            "header": context.get_request_header(index, "x-probe"),
            "calls": state["calls"],
        })
    return answers
'''

STREAM_HANDLER = '''
from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    for part in ("one ", "two "):
        send_intermediate_predict_response([part] * len(data), context.request_ids, "Intermediate", 200,
                                           context)
    return ["three"] * len(data)
'''


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server with the model API on, over a store of its own (archives are added by the tests)."""
    store = tmp_path_factory.mktemp("store")
    shutil.copy(model_store / "mlp.mar", store / "mlp.mar")
    running = start_torchserve(store, tmp_path_factory.mktemp("server"), "--models", "mlp=mlp.mar",
                               config=[*OPEN, ONE_MLP_WORKER], grpc=False)
    yield running
    running.stop()


def _register(server: TorchServe, query: str) -> httpx.Response:
    return httpx.post(f"{server.management}/models?{query}", timeout=120)


def _rows(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def test_torchscript_mar_from_real_archiver_equals_in_process(server: TorchServe, tmp_path: Path) -> None:
    """A TorchScript MLP made here, archived with the captures' float_handler (a BaseHandler subclass):
    JSON, raw float32 and form bodies each answer exactly what the model gives in-process."""
    torch.manual_seed(1)
    model = torch.jit.script(SmallMLP().eval())
    model.save(str(tmp_path / "small.pt"))
    archive(server.store, "small", captures() / "models" / "float_handler.py", tmp_path / "small.pt")
    assert _register(server, "url=small.mar&initial_workers=2").status_code == 200
    rows = _rows(5, 24, seed=2)
    with torch.inference_mode():
        expected = model(rows).tolist()
    url = f"{server.inference}/predictions/small"
    for row, want in zip(rows.tolist(), expected):
        assert httpx.post(url, json=row, timeout=30).json() == pytest.approx(want, rel=1e-6, abs=1e-7)
    octets = {"Content-Type": "application/octet-stream"}
    raw = httpx.post(url, content=rows[0].numpy().tobytes(), headers=octets, timeout=30)
    assert raw.json() == pytest.approx(expected[0], rel=1e-6, abs=1e-7)
    upload = {"data": ("row.json", json.dumps(rows[1].tolist()), "application/json")}
    form = httpx.post(url, files=upload, timeout=30)
    assert form.json() == pytest.approx(expected[1], rel=1e-6, abs=1e-7)
    urlencoded = httpx.post(url, data={"data": json.dumps(rows[2].tolist())}, timeout=30)
    assert urlencoded.json() == pytest.approx(expected[2], rel=1e-6, abs=1e-7)
    described = httpx.get(f"{server.management}/models/small", timeout=10).json()[0]
    assert described["modelUrl"] == "small.mar" and len(described["workers"]) == 2


def test_eager_model_file_and_state_dict(server: TorchServe, tmp_path: Path) -> None:
    """An eager model (--model-file with its class, --serialized-file a state_dict): BaseHandler
    imports the model file from the archive and loads the weights, as TorchServe's does."""
    torch.manual_seed(3)
    model = SmallMLP().eval()
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    (tmp_path / "small_model.py").write_text(MODEL_FILE)
    archive(server.store, "eager", captures() / "models" / "float_handler.py", tmp_path / "weights.pth",
            "--model-file", str(tmp_path / "small_model.py"))
    assert _register(server, "url=eager.mar&initial_workers=1").status_code == 200
    row = _rows(1, 24, seed=4)
    with torch.inference_mode():
        want = model(row)[0].tolist()
    got = httpx.post(f"{server.inference}/predictions/eager", json=row[0].tolist(), timeout=30).json()
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_module_handler_context_extra_files_yaml_and_statuses(server: TorchServe, tmp_path: Path) -> None:
    """A module-level handle(data, context): the load call, an extra file it imports, the model-config
    YAML (its batchSize and workers apply, the whole of it reaches the handler), request headers,
    per-request status and headers, PredictionException's code, JSON and text decoding."""
    (tmp_path / "context_handler.py").write_text(CONTEXT_HANDLER)
    (tmp_path / "helper.py").write_text("def scale(value):\n    return value * 10\n")
    (tmp_path / "config.yaml").write_text("batchSize: 4\nmaxBatchDelay: 7\nminWorkers: 1\nmaxWorkers: 1\n"
                                          "custom:\n  answer: 42\n")
    archive(server.store, "ctx", tmp_path / "context_handler.py", None, "--extra-files",
            str(tmp_path / "helper.py"), "--config-file", str(tmp_path / "config.yaml"))
    registered = _register(server, "url=ctx.mar")
    assert registered.json() == {"status": 'Model "ctx" Version: 1.0 registered with 1 initial workers'}
    described = httpx.get(f"{server.management}/models/ctx", timeout=10).json()[0]
    assert (described["batchSize"], described["maxBatchDelay"], described["minWorkers"]) == (4, 7, 1)
    url = f"{server.inference}/predictions/ctx"
    answer = httpx.post(url, json=3, headers={"x-probe": "hello"}, timeout=30)
    assert answer.status_code == 200 and answer.reason_phrase == ""
    assert answer.headers["x-handled-by"] == "ctx"
    body = answer.json()
    assert body["value"] == 30 and body["type"] == "int" and body["model_dir_exists"]
    assert body["batch_size"] == 4 and body["manifest_model"] == "ctx" and body["header"] == "hello"
    assert body["yaml"]["custom"] == {"answer": 42} and body["calls"] == 1
    text = httpx.post(url, content=b"plain words", headers={"Content-Type": "text/plain"}, timeout=30).json()
    assert (text["value"], text["type"]) == ("plain words", "str")
    octets = {"Content-Type": "application/octet-stream"}
    raw = httpx.post(url, content=b"\x00\x01", headers=octets, timeout=30)
    assert (raw.json()["value"], raw.json()["type"]) == ("0001", "bytes")
    custom = httpx.post(url, json={"teapot": True}, timeout=30)
    assert (custom.status_code, custom.reason_phrase) == (299, "Fine Thanks")
    refused = httpx.post(url, json={"fail": True}, timeout=30)
    assert refused.status_code == 418 and refused.headers["connection"] == "close"
    assert refused.json() == {"code": 418, "type": "InternalServerException", "message": "refused on purpose"}


def test_streaming_handler_answers_in_chunks(server: TorchServe, tmp_path: Path) -> None:
    """send_intermediate_predict_response: a chunked response, one chunk per part, the final one last."""
    (tmp_path / "stream_handler.py").write_text(STREAM_HANDLER)
    archive(server.store, "stream", tmp_path / "stream_handler.py")
    assert _register(server, "url=stream.mar&initial_workers=1").status_code == 200
    url = f"{server.inference}/predictions/stream"
    with httpx.stream("POST", url, content=b"go", timeout=30) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        parts = [part for part in response.iter_raw() if part]
    assert b"".join(parts) == b"one two three"


def test_tgz_and_folder_archives(server: TorchServe, model_store: Path, tmp_path: Path) -> None:
    """--archive-format tgz (.tar.gz) and no-archive (a folder with MAR-INF) register and serve. The
    serialized file is the captures' echo.pt, as the session's echo.mar holds it (written by
    make_models.py when the store was built)."""
    work = tmp_path / "models"
    with zipfile.ZipFile(model_store / "echo.mar") as mar:
        mar.extract("echo.pt", work)
    for name, form in (("echo_tgz", "tgz"), ("echo_dir", "no-archive")):
        archive(server.store, name, captures() / "models" / "float_handler.py", work / "echo.pt",
                "--archive-format", form)
    assert (server.store / "echo_tgz.tar.gz").is_file() and (server.store / "echo_dir" / "MAR-INF").is_dir()
    for url, name in (("echo_tgz.tar.gz", "echo_tgz"), ("echo_dir", "echo_dir")):
        assert _register(server, f"url={url}&initial_workers=1").status_code == 200, url
        answer = httpx.post(f"{server.inference}/predictions/{name}", json=[1.0, -2.0], timeout=30)
        assert answer.json() == [1.0, -2.0]


def test_archives_that_do_not_load(server: TorchServe, tmp_path: Path) -> None:
    """Bad archives get TorchServe's codes and bodies; the server goes on serving mlp."""
    (server.store / "garbage.mar").write_bytes(b"this is not a zip file")
    with zipfile.ZipFile(server.store / "nomanifest.mar", "w") as bare:
        bare.writestr("handler.py", "def handle(data, context):\n    return data\n")
    (tmp_path / "syntax_error.py").write_text("def handle(data, context)\n    return data\n")
    archive(server.store, "syntaxerror", tmp_path / "syntax_error.py")
    archive(server.store, "broken", captures() / "models" / "broken_handler.py")
    cases = {
        "url=garbage.mar": (400, "InvalidModelException", "Missing Model entry in manifest file."),
        "url=nomanifest.mar": (400, "InvalidModelException", "Missing Model entry in manifest file."),
        "url=nope.mar": (404, "ModelNotFoundException", "Model not found at: nope.mar"),
        "url=../mlp.mar": (404, "ModelNotFoundException", "Relative path is not allowed in url: ../mlp.mar"),
        "url=syntaxerror.mar&initial_workers=1": (
            500, "InternalServerException", "Failed to start workers for model syntaxerror version: 1.0"),
        "url=broken.mar&initial_workers=2": (500, "InternalServerException",
                                             "Failed to start workers for model broken version: 1.0"),
    }
    for query, (code, kind, message) in cases.items():
        response = _register(server, query)
        assert response.json() == {"code": code, "type": kind, "message": message}, query
        assert response.status_code == code and response.headers["connection"] == "close"
    assert httpx.get(f"{server.management}/models/broken", timeout=10).json()[0]["workers"] == []
    answer = httpx.post(f"{server.inference}/predictions/broken", content=b"x", timeout=10)
    assert answer.status_code == 503 and answer.json()["type"] == "ServiceUnavailableException"
    assert httpx.get(f"{server.inference}/ping", timeout=10).json() == {"status": "Healthy"}
    assert len(httpx.post(f"{server.inference}/predictions/mlp", json=[0.0] * 784, timeout=30).json()) == 10


def test_startup_model_that_fails_leaves_the_others_serving(model_store: Path, tmp_path: Path) -> None:
    """--models mlp=mlp.mar broken=broken.mar nope=nope.mar: the failures are reported on stderr, the
    server starts, mlp answers, broken is registered without workers."""
    server = start_torchserve(model_store, tmp_path, "--models", "mlp=mlp.mar", "broken=broken.mar",
                              "nope=nope.mar", config=[*OPEN, ONE_MLP_WORKER], grpc=False)
    try:
        answer = httpx.post(f"{server.inference}/predictions/mlp", json=[0.0] * 784, timeout=30)
        assert len(answer.json()) == 10
        broken = httpx.get(f"{server.management}/models/broken", timeout=10).json()[0]
        assert (broken["minWorkers"], broken["workers"], broken["loadedAtStartup"]) == (0, [], True)
        listed = httpx.get(f"{server.management}/models", timeout=10).json()["models"]
        assert [model["modelName"] for model in listed] == ["broken", "mlp"]
    finally:
        server.stop()
    stderr = server.server.proc.stderr.read()
    assert "deliberately broken model" in stderr and "Model not found at: nope.mar" in stderr
