"""The inference API (default port 8080) of the TorchServe-compatible server (PROTOCOLS.md 5.2).

Routes, as TorchServe 0.12's InferenceRequestHandler: `/ping` (any method); `/predictions/{m}[/{v}]`
(any method: a GET reaches the handler too); `/explanations/{m}[/{v}]` (the same with the request
header `explain: True`, which BaseHandler turns into explain_handle); the KServe wrappers
`/v1/models/{m}:predict|:explain` and `/v2/models/{m}/infer|explain`, whose bodies go to the handler
as they are (no service envelope); `/invocations?model_name=` and `/models/{m}/invoke`; the legacy
`/{m}/predict`; `OPTIONS /` and `/api-description`. Anything else is 404 ResourceNotFoundException.

A request becomes the handler's input as TorchServe's front end and Python backend make it: a
multipart/form-data or urlencoded body gives one input per field (file parts keep their content
type), any other body is the input `body` with the request's content type. The inputs go to the
worker as the bytes they came as; the worker decodes them (_handler.decode_value: with
decode_input_request, the default, `application/json` arrives parsed, raw bytes when it does not
parse, and `text/*` as str). The handler also sees the request headers (names lower-case), plus
`explain` and `url_path` as TorchServe adds them. Its answer is sent with the status, reason phrase
(empty by default), content type and headers it set; a handler that streams
(send_intermediate_predict_response) gets a chunked response, one chunk per part.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
import uuid
from functools import partial
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

from servers.core.http1 import Request as HttpRequest
from servers.torchserve._auth import TokenAuth
from servers.torchserve._handler import Answer, Failure, Request
from servers.torchserve._http import STREAMED, Send
from servers.torchserve._models import ModelManager
from servers.torchserve._openapi import describe_api
from servers.torchserve._wire import NOT_FOUND, Reply, TsError, chunk, chunked_head, error_reply, json_reply
from servers.torchserve._workers import Job

__all__ = ["InferenceApi", "answer_reply", "request_parameters"]

_HEALTHY = json_reply({"status": "Healthy"})
_UNHEALTHY = json_reply({"status": "Unhealthy"}, 500)
_HIDDEN_HEADERS = {"ts_stream_next", "content-type"}


class InferenceApi:
    """Routes of the inference port over one ModelManager."""

    def __init__(self, models: ModelManager, auth: TokenAuth) -> None:
        self.models = models
        self._auth = auth
        self._description = json_reply(describe_api("inference"))

    def handle(self, request: HttpRequest, send: Send) -> Any:
        self._auth.check("inference", request.headers.get("authorization"))
        target = urlsplit(request.target)
        segments = [unquote(part) for part in target.path.split("/")[1:]]
        if target.path == "/":
            return self._description if request.method == "OPTIONS" else error_reply(NOT_FOUND)
        head = segments[0]
        if head == "ping":
            return _HEALTHY if self.models.healthy() else _UNHEALTHY
        if head == "api-description" and len(segments) == 1:
            return self._description
        route = _prediction_route(segments, target.query)
        if route is None:
            return error_reply(NOT_FOUND)
        name, version, explain, query = route
        return self._predict(request, name, version, explain, query, send)

    def _predict(self, http: HttpRequest, name: str, version: str | None, explain: bool,
                 query: list[tuple[str, str]], send: Send) -> asyncio.Future:
        """The future of the prediction's reply (a callback on the job's future, no task of its own);
        raises TsError when the request is refused."""
        arrival_ns = time.perf_counter_ns()
        request = Request(str(uuid.uuid4()), request_parameters(http, query),
                          {**http.headers, "url_path": "", "explain": "True" if explain else "False"})
        stream = _Stream(send, request.request_id, self.models.metrics.count_response)
        request.on_part = stream.part  # the workers' parts arrive on the event loop
        job = self.models.submit(name, version, request, arrival_ns)
        reply = asyncio.get_running_loop().create_future()
        job.future.add_done_callback(partial(self._answered, reply, job, name, version, stream))
        return reply

    def _answered(self, reply: asyncio.Future, job: Job, name: str, version: str | None, stream: _Stream,
                  done: asyncio.Future) -> None:
        if reply.done():
            return
        if done.cancelled():
            reply.cancel()
            return
        try:
            outcome = self.models.finished(name, version, job)
        except Exception as exc:  # noqa: BLE001 - a TsError (model unregistered) becomes the reply's error
            reply.set_exception(exc)
            return
        reply.set_result(stream.finish(outcome) if stream.started else answer_reply(outcome, job.request.request_id))


def _prediction_route(segments: list[str], query: str) -> tuple[str, str | None, bool, list] | None:
    """(model, version, explain, query parameters for the handler) of a prediction path, or None."""
    head, count = segments[0], len(segments)
    if head in ("predictions", "explanations"):
        if count < 2 or not segments[1]:
            return None
        return segments[1], segments[2] if count >= 3 and segments[2] else None, head == "explanations", []
    if head == "v1" and count == 3 and segments[1] == "models" and ":" in segments[2]:
        name, _, action = segments[2].partition(":")
        return (name, None, action == "explain", []) if action in ("predict", "explain") else None
    if head == "v2" and count == 4 and segments[1] == "models" and segments[3] in ("infer", "explain"):
        return segments[2], None, segments[3] == "explain", []
    parameters = parse_qsl(query, keep_blank_values=True)
    if head == "invocations" and count == 1:
        name = parse_qs(query).get("model_name", [""])[0]
        return (name, None, False, parameters) if name else None
    if head == "models" and count == 3 and segments[2] == "invoke":
        return segments[1], None, False, parameters
    if count == 2 and segments[1] == "predict":
        return segments[0], None, False, parameters
    if count == 3 and segments[2] == "predict":
        return segments[0], segments[1], False, parameters
    return None


def request_parameters(http: HttpRequest, query: list[tuple[str, str]]) -> list[tuple[str, str, bytes]]:
    """The handler's inputs of one HTTP request: (name, content type, bytes) each."""
    parameters: list[tuple[str, str, Any]] = [(key, "", value.encode()) for key, value in query]
    content_type = http.headers.get("content-type", "")
    mime = content_type.partition(";")[0].strip()
    if mime.lower() == "multipart/form-data":
        parameters.extend(_multipart(content_type, http.body))
    elif mime.lower() == "application/x-www-form-urlencoded":
        fields = parse_qsl(http.body.decode("utf-8", "replace"), keep_blank_values=True)
        parameters.extend((key, "", value.encode()) for key, value in fields)
    else:
        parameters.append(("body", mime, http.body))
    return parameters


