"""What the TorchServe-compatible server's tests share.

- the recorded exchanges of a real TorchServe 0.12.0 (../shared/torchserve-captures, beside the clone,
  as ../shared/peers is for perf_analyzer) and the comparison of an answer with a recorded one: the same
  status, reason phrase, header names and body, values that vary (request ids, times, pids) excepted;
- a model store built as the captures' was: models/make_models.py writes mlp.pt and echo.pt, and the
  real torch-model-archiver (its CLI, from the torch-model-archiver package) archives them with the
  captures' handlers;
- `start_torchserve`: the server as a real process on 127.0.0.1 with every port 0.

The session's model store is the `model_store` fixture (tests/conftest.py), built by `build_store`.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from loadgen.lowlevel.torchserve_proto import inference_pb2_grpc, management_pb2_grpc
from tests.support.processes import ROOT, Server, start_server, stop_process

CAPTURES = ROOT.parent / "shared" / "torchserve-captures"
ARCHIVER = Path(sys.executable).with_name("torch-model-archiver")

MLP_INPUT = [(i % 100) / 100 for i in range(784)]
"""The input of the captures' mlp predictions (their bodies are recorded truncated; this one gives
exactly the recorded outputs)."""
MLP_JSON = json.dumps(MLP_INPUT)
MLP_F32 = struct.pack("<784f", *MLP_INPUT)

VARYING = {"startTime", "pid", "expiration time", "key"}
"""JSON keys whose values differ from run to run (and from server to server)."""
VARYING_HEADERS = {"x-request-id", "content-length"}
"""Headers whose values differ; content-length follows the body, which is compared itself."""


def captures() -> Path:
    if not (CAPTURES / "README.md").is_file():
        pytest.fail(f"the recorded TorchServe exchanges are missing: expected {CAPTURES} "
                    "(../shared beside the clone)")
    return CAPTURES


def load_capture(name: str) -> Any:
    return json.loads((captures() / name).read_text())


def by_name(exchanges: list[dict]) -> dict[str, dict]:
    return {exchange["name"]: exchange for exchange in exchanges}


def archive(store: Path, name: str, handler: Path, serialized: Path | None = None, *extra: str) -> Path:
    """`torch-model-archiver --model-name NAME --version 1.0 ...` into `store`; returns the .mar."""
    command = [str(ARCHIVER), "--model-name", name, "--version", "1.0", "--handler", str(handler),
               "--export-path", str(store), "-f", *extra]
    if serialized is not None:
        command += ["--serialized-file", str(serialized)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return store / f"{name}.mar"


def build_store(store: Path) -> Path:
    """The captures' model store: mlp and echo (float_handler), broken, slow."""
    models = captures() / "models"
    work = store / "_build"
    work.mkdir(parents=True, exist_ok=True)
    for source in models.glob("*.py"):
        shutil.copy(source, work / source.name)
    subprocess.run([sys.executable, str(work / "make_models.py"), str(work)], check=True, capture_output=True,
                   timeout=120)
    archive(store, "mlp", work / "float_handler.py", work / "mlp.pt")
    archive(store, "echo", work / "float_handler.py", work / "echo.pt")
    archive(store, "broken", work / "broken_handler.py")
    archive(store, "slow", work / "slow_handler.py")
    shutil.rmtree(work)
    return store


@dataclass
class TorchServe:
    """A running server: its process and the URL (or host:port for gRPC) of each API."""

    server: Server
    key_file: Path
    store: Path

    @property
    def inference(self) -> str:
        return self.server.url

    @property
    def management(self) -> str:
        return self.server.fronts["management"]

    @property
    def metrics(self) -> str:
        return self.server.fronts["metrics"]

    @property
    def grpc_inference(self) -> str:
        return self.server.fronts["grpc-inference"]

    @property
    def grpc_management(self) -> str:
        return self.server.fronts["grpc-management"]

    def url(self, request: str) -> str:
        """A recorded request ("GET http://127.0.0.1:8081/models" or "GET :8081/models") on this server."""
        rest = request.split()[-1].split("://", 1)[-1]
        host_port, _, path = rest.partition("/")
        bases = {"8080": self.inference, "8081": self.management, "8082": self.metrics}
        return f"{bases[host_port.rsplit(':', 1)[-1]]}/{path}"

    def keys(self) -> dict[str, str]:
        document = json.loads(self.key_file.read_text())
        return {"inference": document["inference"]["key"], "management": document["management"]["key"],
                "API": document["API"]["key"]}

    def stop(self) -> None:
        stop_process(self.server.proc)


