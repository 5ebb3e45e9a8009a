"""Handlers of a model version, run as TorchServe's Python backend runs them (PROTOCOLS.md 5.8).

TorchServe runs each worker as a Python process that imports the archive's handler, builds a
`ts.context.Context`, calls `initialize`, and then answers batches through `ts.service.Service.predict`.
A worker here does the same, in a process of its own (_backend.py, the default) or in a thread of the
server (`worker_mode=thread`), and it runs the very same Python code: TorchServe's own `ts` package
(shipped in the torchserve wheel, which handlers written for TorchServe import anyway) supplies
Context, RequestProcessor and Service, so the handler contract (module-level `handle(data, context)`,
or a class with initialize/handle such as a BaseHandler subclass; status codes from
PredictionException, 503 "Prediction failed" for anything else raised, "Invalid model predict
output", "number of batch response mismatched", per-request status and headers set on the context,
JSON for lists and dicts) is TorchServe's by construction.

Inputs arrive as the bytes the client sent, with their content type; as in TorchServe's backend
(otf_message_handler), the worker decodes them: with decode_input_request (the default)
`application/json` becomes the parsed value (the bytes when it does not parse) and `text/*` a str.
JSON is parsed with json.loads's results but not its cost (`parse_json`): on the captures' MLP,
784 floats a request, json.loads alone was more than half of a worker's time.

Details:
- each worker imports the handler file as its own module (module-level state is per worker), with
  the model folder on sys.path for the archive's extra files; a process worker runs in the model
  folder, as TorchServe's do, a thread worker in the server's working folder;
- Service.predict answers in TorchServe's wire format (otf_message_handler); it is decoded here
  (`decode_predict_response`), and so are the intermediate answers a streaming handler sends with
  `send_intermediate_predict_response` through `context.cl_socket`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import json
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic_core import from_json

from servers.torchserve._archive import Archive

__all__ = ["Answer", "Failure", "Handler", "HandlerLoadError", "Request", "decode_predict_response",
           "decode_value", "load_handler", "parse_json"]

_module_ids = itertools.count()
_path_lock = threading.Lock()


class Answer(NamedTuple):
    """One request's answer from the handler: what the front end sends back."""

    status: int
    reason: str
    content_type: str | None
    headers: tuple[tuple[str, str], ...]
    body: bytes
    final: bool = True


class Failure(NamedTuple):
    """A batch the backend could not answer: TorchServe's code and message for each of its requests."""

    code: int
    message: str


@dataclass(slots=True)
class Request:
    """One request as the backend gets it: input parameters (name, content type, the bytes as they
    came) and request headers (name -> value, as RequestProcessor holds them)."""

    request_id: str
    parameters: list[tuple[str, str, Any]]
    headers: dict[str, str] = field(default_factory=dict)
    on_part: Callable[[Answer], None] | None = None
    """Called (on the worker's thread) with each intermediate answer of a streaming handler."""


class HandlerLoadError(Exception):
    """The handler could not be imported or its initialize raised (the worker does not start)."""


class _StreamSocket:
    """`context.cl_socket`: takes what send_intermediate_predict_response writes for the current batch."""

    def __init__(self) -> None:
        self.batch: list[Request] = []

    def sendall(self, message: bytes) -> None:
        _, _, parts = decode_predict_response(bytes(message))
        by_id = {request.request_id: request for request in self.batch}
        for request_id, answer in parts.items():
            request = by_id.get(request_id)
            if request is not None and request.on_part is not None:
                request.on_part(answer._replace(final=False))


class Handler:
    """One worker's loaded handler: its own module, context and ts Service."""

    def __init__(self, service: Any, socket: _StreamSocket, module_name: str, decode: bool = True) -> None:
        self._service = service
        self._socket = socket
        self._module_name = module_name
        self._decode = decode

    @property
    def context(self) -> Any:
        return self._service.context

    def predict(self, batch: list[Request]) -> list[Answer | Failure]:
        """Run one batch through ts.service.Service.predict; one Answer or Failure per request."""
        self._socket.batch = batch
        message = self._service.predict([_wire_request(request, self._decode) for request in batch])
        self._socket.batch = []
        if message is None:  # LOCAL_RANK != 0: TorchServe sends nothing either
            return [Failure(500, "Worker did not answer")] * len(batch)
        code, text, parts = decode_predict_response(bytes(message))
        if code != 200:
            return [Failure(code, text)] * len(batch)
        return [parts.get(request.request_id, Failure(500, "Worker did not answer")) for request in batch]

    def close(self) -> None:
        sys.modules.pop(self._module_name, None)


def load_handler(archive: Archive, worker_id: int, gpu_id: int | None, batch_size: int,
                 metrics: Any, decode_input: bool = True) -> Handler:
    """Import the archive's handler for one worker and initialize it, as TorchServe's TsModelLoader.

    Raises HandlerLoadError with the reason (import failure, no entry point, initialize raised).
    """
    try:
        from ts.service import Service
    except ImportError as exc:
        raise HandlerLoadError("handlers run on TorchServe's Python runtime: pip install torchserve") from exc
    _add_path(str(archive.model_dir))
    module, function, module_name = _import_handler(archive, worker_id)
    if function is not None:
        entry, initialize = _function_entry_point(module, function)
    else:
        entry, initialize = _class_entry_point(module, archive.handler)
    metrics.model_name = archive.name
    service = Service(archive.name, str(archive.model_dir), archive.manifest, entry, gpu_id, batch_size,
                      True, metrics)
    socket = _StreamSocket()
    service.set_cl_socket(socket)
    try:
        initialize(service.context)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise HandlerLoadError(f"{type(exc).__name__}: {exc}") from exc
    return Handler(service, socket, module_name, decode_input)