def _multipart(content_type: str, body: bytes) -> list[tuple[str, str, bytes]]:
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body,
                                       policy=email.policy.HTTP)
    if not message.is_multipart():
        raise TsError(400, "BadRequestException", "Invalid multipart/form-data body")
    fields = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        payload = part.get_payload(decode=True) or b""
        fields.append((str(name), "" if part.get_filename() is None else part.get_content_type(), payload))
    return fields


def answer_reply(outcome: Answer | Failure, request_id: str) -> Reply:
    """The HTTP reply of one handler answer (its status, phrase, type, headers) or backend failure."""
    if isinstance(outcome, Failure):
        return error_reply(TsError(outcome.code, "InternalServerException", outcome.message))
    headers = tuple((key, value) for key, value in outcome.headers if key.lower() not in _HIDDEN_HEADERS)
    return Reply(outcome.status, outcome.body, outcome.content_type, outcome.reason, headers,
                 request_id=request_id)


class _Stream:
    """A chunked prediction: the head with the first intermediate part, one chunk per part after it."""

    def __init__(self, send: Send, request_id: str, count: Any) -> None:
        self._send = send
        self._request_id = request_id
        self._count = count
        self.started = False

    def part(self, answer: Answer) -> None:
        if not self.started:
            self.started = True
            headers = tuple((k, v) for k, v in answer.headers if k.lower() not in _HIDDEN_HEADERS)
            self._count(answer.status)
            self._send(chunked_head(answer.status, answer.reason, answer.content_type, headers,
                                    self._request_id))
        if answer.body:
            self._send(chunk(answer.body))

    def finish(self, outcome: Answer | Failure) -> object:
        if isinstance(outcome, Failure):
            body = error_reply(TsError(outcome.code, "InternalServerException", outcome.message)).body
        else:
            body = outcome.body
        if body:
            self._send(chunk(body))
        self._send(chunk(b""))
        return STREAMED
