"""Routes of the Triton-compatible server: KServe v2 HTTP paths (PROTOCOLS.md 1.2-1.12) -> replies.

The app decides what to answer; the connection layer (servers/triton/_server.py) decides how it is
written. A reply comes in one of four forms: a Reply at once; a Job (a callable returning the Reply)
for a worker thread, for built-in models with `inline = False`; a Deferred, settled later on the loop,
for repository models, which wait for their Scheduler (_scheduler.py); or a coroutine for the loop,
for repository loads. The built-in models run inline: a whole infer request (decode, model, encode)
took 24 us for identity and 33 us for mlp on the development machine, a thread pool hop alone about
100 us. A scheduled request is decoded at once (a bad one is answered without waiting) and its reply
made in the scheduler's callback: a Task per request, as a coroutine needs, cost more than that.
Errors are {"error": "..."} with Triton's status codes (PROTOCOLS.md 1.9): 400 for bad requests,
404 for an unknown model or version (Triton's NOT_FOUND, as gRPC's NOT_FOUND) and {"error":"Not Found"}
for unknown paths, 405 for a wrong verb, 500 when a model itself fails. Readiness answers 200 or 400.
A body over the 64 MiB limit is refused from its head with 400, as Triton does (TritonParser), and
the connection closed; `connections` makes the set of connections a server needs for that and for
its read timeout (servers/core/connection.py).

An infer request with Content-Encoding is decompressed first, and a response is compressed when
Accept-Encoding asks (_encoding.py); both headers are looked up once per infer request, and only a
request that carries one takes the longer path.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple
from urllib.parse import unquote

from servers.core.connection import (
    IDLE_TIMEOUT_S,
    READ_TIMEOUT_S,
    Connections,
    HttpOptions,
    overload_reply,
    refusal_reason,
)
from servers.core.http1 import MAX_BODY_BYTES, HttpError, Request, RequestParser, json_body
from servers.core.model import Model
from servers.triton._encoding import EncodingError, compress, decompress, response_encoding
from servers.triton._host import RepositoryError, ServedModel
from servers.triton._infer import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    InferError,
    InferRequest,
    ModelFailure,
    ModelHost,
    Unavailable,
    UnknownModel,
    execute,
    submit_scheduled,
)
from servers.triton._tensors import encode_response, parse_infer

_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([0-9]+))?(?:/(infer|ready|config|stats))?")
_REPOSITORY_INDEX = re.compile(r"/v2/repository(?:/[^/]+)?/index")
_REPOSITORY_MODEL = re.compile(r"/v2/repository(?:/[^/]+)?/models/([^/]+)/(load|unload)")
_INFER_HEADER = "inference-header-content-length"
_CONTENT_ENCODING = "content-encoding"
_ACCEPT_ENCODING = "accept-encoding"


class Reply(NamedTuple):
    """An answer: status, body, its content type, and extra header lines (each ending in CRLF)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: str = ""


Job = Callable[[], Reply]
"""Work for a worker thread; returns the reply to write."""


class Deferred:
    """A reply that is settled later, on the loop: the connection registers one callback with `then`,
    the app calls `settle` once. Callbacks run at once, without the loop's call_soon that an
    asyncio.Future adds."""

    __slots__ = ("_callback", "_reply")

    def __init__(self) -> None:
        self._callback: Callable[[Reply], None] | None = None
        self._reply: Reply | None = None

    def then(self, callback: Callable[[Reply], None]) -> None:
        if self._reply is not None:
            callback(self._reply)
        else:
            self._callback = callback

    def settle(self, reply: Reply) -> None:
        if self._callback is not None:
            self._callback(reply)
        else:
            self._reply = reply


Pending = Deferred | Coroutine[Any, Any, Reply]
"""A reply the loop makes later: a scheduled inference (Deferred), or a model load (a coroutine)."""


def error_reply(status: int, message: str) -> Reply:
    return Reply(status, json_body({"error": message}))


_EMPTY_OK = Reply(200, b"")
_NOT_READY = Reply(400, b"")
_NOT_FOUND = error_reply(404, "Not Found")
_NOT_ALLOWED = error_reply(405, "Method Not Allowed")


