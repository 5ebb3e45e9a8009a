"""Routes of the calibration server: KServe v2 endpoints over one identity model, plus /calibration.

Every model name is served (with or without a `/versions/{v}` segment). An infer request must carry
an input named INPUT0 whose data holds as many elements as its shape says; the answer is OUTPUT0 =
INPUT0 (identity). The app only decides what to answer: the server (servers/calibration/_server.py)
decides when, holding successful infer answers until the instant servers/calibration/timing.py gives.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import unquote

from servers.calibration.timing import TimingConfig
from servers.core.connection import max_connections_problems
from servers.core.http1 import json_body

SERVER_NAME = "loadgen-calibration"
SERVER_VERSION = "0.1.0"
DATATYPES = frozenset({
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
})
_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([0-9]+))?(?:/(infer|ready))?")
_DEFAULT_VERSION = "1"


@dataclass(frozen=True)
class ServerConfig:
    """What the calibration server promises: its timing and the tensor it serves."""

    timing: TimingConfig = field(default_factory=TimingConfig)
    shape: tuple[int, ...] = (16,)
    """Shape of INPUT0/OUTPUT0 after the variable batch dimension."""
    datatype: str = "FP32"
    max_connections: int | None = None
    """The most HTTP connections open at once (None: no cap); beyond it 503 {"error": reason} and close."""

    def problems(self) -> list[str]:
        """Every reason this config is invalid, empty when it is valid."""
        found = self.timing.problems() + max_connections_problems(self.max_connections, "max_connections")
        if not self.shape or any(dim < 1 for dim in self.shape):
            found.append(f"shape must be one or more dimensions >= 1, got {list(self.shape)}")
        if self.datatype not in DATATYPES:
            found.append(f"datatype must be one of {', '.join(sorted(DATATYPES))}, got {self.datatype!r}")
        return found


class Reply(NamedTuple):
    """An answer: status, JSON (or empty) body, and whether it is an infer answer to hold and count."""

    status: int
    body: bytes
    timed: bool = False


class InvalidInfer(ValueError):
    """An infer request the model cannot take; its message goes back as {"error": ...}."""


def error_reply(status: int, message: str) -> Reply:
    return Reply(status, json_body({"error": message}))


_EMPTY_OK = Reply(200, b"")
_NOT_FOUND = error_reply(404, "Not Found")


class CalibrationApp:
    """Maps (method, path, body) to a Reply; counts answered infer requests for /calibration."""

    def __init__(self, config: ServerConfig, t0: float, pid: int) -> None:
        self.config = config
        self.t0 = t0
        self.pid = pid
        self.answered = 0
        """Infer requests answered with 200 so far (counted by the server when written)."""
        self._server_metadata = Reply(
            200, json_body({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []})
        )

    def handle(self, method: str, path: str, body: bytes) -> Reply:
        """Route one request; never raises for bad input, answers an error instead."""
        if path.startswith("/v2/models/"):
            return self._model_route(method, path, body)
        if path in ("/v2/health/live", "/v2/health/ready"):
            return _only_get(method) or _EMPTY_OK
        if path == "/v2":
            return _only_get(method) or self._server_metadata
        if path == "/calibration":
            return _only_get(method) or Reply(200, json_body(self.calibration()))
        return _NOT_FOUND

    def calibration(self) -> dict[str, Any]:
        """The declared timing and the count of answered infer requests, for tests to compute the truth."""
        timing = self.config.timing
        return {
            "t0": self.t0,
            "delay_ms": timing.delay_ms,
            "stall_every_s": timing.stall_every_s,
            "stall_for_s": timing.stall_for_s,
            "service_ms": timing.service_ms,
            "workers": timing.workers,
            "requests": self.answered,
            "pid": self.pid,
        }

    def _model_route(self, method: str, path: str, body: bytes) -> Reply:
        match = _MODEL_PATH.fullmatch(path)
        if match is None:
            return _NOT_FOUND
        name, version, action = match.groups()
        name, version = unquote(name), version or _DEFAULT_VERSION
        if action == "infer":
            if method != "POST":
                return error_reply(405, f"method {method} not allowed for infer; use POST")
            return self._infer(name, version, body)
        if method != "GET":
            return error_reply(405, f"method {method} not allowed; use GET")
        if action == "ready":
            return _EMPTY_OK
        return Reply(200, json_body(self._model_metadata(name, version)))

    def _model_metadata(self, name: str, version: str) -> dict[str, Any]:
        shape = [-1, *self.config.shape]
        datatype = self.config.datatype
        return {
            "name": name,
            "versions": [version],
            "platform": "calibration",
            "inputs": [{"name": "INPUT0", "datatype": datatype, "shape": shape}],
            "outputs": [{"name": "OUTPUT0", "datatype": datatype, "shape": shape}],
        }

    def _infer(self, name: str, version: str, body: bytes) -> Reply:
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return error_reply(400, f"malformed JSON in infer request: {exc}")
        except RecursionError:
            return error_reply(400, "infer request JSON is nested too deeply")
        try:
            tensor = _find_input0(request)
        except InvalidInfer as exc:
            return error_reply(400, str(exc))
        except RecursionError:
            return error_reply(400, "input 'INPUT0' data is nested too deeply")
        response: dict[str, Any] = {"model_name": name, "model_version": version}
        if "id" in request:
            response["id"] = request["id"]
        response["outputs"] = [
            {"name": "OUTPUT0", "datatype": self.config.datatype, "shape": tensor["shape"],
             "data": tensor["data"]}
        ]
        return Reply(200, json_body(response), timed=True)


def _only_get(method: str) -> Reply | None:
    return None if method == "GET" else error_reply(405, f"method {method} not allowed; use GET")


def _find_input0(request: Any) -> dict[str, Any]:
    """The INPUT0 tensor of an infer request, checked for shape and element count."""
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise InvalidInfer("infer request must be a JSON object with an 'inputs' list")
    for tensor in request["inputs"]:
        if isinstance(tensor, dict) and tensor.get("name") == "INPUT0":
            break
    else:
        raise InvalidInfer("infer request has no input named 'INPUT0'")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInfer(f"input 'INPUT0' needs a shape of integers >= 0, got {shape!r}")
    if not isinstance(tensor.get("data"), list):
        raise InvalidInfer("input 'INPUT0' needs its 'data' as a JSON array (binary data is not supported)")
    expected, actual = math.prod(shape), _count_elements(tensor["data"])
    if expected != actual:
        raise InvalidInfer(f"input 'INPUT0' has shape {shape} ({expected} elements) but {actual} data elements")
    return tensor


def _count_elements(data: list[Any]) -> int:
    """Leaf count of a flat or nested JSON array (row-major data may come either way)."""
    return sum(_count_elements(item) if isinstance(item, list) else 1 for item in data)
