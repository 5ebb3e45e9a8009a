"""Routes of the Triton-compatible server: KServe v2 HTTP paths (PROTOCOLS.md 1.2-1.12) -> replies.

The app decides what to answer; the connection layer (servers/triton/_server.py) decides how it is
written. A request for a model with `inline = False` comes back as a job (a callable returning the
Reply) for the connection to run in a worker thread; everything else is answered at once. The built-in
models run inline: a whole infer request (decode, model, encode) took 24 us for identity and 33 us for
mlp on the development machine, a thread pool hop alone about 100 us.
Errors are {"error": "..."} with Triton's status codes: 400 for bad requests and unknown models,
404 {"error":"Not Found"} for unknown paths, 405 for a wrong verb, 500 when a model itself fails.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote

from servers.core.http1 import Request, json_body
from servers.core.model import Model
from servers.triton._infer import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    InferError,
    InferRequest,
    ModelFailure,
    ModelHost,
    UnknownModel,
    execute,
)
from servers.triton._tensors import encode_response, parse_infer

_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([0-9]+))?(?:/(infer|ready|config|stats))?")
_REPOSITORY_INDEX = re.compile(r"/v2/repository(?:/[^/]+)?/index")
_INFER_HEADER = "inference-header-content-length"


class Reply(NamedTuple):
    """An answer: status, body, its content type, and extra header lines (each ending in CRLF)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: str = ""


Job = Callable[[], Reply]
"""Work for a worker thread; returns the reply to write."""


def error_reply(status: int, message: str) -> Reply:
    return Reply(status, json_body({"error": message}))


_EMPTY_OK = Reply(200, b"")
_NOT_FOUND = error_reply(404, "Not Found")
_NOT_ALLOWED = error_reply(405, "Method Not Allowed")


class TritonApp:
    """Maps one parsed request to a Reply (or a Job); never raises for bad input."""

    def __init__(self, models: dict[str, Model] | ModelHost) -> None:
        self.host = models if isinstance(models, ModelHost) else ModelHost(models)
        self.models = self.host.models
        self.stats = self.host.stats
        self._server_metadata = Reply(200, json_body(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}))

    def handle(self, request: Request) -> Reply | Job:
        """Route one request."""
        method, path = request.method, request.path
        if path.startswith("/v2/models/"):
            if path == "/v2/models/stats":
                return _only(method, "GET") or self._all_stats()
            return self._model_route(request)
        if path in ("/v2/health/live", "/v2/health/ready"):
            return _only(method, "GET") or _EMPTY_OK
        if path == "/v2":
            return _only(method, "GET") or self._server_metadata
        if _REPOSITORY_INDEX.fullmatch(path):
            return _only(method, "POST") or self._repository_index(request.body)
        return _NOT_FOUND

    def lookup(self, name: str, version: str | None) -> Model:
        """The model served under name (and version, when given); raises UnknownModel."""
        return self.host.lookup(name, version)

    def _model_route(self, request: Request) -> Reply | Job:
        match = _MODEL_PATH.fullmatch(request.path)
        if match is None:
            return _NOT_FOUND
        name, version, action = match.groups()
        wanted = "POST" if action == "infer" else "GET"
        if request.method != wanted:
            return _NOT_ALLOWED
        try:
            model = self.lookup(unquote(name), version)
        except UnknownModel as exc:
            return error_reply(400, str(exc))
        if action == "infer":
            return self._infer(model, request)
        if action == "ready":
            return _EMPTY_OK
        if action == "config":
            return Reply(200, json_body(model.config()))
        if action == "stats":
            return Reply(200, json_body({"model_stats": [self.stats[model.name].snapshot()]}))
        return Reply(200, json_body(model.metadata()))

    def _all_stats(self) -> Reply:
        return Reply(200, json_body({"model_stats": [stats.snapshot() for stats in self.stats.values()]}))

    def _repository_index(self, body: bytes) -> Reply:
        if body.strip():
            try:
                options = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                return error_reply(400, f"failed to parse the request JSON buffer: {exc}")
            if not isinstance(options, dict):
                return error_reply(400, "repository index request must be a JSON object")
        index = [{"name": model.name, "version": model.version, "state": "READY"}
                 for model in self.models.values()]
        return Reply(200, json_body(index))

    def _infer(self, model: Model, request: Request) -> Reply | Job:
        arrival_ns = time.perf_counter_ns()
        if model.inline:
            return self._run_infer(model, request, arrival_ns)
        self.stats[model.name].add_pending(1)
        return functools.partial(self._run_infer, model, request, arrival_ns, True)

    def _run_infer(self, model: Model, request: Request, arrival_ns: int, queued: bool = False) -> Reply:
        def decode() -> InferRequest:
            return parse_infer(request.body, request.headers.get(_INFER_HEADER), model)

        def encode(parsed: InferRequest, outputs: dict[str, Any]) -> tuple[bytes, int | None]:
            return encode_response(model, parsed, outputs)

        try:
            body, header_length = execute(model, self.stats[model.name], arrival_ns, decode, encode, queued)
        except InferError as exc:
            return error_reply(400, str(exc))
        except ModelFailure as exc:
            return error_reply(500, str(exc))
        if header_length is None:
            return Reply(200, body)
        return Reply(200, body, "application/octet-stream", f"Inference-Header-Content-Length: {header_length}\r\n")


def _only(method: str, allowed: str) -> Reply | None:
    return None if method == allowed else _NOT_ALLOWED