def _add_path(model_dir: str) -> None:
    with _path_lock:
        if model_dir not in sys.path:
            sys.path.append(model_dir)


def _import_handler(archive: Archive, worker_id: int) -> tuple[Any, str | None, str]:
    """The handler module (a fresh one per worker for a file in the archive) and its function name."""
    spec_text, _, function = archive.handler.partition(":")
    file_name = spec_text.rsplit("/", 1)[-1]
    stem = file_name.removesuffix(".py")
    path = archive.model_dir / f"{stem}.py"
    module_name = f"{stem}__ts_worker{worker_id}_{next(_module_ids)}"
    if path.is_file():
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise HandlerLoadError(f"cannot import handler {file_name}: {type(exc).__name__}: {exc}") from exc
    else:
        module = _default_handler(stem)
        module_name = module.__name__
    function = function or "handle"
    return module, (function if hasattr(module, function) else None), module_name


def _default_handler(name: str) -> Any:
    """A handler named without a file: a module on sys.path, else one of TorchServe's built-ins
    (ts.torch_handler.<name>: base_handler's subclasses image_classifier, text_classifier, ...)."""
    for candidate, package in ((name, None), (f".{name}", "ts.torch_handler")):
        try:
            return importlib.import_module(candidate, package)
        except ImportError:
            continue
    raise HandlerLoadError(f"handler {name!r} is neither a file in the archive "
                           "nor a TorchServe built-in handler")


def _function_entry_point(module: Any, function: str) -> tuple[Callable, Callable]:
    entry = getattr(module, function)

    def initialize(context: Any) -> Any:
        return entry(None, context)  # TorchServe's load call: data None

    return entry, initialize


def _class_entry_point(module: Any, handler: str) -> tuple[Callable, Callable]:
    classes = [member for _, member in inspect.getmembers(module, inspect.isclass)
               if member.__module__ == module.__name__]
    if len(classes) != 1:
        raise HandlerLoadError(f"Expected only one class in custom service code or a function entry point "
                               f"{classes} ({handler})")
    instance = classes[0]()
    if not hasattr(instance, "handle"):
        raise HandlerLoadError(f"Expect handle method in class {classes[0]}")
    return instance.handle, instance.initialize


def _wire_request(request: Request, decode: bool) -> dict[str, Any]:
    """The dict Service.retrieve_data_for_inference reads (the backend's decoded form of a request)."""
    return {
        "requestId": request.request_id.encode(),
        "parameters": [{"name": name, "contentType": content_type,
                        "value": decode_value(content_type, value, decode)}
                       for name, content_type, value in request.parameters],
        "headers": [{"name": name.encode(), "value": value.encode()}
                    for name, value in request.headers.items()],
    }


def decode_value(content_type: str, value: Any, decode: bool) -> Any:
    """What TorchServe's backend makes of one input: parsed JSON, text, or the bytes as they came."""
    if not decode or not isinstance(value, (bytes, bytearray)):
        return value
    if content_type == "application/json":
        try:
            return parse_json(value)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return value
    if content_type.startswith("text"):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def parse_json(data: bytes | bytearray) -> Any:
    """`json.loads(data.decode("utf-8"))`, what TorchServe's backend runs on a JSON input, at a sixth of
    its cost on a list of floats: pydantic_core's parser (Rust) gives the same values where it accepts
    the text (floats correctly rounded, ints of any size, NaN and Infinity, the last of duplicate
    keys); what it refuses (lone surrogate escapes, nesting deeper than its limit, invalid JSON) goes
    to json.loads, which decides. Raises as json.loads does."""
    try:
        return from_json(data)
    except ValueError:
        return json.loads(data.decode("utf-8"))


def decode_predict_response(message: bytes) -> tuple[int, str, dict[str, Answer]]:
    """Decode ts.protocol.otf_message_handler.create_predict_response: (code, message, answers by id)."""
    offset = 0

    def integer() -> int:
        nonlocal offset
        (value,) = struct.unpack_from("!i", message, offset)
        offset += 4
        return value

    def chunk() -> bytes:
        nonlocal offset
        length = integer()
        data = message[offset:offset + length]
        offset += length
        return data

    code = integer()
    text = chunk().decode()
    answers: dict[str, Answer] = {}
    while offset < len(message):
        length = integer()
        if length == -1:
            break
        request_id = message[offset:offset + length].decode()
        offset += length
        content_type = chunk().decode() or None
        status = integer()
        reason = chunk().decode()
        headers = tuple((chunk().decode(), chunk().decode()) for _ in range(integer()))
        answers[request_id] = Answer(status, reason, content_type, headers, chunk())
    return code, text, answers


def describe_metadata(body: bytes) -> dict[str, Any]:
    """A describe call's customizedMetadata: the handler's answer when it is a JSON object, else {}."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
