"""Routes and bodies of the OpenAI-compatible mock: what to answer, never when (see _server.py).

Routes: POST /v1/chat/completions and /v1/completions (streamed with `"stream": true`, else one JSON
body), POST /v1/embeddings (answered at once with a fixed-size vector per input), GET /v1/models,
GET /health, GET /mock (the declared timing, the counters and a record of each of the last RECORDS_KEPT
completions, for tests) and GET /mock/requests (the bodies of the first --record-requests accepted
requests, for tests that check what was sent).

Time to first token may cycle per request (--ttft-ms 20,120): completion n (1-based, in the order the
server accepted them, `serial`) waits ttft_cycle_ms[(n - 1) % len]; so which requests were slow is
known exactly, and /mock's `requests` says it request by request. A
completion request is checked the way OpenAI checks it; a bad one gets OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` with status 400 (404 for an unknown model or
route, 405 for a wrong method) and the connection keeps serving.

The "model" generates exactly `max_tokens` tokens (`max_completion_tokens` for chat; the server's
--max-tokens when the request gives neither), one per chunk, cycling through a fixed word list, and
stops with finish_reason "length" (vLLM's `ignore_eos` is accepted: the mock never stops early).
Prompt tokens are counted as whitespace-separated words. With --no-usage no answer carries usage.
Chunk layout of a chat stream (OpenAI's): a role chunk with empty content written together with the
first token's chunk, a chunk per further token, a final chunk with an empty delta and the
finish_reason, the usage chunk (`"choices": []`) when `stream_options.include_usage` is true, then
`data: [DONE]`. The last token's chunk and everything after it leave in one write.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from servers.core.connection import max_connections_problems
from servers.core.http1 import json_body

SERVER_NAME = "loadgen-openai-mock"
DEFAULT_MODEL = "mock-llm"
_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_WORDS = (
    " the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " while", " seven", " wise",
    " owls", " count", " every", " small", " star", " in", " one", " long", " night",
)
"""The generated text: token k is _WORDS[k % len(_WORDS)] (one word with its leading space a token)."""
_FINGERPRINT = "fp_loadgen_mock"
RECORDS_KEPT = 10_000
"""Completions /mock's `requests` lists (the last ones accepted)."""