class TritonApp:
    """Maps one parsed request to a Reply (or a Job); never raises for bad input."""

    def __init__(self, models: dict[str, Model] | ModelHost) -> None:
        self.host = models if isinstance(models, ModelHost) else ModelHost(models)
        self._server_metadata = Reply(200, json_body(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}))

    def handle(self, request: Request) -> Reply | Job | Pending:
        """Route one request."""
        method, path = request.method, request.path
        if path.startswith("/v2/models/"):
            if path == "/v2/models/stats":
                return _only(method, "GET") or self._stats(self.host.all_stats())
            return self._model_route(request)
        if path == "/v2/health/live":
            return _only(method, "GET") or _EMPTY_OK
        if path == "/v2/health/ready":
            return _only(method, "GET") or (_EMPTY_OK if self.host.ready() else _NOT_READY)
        if path == "/v2":
            return _only(method, "GET") or self._server_metadata
        if _REPOSITORY_INDEX.fullmatch(path):
            return _only(method, "POST") or self._repository_index(request.body)
        if match := _REPOSITORY_MODEL.fullmatch(path):
            return _only(method, "POST") or self._repository_change(unquote(match[1]), match[2], request.body)
        return _NOT_FOUND

    def _model_route(self, request: Request) -> Reply | Job | Pending:
        match = _MODEL_PATH.fullmatch(request.path)
        if match is None:
            return _NOT_FOUND
        name, version, action = match.groups()
        wanted = "POST" if action == "infer" else "GET"
        if request.method != wanted:
            return _NOT_ALLOWED
        try:
            served = self.host.lookup(unquote(name), version)
        except UnknownModel as exc:
            return _NOT_READY if action == "ready" else error_reply(404, str(exc))
        if action == "infer":
            return self._infer(served, request)
        if action == "ready":
            return _EMPTY_OK
        if action == "config":
            return Reply(200, json_body(served.config_dict))
        if action == "stats":
            if version:
                return self._stats([served.stats])
            return self._stats([self.host.lookup(served.name, v).stats for v in self.host.versions(served.name)])
        return Reply(200, json_body(self.host.metadata(served, version)))

    @staticmethod
    def _stats(all_stats: list) -> Reply:
        return Reply(200, json_body({"model_stats": [stats.snapshot() for stats in all_stats]}))

    def _repository_index(self, body: bytes) -> Reply:
        options = _json_options(body)
        if isinstance(options, Reply):
            return options
        return Reply(200, json_body(self.host.index(ready_only=bool(options.get("ready", False)))))

    def _repository_change(self, name: str, action: str, body: bytes) -> Reply | Pending:
        """Load (with Triton's load parameters, _host.py) or unload one model. Unload's only parameter,
        unload_dependents, has nothing to act on here: no model depends on another (no ensembles)."""
        options = _json_options(body)
        if isinstance(options, Reply):
            return options
        parameters = options.get("parameters") or {}
        if not isinstance(parameters, dict):
            return error_reply(400, f"{action} request 'parameters' must be a JSON object")
        if action == "unload":
            if not isinstance(parameters.get("unload_dependents", False), bool):
                return error_reply(400, "Unable to parse 'unload_dependents': expected a boolean")
            try:
                self.host.unload(name)
            except RepositoryError as exc:
                return error_reply(400, str(exc))
            return _EMPTY_OK
        return self._load(name, parameters)

    async def _load(self, name: str, parameters: dict[str, Any]) -> Reply:
        try:
            await self.host.load(name, parameters)
        except RepositoryError as exc:
            return error_reply(400, str(exc))
        return _EMPTY_OK

    def _infer(self, served: ServedModel, request: Request) -> Reply | Job | Pending:
        headers = request.headers
        if _CONTENT_ENCODING in headers or _ACCEPT_ENCODING in headers:
            return self._infer_encoded(served, request)
        arrival_ns = time.perf_counter_ns()
        if served.scheduler is not None:
            return self._run_scheduled(served, request, arrival_ns)
        if served.model.inline:
            return self._run_infer(served, request, arrival_ns)
        served.stats.add_pending(1)
        return functools.partial(self._run_infer, served, request, arrival_ns, True)

    def _infer_encoded(self, served: ServedModel, request: Request) -> Reply | Job | Pending:
        """An infer request with Content-Encoding and/or Accept-Encoding: decompress, answer as a plain
        request (without those two headers), compress.

        As in Triton, decompression comes before the request reaches the model: a body that cannot be
        decompressed is not counted in the model's statistics, and the time decompressing is not queue
        time."""
        headers = dict(request.headers)
        encoding = headers.pop(_CONTENT_ENCODING, None)
        wanted = response_encoding(headers.pop(_ACCEPT_ENCODING, ""))
        body = request.body
        if encoding is not None:
            try:
                body = decompress(body, encoding)
            except EncodingError as exc:
                reply = error_reply(400, str(exc))
                return reply._replace(headers=f"Accept-Encoding: {exc.accept}\r\n") if exc.accept else reply
        outcome = self._infer(served, Request(request.method, request.target, request.version, headers, body,
                                              request.keep_alive))
        return outcome if wanted is None else _compressed(outcome, wanted)

    def _codec(self, model: Model, request: Request) -> tuple[Callable[[], InferRequest], Callable]:
        def decode() -> InferRequest:
            return parse_infer(request.body, request.headers.get(_INFER_HEADER), model)

        def encode(parsed: InferRequest, outputs: dict[str, Any]) -> tuple[bytes, int | None]:
            return encode_response(model, parsed, outputs)

        return decode, encode

    def _run_scheduled(self, served: ServedModel, request: Request, arrival_ns: int) -> Reply | Deferred:
        model = served.model
        deferred = Deferred()

        def decode() -> InferRequest:
            return parse_infer(request.body, request.headers.get(_INFER_HEADER), model)

        def encode(parsed: InferRequest, outputs: dict[str, Any]) -> Reply:
            return _infer_reply(*encode_response(model, parsed, outputs))

        def done(outcome: Reply | BaseException) -> None:
            deferred.settle(outcome if isinstance(outcome, Reply) else _failure_reply(outcome))

        try:
            submit_scheduled(served, arrival_ns, decode, encode, done)
        except (InferError, ModelFailure) as exc:
            return _failure_reply(exc)
        return deferred

    def _run_infer(self, served: ServedModel, request: Request, arrival_ns: int, queued: bool = False) -> Reply:
        decode, encode = self._codec(served.model, request)
        try:
            body, header_length = execute(served.model, served.stats, arrival_ns, decode, encode, queued)
        except InferError as exc:
            return error_reply(400, str(exc))
        except ModelFailure as exc:
            return error_reply(500, str(exc))
        return _infer_reply(body, header_length)