class Stubs:
    """gRPC stubs of a running server's inference and management APIs, on channels of their own."""

    def __init__(self, server: TorchServe) -> None:
        self.inference_channel = grpc.insecure_channel(server.grpc_inference)
        self.management_channel = grpc.insecure_channel(server.grpc_management)
        self.inference = inference_pb2_grpc.InferenceAPIsServiceStub(self.inference_channel)
        self.management = management_pb2_grpc.ManagementAPIsServiceStub(self.management_channel)

    def close(self) -> None:
        self.inference_channel.close()
        self.management_channel.close()


def write_config(folder: Path, lines: list[str]) -> Path:
    path = folder / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_torchserve(store: Path, folder: Path, *args: str, config: list[str] | None = None,
                     grpc: bool = True) -> TorchServe:
    """`python -m servers.torchserve --model-store STORE ARGS` with every port 0 and its keys in `folder`."""
    key_file = folder / "key_file.json"
    command = [*args, "--model-store", str(store), "--management-port", "0", "--metrics-port", "0",
               "--key-file", str(key_file)]
    if config is not None:
        command += ["--ts-config", str(write_config(folder, config))]
    command += ["--grpc-inference-port", "0", "--grpc-management-port", "0"] if grpc else ["--no-grpc"]
    server = start_server(command, timeout=120, module="servers.torchserve", port_flag="--inference-port")
    return TorchServe(server, key_file, store)


OPEN = ["disable_token_authorization=true", "enable_model_api=true"]
"""The captures' config.properties (addresses aside): token authorization off, model API on."""
ONE_MLP_WORKER = 'models={"mlp": {"1.0": {"minWorkers": 1, "maxWorkers": 1}}}'
"""config.properties' line giving the startup model mlp one worker, where a test needs mlp to answer and
nothing of its workers: without it mlp gets one a core, and each is a process that imports torch (about
1.5 s of CPU to start)."""


# -- comparing with a recorded exchange -----------------------------------------------------------------

def assert_like(recorded: dict, response: httpx.Response, *, values: bool = True) -> None:
    """`response` answers as the recorded exchange: status, reason phrase, header names (and values that
    do not vary), and the body (JSON compared as data, varying keys excepted; `values` False compares
    only the JSON structure)."""
    name = recorded.get("name")
    assert response.status_code == recorded["status"], (name, response.text)
    assert response.reason_phrase == recorded["reason"], name
    got_headers = [(key.lower(), value) for key, value in response.headers.multi_items()]
    want_headers = [(key.lower(), value) for key, value in recorded["headers"]]
    assert [key for key, _ in got_headers] == [key for key, _ in want_headers], name
    for (key, got), (_, want) in zip(got_headers, want_headers):
        if key not in VARYING_HEADERS:
            assert got == want, (name, key)
    assert_body_like(recorded["body"], response.text, recorded.get("body_len"), values=values, name=name)


def assert_body_like(recorded: str, got: str, recorded_len: int | None = None, *, values: bool = True,
                     name: Any = None) -> None:
    truncated = recorded_len is not None and len(recorded.encode()) < recorded_len
    try:
        want_json = json.loads(recorded)
    except ValueError:
        if truncated:
            assert got.startswith(recorded[:200]) or not values, name
        else:
            assert got == recorded, name
        return
    assert_same(want_json, json.loads(got), values=values, path=str(name))
    if values:
        assert got.endswith("\n") == recorded.endswith("\n"), name


def assert_same(want: Any, got: Any, *, values: bool = True, path: str = "") -> None:
    """Recursive comparison of decoded JSON: same types, same keys in the same order, same lengths."""
    if isinstance(want, dict):
        assert isinstance(got, dict), path
        assert list(got) == list(want), path
        for key in want:
            if key not in VARYING:
                assert_same(want[key], got[key], values=values, path=f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for index, (a, b) in enumerate(zip(want, got)):
            assert_same(a, b, values=values, path=f"{path}[{index}]")
    elif isinstance(want, float):
        assert isinstance(got, float), path
        assert not values or math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-7), (path, got, want)
    else:
        assert type(got) is type(want), path
        assert not values or got == want, (path, got, want)


def recorded_body(exchange: dict) -> bytes | None:
    """The request body of a recorded exchange, the truncated mlp inputs restored in full."""
    body = exchange.get("request_body")
    if body is None:
        return None
    if exchange.get("note", "").startswith("body ~6.8MB"):
        return b"[" + b",".join([b"0.0"] * 1_700_000) + b"]"
    if body.startswith("[0.0, 0.01, 0.02"):
        return MLP_JSON.encode()
    if body.startswith("\x00\x00\x00\x00"):
        return MLP_F32
    return body.encode("latin-1")


def replay(client: httpx.Client, server: TorchServe, exchange: dict,
           headers: dict | None = None) -> httpx.Response:
    """Send a recorded request again, to this server."""
    method = exchange["request"].split()[0]
    return client.request(method, server.url(exchange["request"]), content=recorded_body(exchange),
                          headers={**exchange.get("request_headers", {}), **(headers or {})})