@dataclass(frozen=True)
class MockConfig:
    """What the mock promises: its timing, its models, and the faults it injects."""

    ttft_ms: float = 0.0
    """Arrival of a completion request to its first token chunk (the first of ttft_cycle_ms when it cycles)."""
    ttft_cycle_ms: tuple[float, ...] = ()
    """When given: completion n (1-based, in accepted order) waits ttft_cycle_ms[(n - 1) % len] instead."""
    itl_ms: float = 0.0
    """Between successive token chunks."""
    max_tokens: int = 16
    """Tokens generated when the request gives no max_tokens."""
    max_tokens_limit: int = 4096
    """Largest max_tokens accepted (OpenAI answers 400 beyond a model's limit)."""
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    truncate_every: int = 0
    """Every Nth streamed response is cut (connection closed) after half its tokens, before [DONE]."""
    error_every: int = 0
    """Every Nth streamed response sends an error event after half its tokens, then [DONE]."""
    embedding_dims: int = 8
    """Length of every embedding vector /v1/embeddings answers."""
    record_requests: int = 0
    """Keep the bodies of the first N accepted requests for GET /mock/requests (0: none)."""
    usage: bool = True
    """Answers carry usage (a stream's usage chunk when asked); False: never, as some servers."""
    max_connections: int | None = None
    """The most HTTP connections open at once (None: no cap); beyond it 503 in OpenAI's error shape."""

    def problems(self) -> list[str]:
        """Every reason this config is invalid, empty when it is valid."""
        found = [f"{name} must be a finite number >= 0, got {value}"
                 for name, value in (("ttft_ms", self.ttft_ms), ("itl_ms", self.itl_ms),
                                     *(("ttft_ms", ttft) for ttft in self.ttft_cycle_ms))
                 if not (value >= 0 and value != float("inf"))]
        for name in ("max_tokens", "max_tokens_limit", "embedding_dims"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens > self.max_tokens_limit:
            found.append(f"max_tokens ({self.max_tokens}) must not exceed "
                         f"max_tokens_limit ({self.max_tokens_limit})")
        for name in ("truncate_every", "error_every", "record_requests"):
            if getattr(self, name) < 0:
                found.append(f"{name} must be >= 0 (0 = never), got {getattr(self, name)}")
        if not self.models or not all(self.models):
            found.append("at least one non-empty model name is needed")
        return found + max_connections_problems(self.max_connections, "max_connections")

    def ttft_ms_of(self, serial: int) -> float:
        """The time to first token of completion `serial` (1-based, in accepted order)."""
        cycle = self.ttft_cycle_ms
        return cycle[(serial - 1) % len(cycle)] if cycle else self.ttft_ms


class Reply(NamedTuple):
    """An answer written as soon as it is the connection's turn."""

    status: int
    body: bytes
    content_type: str = "application/json"


@dataclass
class Completion:
    """An accepted completion request: what to generate, and how to send it."""

    chat: bool
    model: str
    tokens: int
    prompt_tokens: int
    stream: bool
    include_usage: bool
    serial: int
    """1-based count of completion requests accepted by this server (ids and fault injection)."""
    fault: str | None = None
    """"truncate" or "error" for a stream picked by --truncate-every / --error-every."""
    usage: bool = True
    """The non-streamed answer carries usage (--no-usage: not)."""
    ttft_s: float = 0.0
    """Its time to first token (MockConfig.ttft_ms_of its serial), in seconds."""
    record: dict[str, Any] = field(default_factory=dict)
    """Its entry in /mock's `requests`: serial, ttft_ms, stream, tokens, fault; arrival_t and first_token_t
    (CLOCK_MONOTONIC: when its clock started, when its first token chunk was written) once known."""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def fault_after(self) -> int:
        """Token chunks written before the fault."""
        return max(1, self.tokens // 2)


class OpenAIError(Exception):
    """A request OpenAI would refuse; `reply()` is its error answer."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def reply(self) -> Reply:
        return error_reply(self.status, self.message, self.param, self.code, self.kind)


def error_reply(status: int, message: str, param: str | None = None, code: str | None = None,
                kind: str = "invalid_request_error") -> Reply:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return Reply(status, json_body({"error": error}))


class MockApp:
    """Maps (method, target, body) to a Reply or a Completion; keeps the counters of GET /mock.

    A server built on it (servers/llm_sim) adds its own GET routes (`get_routes`), refuses what it
    cannot hold (`check_fits`) and may route more itself (`_route`).
    """

    def __init__(self, config: MockConfig, t0: float, pid: int) -> None:
        self.config = config
        self.t0 = t0
        self.pid = pid
        self.counters = {"completions": 0, "streams": 0, "completed": 0, "truncated": 0, "error_events": 0,
                         "tokens": 0, "rejected": 0}
        """completions accepted, of them streamed; responses written to the end (completed), cut
        (truncated) or ended by an error event; token chunks written; requests refused (4xx)."""
        self.records: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)
        """One entry per completion accepted (the last RECORDS_KEPT): see Completion.record."""
        created = int(time.time())
        models = [{"id": name, "object": "model", "created": created, "owned_by": "loadgen"}
                  for name in config.models]
        self._models = Reply(200, json_body({"object": "list", "data": models}))
        self.counters.update(embeddings=0, abandoned=0)
        """embeddings answered; streams whose client closed the connection before their end."""
        self.recorded: list[dict[str, Any]] = []
        """{"path", "body"} of the first config.record_requests accepted requests."""

    def handle(self, method: str, target: str, body: bytes) -> Reply | Completion:
        """Route one request (target: its path, and a query string if any); never raises for bad
        input, answers an error instead."""
        path, _, query = target.partition("?")
        reply = self._route(method, path, query, body)
        if isinstance(reply, Reply) and 400 <= reply.status < 500:
            self.counters["rejected"] += 1
        return reply

    def get_routes(self) -> dict[str, Callable[[], Reply]]:
        """The GET routes besides the completions: path -> the answer's maker."""
        return {"/v1/models": lambda: self._models, "/health": lambda: Reply(200, b""),
                "/mock": lambda: Reply(200, json_body(self.describe())),
                "/mock/requests": lambda: Reply(200, json_body({"requests": self.recorded}))}

    def check_fits(self, prompt_tokens: int, tokens: int) -> None:
        """Raise OpenAIError when a valid request is more than the server can hold (the mock holds any)."""

    def _route(self, method: str, path: str, query: str, body: bytes) -> Reply | Completion:
        if path in ("/v1/chat/completions", "/v1/completions"):
            if method != "POST":
                return wrong_method(method, path, "POST")
            try:
                return self._accept(path == "/v1/chat/completions", body)
            except OpenAIError as exc:
                return exc.reply()
        if path == "/v1/embeddings":
            return self._embeddings_route(method, path, body)
        routes = self.get_routes()
        if path in routes:
            if method != "GET":
                return wrong_method(method, path, "GET")
            return routes[path]()
        return error_reply(404, f"Unknown request URL: {method} {path}.", code="unknown_url")

    def describe(self) -> dict[str, Any]:
        """The declared timing, the start instant (CLOCK_MONOTONIC) and the counters."""
        config = self.config
        return {"ttft_ms": config.ttft_ms, "ttft_cycle_ms": list(config.ttft_cycle_ms), "itl_ms": config.itl_ms,
                "max_tokens": config.max_tokens, "models": list(config.models),
                "truncate_every": config.truncate_every, "error_every": config.error_every, "t0": self.t0,
                "pid": self.pid, **self.counters, "requests": list(self.records)}

    def _accept(self, chat: bool, body: bytes) -> Completion:
        request = _parse_json(body)
        model = _model(request, self.config.models)
        prompt_tokens = _messages_tokens(request) if chat else _prompt_tokens(request)
        tokens = _max_tokens(request, chat, self.config)
        stream = _optional(request, "stream", bool, "a boolean") or False
        _optional(request, "ignore_eos", bool, "a boolean")
        include_usage = _stream_options(request, stream) and self.config.usage
        n = request.get("n")
        if n is not None and (type(n) is not int or n != 1):
            raise OpenAIError(400, f"Invalid 'n': this server generates one choice per request, got {n!r}.",
                              "n", "invalid_value")
        self.check_fits(prompt_tokens, tokens)
        self.counters["completions"] += 1
        serial = self.counters["completions"]
        ttft_ms = self.config.ttft_ms_of(serial)
        completion = Completion(chat, model, tokens, prompt_tokens, stream, include_usage, serial,
                                usage=self.config.usage, ttft_s=ttft_ms / 1000.0)
        self._remember("/v1/chat/completions" if chat else "/v1/completions", request)
        if stream:
            self.counters["streams"] += 1
            completion.fault = self._fault(self.counters["streams"])
        completion.record = {"serial": serial, "ttft_ms": ttft_ms, "stream": stream, "tokens": tokens,
                             "fault": completion.fault, "arrival_t": None, "first_token_t": None}
        self.records.append(completion.record)
        return completion

    def _remember(self, path: str, request: dict[str, Any]) -> None:
        """Keep an accepted request's body while fewer than config.record_requests are kept."""
        if len(self.recorded) < self.config.record_requests:
            self.recorded.append({"path": path, "body": request})

    def _embeddings_route(self, method: str, path: str, body: bytes) -> Reply:
        if method != "POST":
            return wrong_method(method, path, "POST")
        try:
            return self._embeddings(body)
        except OpenAIError as exc:
            return exc.reply()

    def _embeddings(self, body: bytes) -> Reply:
        """OpenAI's embeddings answer: one vector of config.embedding_dims floats per input."""
        request = _parse_json(body)
        model = _model(request, self.config.models)
        inputs, tokens = _embedding_inputs(request)
        encoding = request.get("encoding_format")
        if encoding not in (None, "float", "base64"):
            raise OpenAIError(400, f"Invalid value for 'encoding_format': {json.dumps(encoding)}. Supported "
                              "values are: 'float' and 'base64'.", "encoding_format", "invalid_value")
        dims = request.get("dimensions", self.config.embedding_dims)
        if type(dims) is not int or dims < 1:
            raise _invalid_type("dimensions", "an integer >= 1", dims)
        self.counters["embeddings"] += 1
        self._remember("/v1/embeddings", request)
        data = []
        for index in range(inputs):
            vector = [round(((index + k) % 7 - 3) / 3.0, 6) for k in range(dims)]
            embedding: Any = vector if encoding != "base64" else base64.b64encode(
                struct.pack(f"<{dims}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        answer: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if self.config.usage:
            answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return Reply(200, json_body(answer))

    def _fault(self, stream_serial: int) -> str | None:
        config = self.config
        if config.truncate_every and stream_serial % config.truncate_every == 0:
            return "truncate"
        if config.error_every and stream_serial % config.error_every == 0:
            return "error"
        return None


def wrong_method(method: str, path: str, allowed: str) -> Reply:
    message = f"Method {method} not allowed for {path}; use {allowed}."
    return error_reply(405, message, code="method_not_allowed")


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise OpenAIError(400, "We could not parse the JSON body of your request. (HINT: This likely means "
                          "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                          "payload.)") from None
    if not isinstance(request, dict):
        raise OpenAIError(400, f"Invalid type for request body: expected an object, but got {_kind(request)} "
                          "instead.", None, "invalid_type")
    return request


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), "an unknown value")


def _invalid_type(param: str, expected: str, value: Any) -> OpenAIError:
    message = f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead."
    return OpenAIError(400, message, param, "invalid_type")


def _missing(param: str) -> OpenAIError:
    return OpenAIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _optional(request: dict[str, Any], name: str, kind: type, expected: str) -> Any:
    value = request.get(name)
    if value is not None and type(value) is not kind:
        raise _invalid_type(name, expected, value)
    return value


def _model(request: dict[str, Any], models: tuple[str, ...]) -> str:
    if "model" not in request:
        raise OpenAIError(400, "you must provide a model parameter", None, None)
    model = request["model"]
    if not isinstance(model, str):
        raise _invalid_type("model", "a string", model)
    if model not in models:
        raise OpenAIError(404, f"The model `{model}` does not exist or you do not have access to it.", None,
                          "model_not_found")
    return model


def _messages_tokens(request: dict[str, Any]) -> int:
    if "messages" not in request:
        raise _missing("messages")
    messages = request["messages"]
    if not isinstance(messages, list):
        raise _invalid_type("messages", "an array", messages)
    if not messages:
        raise OpenAIError(400, "Invalid 'messages': empty array. Expected an array with minimum length 1, "
                          "but got an empty array instead.", "messages", "empty_array")
    words = 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _invalid_type(where, "an object", message)
        role = message.get("role")
        if role not in _ROLES:
            if role is None:
                raise _missing(f"{where}.role")
            supported = ", ".join(f"'{r}'" for r in _ROLES)
            raise OpenAIError(400, f"Invalid value: {json.dumps(role)}. Supported values are: {supported}.",
                              f"{where}.role", "invalid_value")
        words += _content_words(message.get("content"), f"{where}.content", role)
    return words


def _content_words(content: Any, where: str, role: str) -> int:
    if isinstance(content, str):
        return len(content.split())
    if content is None and role == "assistant":
        return 0
    if isinstance(content, list):
        return sum(len(part.get("text", "").split()) for part in content
                   if isinstance(part, dict) and isinstance(part.get("text"), str))
    raise _invalid_type(where, "a string or an array of content parts", content)


def _prompt_tokens(request: dict[str, Any]) -> int:
    if "prompt" not in request:
        raise _missing("prompt")
    prompt = request["prompt"]
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, str) for item in prompt):
            return sum(len(item.split()) for item in prompt)
        if all(type(item) is int for item in prompt):
            return len(prompt)
        if all(isinstance(item, list) and all(type(t) is int for t in item) for item in prompt):
            return sum(len(item) for item in prompt)
    raise _invalid_type("prompt", "a string, an array of strings or an array of token arrays", prompt)