def _failure_reply(exc: BaseException) -> Reply:
    """The answer to an inference that failed: 400 for the request's fault, 500 for the model's."""
    if isinstance(exc, InferError):
        return error_reply(400, str(exc))
    if isinstance(exc, Unavailable):
        return error_reply(503, str(exc))
    if isinstance(exc, ModelFailure):
        return error_reply(500, str(exc))
    return error_reply(500, f"internal error: {exc}")


def _compressed(outcome: Reply | Job | Pending, encoding: str) -> Reply | Job | Pending:
    """`outcome` whose successful reply is compressed with `encoding`, when it comes."""
    if isinstance(outcome, Reply):
        return _compress_reply(outcome, encoding)
    if isinstance(outcome, Deferred):
        compressed = Deferred()
        outcome.then(lambda reply: compressed.settle(_compress_reply(reply, encoding)))
        return compressed
    if callable(outcome):
        return lambda: _compress_reply(outcome(), encoding)
    return outcome  # an infer reply is never a coroutine


def _compress_reply(reply: Reply, encoding: str) -> Reply:
    if reply.status != 200:
        return reply
    return reply._replace(body=compress(reply.body, encoding),
                          headers=f"{reply.headers}Content-Encoding: {encoding}\r\n")


class TritonParser(RequestParser):
    """servers/core's parser answering a body over the limit as Triton does (400 and its wording), and
    taking chunked request bodies, as Triton does."""

    accepts_chunked = True

    def too_large(self, length: int) -> HttpError:
        return HttpError(400, f"Request body size of {length} bytes exceeds the maximum allowed value of "
                              f"{MAX_BODY_BYTES} bytes")


def connections(read_timeout_s: float | None = READ_TIMEOUT_S, idle_timeout_s: float | None = IDLE_TIMEOUT_S,
                max_connections: int | None = None) -> Connections:
    """The set of connections of one Triton HTTP port: TritonParser, `read_timeout_s` to cut off a
    request that takes longer to arrive, `idle_timeout_s` to close a connection idle between requests
    (None: never), and at most `max_connections` open (None: no cap; beyond it 503 in Triton's shape)."""
    refusal = overload_reply(json_body({"error": refusal_reason(max_connections)}))
    return Connections(HttpOptions(read_timeout_s, TritonParser, idle_timeout_s, max_connections, refusal))


def _infer_reply(body: bytes, header_length: int | None) -> Reply:
    if header_length is None:
        return Reply(200, body)
    return Reply(200, body, "application/octet-stream", f"Inference-Header-Content-Length: {header_length}\r\n")


def _json_options(body: bytes) -> dict[str, Any] | Reply:
    """The optional JSON object of a repository request, or the error reply for a bad one."""
    if not body.strip():
        return {}
    try:
        options = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return error_reply(400, f"failed to parse the request JSON buffer: {exc}")
    if not isinstance(options, dict):
        return error_reply(400, "repository request must be a JSON object")
    return options


def _only(method: str, allowed: str) -> Reply | None:
    return None if method == allowed else _NOT_ALLOWED