def _embedding_inputs(request: dict[str, Any]) -> tuple[int, int]:
    """(inputs, prompt tokens as words) of an embeddings request's `input`."""
    if "input" not in request:
        raise _missing("input")
    value = request["input"]
    if isinstance(value, str) and value:
        return 1, len(value.split())
    if isinstance(value, list) and value:
        if all(isinstance(item, str) and item for item in value):
            return len(value), sum(len(item.split()) for item in value)
        if all(type(item) is int for item in value):
            return 1, len(value)
        if all(isinstance(item, list) and item and all(type(t) is int for t in item) for item in value):
            return len(value), sum(len(item) for item in value)
    raise OpenAIError(400, "'$.input' is invalid. Please check the API reference: "
                      "https://platform.openai.com/docs/api-reference.", "input", "invalid_value")


def _max_tokens(request: dict[str, Any], chat: bool, config: MockConfig) -> int:
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    for name in names:
        value = request.get(name)
        if value is None:
            continue
        if type(value) is not int:
            raise _invalid_type(name, "an integer", value)
        if value < 1:
            raise OpenAIError(400, f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
                              f"but got {value} instead.", name, "integer_below_min_value")
        if value > config.max_tokens_limit:
            raise OpenAIError(400, f"{name} is too large: {value}. This model supports at most "
                              f"{config.max_tokens_limit} completion tokens.", name, "invalid_value")
        return value
    return config.max_tokens


def _stream_options(request: dict[str, Any], stream: bool) -> bool:
    options = request.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise OpenAIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          "stream_options", None)
    if not isinstance(options, dict):
        raise _invalid_type("stream_options", "an object", options)
    include = options.get("include_usage")
    if include is not None and type(include) is not bool:
        raise _invalid_type("stream_options.include_usage", "a boolean", include)
    return bool(include)


# -- what is written ----------------------------------------------------------------------------


class Renderer:
    """The bytes of one completion: SSE events for a stream (part k = what goes out at token k), or the
    whole JSON body. Stream events are put together from prebuilt pieces: a stream writes one a token."""

    def __init__(self, completion: Completion) -> None:
        self.c = completion
        self._id = f"{'chatcmpl' if completion.chat else 'cmpl'}-mock{completion.serial}"
        kind = "chat.completion.chunk" if completion.chat else "text_completion"
        head = (f'{{"id":"{self._id}","object":"{kind}","created":{completion.created},'
                f'"model":{json.dumps(completion.model)}')
        if completion.chat:
            head += f',"system_fingerprint":"{_FINGERPRINT}"'
        tail = "}]" + (',"usage":null' if completion.include_usage else "") + "}"
        choice = head + ',"choices":[{"index":0,'
        if completion.chat:
            self._token = (choice + '"delta":{"content":', '},"logprobs":null,"finish_reason":null' + tail)
            self._role = (choice + '"delta":{"role":"assistant","content":""},"logprobs":null,'
                          '"finish_reason":null' + tail)
            self._finish = choice + '"delta":{},"logprobs":null,"finish_reason":"length"' + tail
        else:
            self._token = (choice + '"text":', ',"logprobs":null,"finish_reason":null' + tail)
            self._role = ""
            self._finish = choice + '"text":"","logprobs":null,"finish_reason":"length"' + tail
        self._usage_head = head + ',"choices":[],"usage":'

    def text(self, k: int) -> str:
        return _WORDS[k % len(_WORDS)]

    def usage(self) -> dict[str, int]:
        c = self.c
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.tokens,
                "total_tokens": c.prompt_tokens + c.tokens}

    def part(self, k: int) -> bytes:
        """The SSE events written at token k (0-based); the last one ends the stream."""
        events = [self._role] if k == 0 and self._role else []
        before, after = self._token
        events.append(before + json.dumps(self.text(k)) + after)
        if k == self.c.tokens - 1:
            events.append(self._finish)
            if self.c.include_usage:
                events.append(self._usage_head + json.dumps(self.usage(), separators=(",", ":")) + "}")
            events.append("[DONE]")
        return "".join(f"data: {event}\n\n" for event in events).encode()

    def error_event(self) -> bytes:
        """An in-stream error event (OpenAI's SDK raises on one), then [DONE]."""
        error = {"error": {"message": "The server had an error while processing your request (injected by "
                           "--error-every).", "type": "server_error", "param": None, "code": None}}
        return f"data: {json.dumps(error, separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()

    def whole(self) -> bytes:
        """The non-streamed JSON body."""
        c = self.c
        text = "".join(self.text(k) for k in range(c.tokens))
        if c.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        body: dict[str, Any] = {"id": self._id, "object": "chat.completion" if c.chat else "text_completion",
                                "created": c.created, "model": c.model}
        if c.chat:
            body["system_fingerprint"] = _FINGERPRINT
        body["choices"] = [choice]
        if c.usage:
            body["usage"] = self.usage()
        return json_body(body)
