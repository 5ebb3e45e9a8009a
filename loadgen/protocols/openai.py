"""OpenAI-compatible streaming completions (protocol "openai"): the protocol-client stage for LLM servers.

`prepare()` checks that the server answers and lists the model (GET /v1/models; a server without
that route is let through to the warm-up), builds a pool of request bodies once (synthetic prompts of
`input_tokens` words, or the lines of `prompt_file`, each with its `max_tokens`), and sends two
unmeasured warm-up requests. `send(intended_t)` posts the next body of the pool with
`"stream": true` and `"stream_options": {"include_usage": true}` to /v1/chat/completions (or
/v1/completions) and returns a StreamOutcome; the client never records anything.

Wire (PROTOCOLS.md 6.1): the answer is Server-Sent Events, `data: {json}` events separated by a
blank line and ended by `data: [DONE]`, in a chunked (or read-to-close) HTTP/1.1 body. The body is
parsed as it arrives on the same lean keep-alive connections as kserve-http (loadgen/protocols/
http1.py), and each event is stamped with the kernel's receive instant of the bytes that completed
it, so a generator busy elsewhere does not stretch the gaps it measures.

Timing points (PROTOCOLS.md 6.2 and 8; the recorder computes TTFT, ITL and TPOT from them):
- a token chunk is a chunk whose choices carry output: non-empty `delta.content` (or
  `reasoning_content`, `tool_calls`, `refusal`) for chat, non-empty `text` for completions. A
  role-only first chunk with empty content is not one: TTFT is the first chunk with a token.
- token_times holds the arrival of every token chunk; done_t is the end of the whole response.
- output tokens: `usage.completion_tokens` of the final usage chunk, else the count of token chunks.

Error kinds beyond the transport ones (errors.py): `http_<status>` for any status other than 200
(message from OpenAI's `{"error": {"message": ...}}`); `stream_error` for an event carrying an
`error` object in a 200 stream; `stream_truncated` for a stream that ended, or whose connection
closed, before `data: [DONE]`; `invalid_response` for a 200 that is not text/event-stream or an event
that is not JSON. `target.timeout` bounds each wait for the next bytes, not the whole stream.

`Authorization: Bearer $OPENAI_API_KEY` is sent when that variable is set.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import field_validator, model_validator

from loadgen.errors import (
    ConnectionClosed,
    ProtocolMismatch,
    ScenarioError,
    TargetNotReady,
    TargetUnreachable,
    classify_exception,
)
from loadgen.flags import Flag, as_path_text
from loadgen.outcome import StreamOutcome
from loadgen.protocols.base import ProtocolSpec, TargetOptions, existing_file, warm_up
from loadgen.protocols.common.http1 import (
    Http1Pool,
    HTTPError,
    Response,
    _Connection,
    _read_chunked,
    _read_head,
    _Reader,
    build_request,
)
from loadgen.protocols.common.tokens import TokenCount, TokenCountField

__all__ = ["DEFAULT_INPUT_TOKENS", "DEFAULT_MAX_TOKENS", "PROTOCOL", "OpenAIClient", "OpenAITarget", "SseStream",
           "StreamPool"]

DEFAULT_MAX_TOKENS = TokenCount(value=128)
DEFAULT_INPUT_TOKENS = TokenCount(value=128)
POOL_SIZE = 256
"""Distinct synthetic requests built before the run and sent in turn (distinct prompts keep a server's
prefix cache from answering every request from one cached prompt)."""
WARMUP_REQUESTS = 2
_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_TRUNCATION_KINDS = ("stream_truncated", "stream_error")
# Short common English words: real tokenizers give about one token for each (with its leading space).
_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "at", "be", "this",
    "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all", "were", "we", "when",
    "your", "can", "said", "there", "use", "an", "each", "which", "she", "do", "how", "their", "if", "will",
    "up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make",
    "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number", "no",
    "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its", "now",
    "find", "long", "down", "day", "did", "get", "come", "made", "may", "part", "over", "new", "sound",
    "take", "only", "little", "work", "know", "place", "year", "live", "me", "back", "give", "most", "very",
    "after", "thing", "our", "just", "name", "good", "sentence", "man", "think", "say", "great", "where",
    "help", "through", "much", "before", "line", "right", "too", "mean", "old", "any", "same", "tell",
    "boy", "follow", "came",
)


class OpenAITarget(TargetOptions):
    """`[target]` of protocol openai: the base URL of an OpenAI-compatible server (it may end in /v1)."""

    protocol: Literal["openai"]
    endpoint: Literal["chat", "completions"] | None = None
    """POST /v1/chat/completions ("chat", the default) or /v1/completions."""
    max_tokens: TokenCountField | None = None
    """Output tokens asked for per request (max_tokens); default 128."""
    input_tokens: TokenCountField | None = None
    """Words of each synthetic prompt (about one token each); default 128."""
    prompt_file: str | None = None
    """JSONL prompts instead of synthetic ones, one {"prompt": ...} or {"messages": [...]} a line."""

    @field_validator("prompt_file")
    @classmethod
    def _prompt_file_exists(cls, value: str | None) -> str | None:
        return existing_file(value)

    @model_validator(mode="after")
    def _one_prompt_source(self) -> OpenAITarget:
        if self.prompt_file is not None and self.input_tokens is not None:
            raise ValueError("give input_tokens (synthetic prompts) or prompt_file, not both")
        return self


class SseStream:
    """Incremental Server-Sent Events parser for one streamed completion.

    `feed(data, at)` takes body bytes as they arrive (`at`: their arrival instant) and keeps what the
    run needs: token chunk instants, the usage count, [DONE], an error event.

    >>> s = SseStream()
    >>> s.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\\n\\ndata: {"choi', 1.0)
    >>> s.feed(b'ces":[{"delta":{"content":"Hi"}}]}\\n\\n: ping\\n\\ndata: [DONE]\\n\\n', 1.5)
    >>> s.token_times, s.done, s.output_tokens
    ([1.5], True, 1)
    """

    __slots__ = (
        "_buffer",
        "body_bytes",
        "chunk_tokens",
        "done",
        "error",
        "invalid",
        "status",
        "token_times",
        "usage_tokens",
    )

    def __init__(self) -> None:
        self.status = 0
        """HTTP status once the response head was read (0 before)."""
        self.token_times: list[float] = []
        self.chunk_tokens = 0
        self.usage_tokens: int | None = None
        self.done = False
        """`data: [DONE]` was seen."""
        self.error: str | None = None
        """Message of the first error event."""
        self.invalid: str | None = None
        """Why an event could not be read (not JSON), if one could not."""
        self.body_bytes = 0
        self._buffer = b""

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunk_tokens

    def feed(self, data: bytes, at: float) -> None:
        self.body_bytes += len(data)
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            self._event(buffer[start:end], at)
            start = end + 2
        self._buffer = buffer[start:]

    def _event(self, raw: bytes, at: float) -> None:
        data = None
        kind = b""
        for line in raw.split(b"\n"):
            name, _, value = line.partition(b":")
            if not name:
                continue  # a comment (keep-alive) line starts with ':'
            value = value[1:] if value[:1] == b" " else value
            if name == b"data":
                data = value if data is None else data + b"\n" + value
            elif name == b"event":
                kind = value
        if data is None or self.done:
            return
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self.invalid = self.invalid or f"event data is not JSON: {data[:80]!r}"
            return
        if not isinstance(chunk, dict):
            self.invalid = self.invalid or f"event data is not a JSON object: {data[:80]!r}"
        elif "error" in chunk or kind == b"error":
            self.error = self.error or _error_message(chunk)
        else:
            self._chunk(chunk, at)

    def _chunk(self, chunk: dict[str, Any], at: float) -> None:
        choices = chunk.get("choices")
        if choices and any(_carries_token(choice) for choice in choices):
            self.token_times.append(at)
            self.chunk_tokens += 1
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]


def _carries_token(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
                    or delta.get("refusal"))
    return bool(choice.get("text"))


class StreamPool(Http1Pool):
    """Http1Pool that hands a text/event-stream body to an SseStream as it arrives."""

    def stream(self, request: bytes, sse: SseStream) -> Response:
        """Send prebuilt request bytes; a 200 event stream is fed to `sse` (the Response's body is then
        empty), any other answer is read whole. done_t is the arrival of the response's last bytes."""
        reused = bool(self._idle)
        conn = self._idle.pop() if reused else self._connect()
        conn.reader.received = 0
        try:
            return self._exchange(conn, request, sse)
        except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
            if reused and conn.reader.received == 0:  # closed while idle: once more, on a fresh one
                return self._exchange(self._connect(), request, sse)
            raise

    def _exchange(self, conn: _Connection, request: bytes, sse: SseStream) -> Response:
        try:
            conn.sock.sendall(request)
            response, keep = _read_streamed(conn.reader, sse)
        except BaseException:
            conn.close()
            raise
        self._release(conn, keep)
        return response


def _read_streamed(reader: _Reader, sse: SseStream) -> tuple[Response, bool]:
    status, version, headers = _read_head(reader)
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    streamed = status == 200 and headers.get("content-type", "").startswith("text/event-stream")
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    sse.status = status
    if status in (204, 304):
        body = b""
    elif not streamed:
        body, keep = _read_body(reader, headers, chunked, keep)
    elif chunked:
        _feed_chunked(reader, sse)
        body = b""
    elif "content-length" in headers:
        _feed_length(reader, sse, _content_length(headers))
        body = b""
    else:
        while reader.buffer or reader.fill():
            sse.feed(bytes(reader.buffer), reader.rx_t)
            reader.buffer.clear()
        body, keep = b"", False
    return Response(status, headers, body, reader.rx_t), keep


def _read_body(reader: _Reader, headers: dict[str, str], chunked: bool, keep: bool) -> tuple[bytes, bool]:
    if chunked:
        return _read_chunked(reader), keep
    if "content-length" in headers:
        return reader.exactly(_content_length(headers)), keep
    return reader.rest(), False


def _content_length(headers: dict[str, str]) -> int:
    try:
        return int(headers["content-length"])
    except ValueError:
        raise HTTPError(f"bad Content-Length {headers['content-length']!r}") from None


def _feed_chunked(reader: _Reader, sse: SseStream) -> None:
    while True:
        size_line = reader.line().split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise HTTPError(f"bad chunk size {size_line[:20]!r}") from None
        if size == 0:
            while reader.line():  # trailers end with an empty line
                pass
            return
        sse.feed(reader.exactly(size), reader.rx_t)
        if reader.exactly(2) != b"\r\n":
            raise HTTPError("chunk not followed by CRLF")


def _feed_length(reader: _Reader, sse: SseStream, length: int) -> None:
    while length > 0:
        if not reader.buffer and not reader.fill():
            raise ConnectionClosed(f"connection closed {length} bytes before the body's end")
        piece = bytes(reader.buffer[:length])
        del reader.buffer[: len(piece)]
        length -= len(piece)
        sse.feed(piece, reader.rx_t)


class OpenAIClient:
    """One model behind an OpenAI-compatible server, streamed, on a keep-alive pool."""

    def __init__(self, target: OpenAITarget, seed: int = 0) -> None:
        self.target = target
        self.seed = seed
        parts = urlsplit(target.url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/").removesuffix("/v1")  # the base URL may end in /v1
        self._netloc = self._host + (f":{parts.port}" if parts.port else "")
        self.endpoint = target.endpoint or "chat"
        self.path = self._prefix + _PATHS[self.endpoint]
        self.request_name = f"{target.model} {self.endpoint}"
        self._pool = self._new_pool(target.timeout)
        self.requests: list[bytes] = []
        self._next = 0
        self.warmup_requests = 0

    def _new_pool(self, timeout: float) -> StreamPool:
        context = self.target.ssl_context()
        return StreamPool(self._host, self._port, tls=context, connect_timeout=self.target.connect_timeout,
                          timeout=timeout)

    # -- before the run -------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Reachability and model check, request pool, warm-up. Raises a TargetError (or a
        ScenarioError for a bad prompt file) when the run cannot start."""
        served = self._served_models()
        bodies = self._bodies()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        headers.update(self.target.auth_headers())
        self.requests = [build_request("POST", self._netloc, self.path, body, headers) for body in bodies]
        warm_up(self, self.path, _TRUNCATION_KINDS, WARMUP_REQUESTS)
        return {"name": self.target.model, "endpoint": self.path, "served_models": served,
                "requests_built": len(self.requests)}

    def _served_models(self) -> list[str]:
        control = self._new_pool(self.target.connect_timeout)
        path = self._prefix + "/v1/models"
        try:
            response = control.send(build_request("GET", self._netloc, path))
        except Exception as exc:  # noqa: BLE001 - every way of not answering is "unreachable"
            raise TargetUnreachable(
                f"cannot reach {self.target.url} ({classify_exception(exc)}: {exc or type(exc).__name__}); "
                f"is the server running, and is --target right?"
            ) from None
        finally:
            control.close()
        if response.status != 200:
            return []  # no model list here: the warm-up shows whether the model answers
        try:
            served = [str(entry["id"]) for entry in json.loads(response.body)["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolMismatch(f"GET {path}: not an OpenAI model list ({exc})") from None
        if self.target.model not in served:
            raise TargetNotReady(
                f"model {self.target.model!r} is not served at {self.target.url} "
                f"(GET {path} lists: {', '.join(served) or 'none'}); is --model right?"
            )
        return served

    def _bodies(self) -> list[bytes]:
        rng = np.random.default_rng(self.seed)
        target = self.target
        if target.prompt_file is not None:
            prompts = read_prompt_file(Path(target.prompt_file), self.endpoint)
            fallback = sample_counts(target.max_tokens or DEFAULT_MAX_TOKENS, len(prompts), rng)
            items = [(prompt, own if own is not None else int(n))
                     for (prompt, own), n in zip(prompts, fallback, strict=True)]
        else:
            lengths = sample_counts(target.input_tokens or DEFAULT_INPUT_TOKENS, POOL_SIZE, rng)
            outputs = sample_counts(target.max_tokens or DEFAULT_MAX_TOKENS, POOL_SIZE, rng)
            items = [(synthetic_prompt(int(length), rng), int(n))
                     for length, n in zip(lengths, outputs, strict=True)]
        return [self._body(prompt, max_tokens) for prompt, max_tokens in items]

    def _body(self, prompt: str | list[Any], max_tokens: int) -> bytes:
        body: dict[str, Any] = {"model": self.target.model}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        else:
            body["prompt"] = prompt
        body.update(max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
        return json.dumps(body, separators=(",", ":")).encode()

    # -- the hot path ---------------------------------------------------------------------------
    def send(self, intended_t: float) -> StreamOutcome:
        """POST the next request of the pool and read its stream; errors come back as their kind."""
        request = self.requests[self._next]
        self._next = (self._next + 1) % len(self.requests)
        sse = SseStream()
        sent_t = time.monotonic()
        try:
            response = self._pool.stream(request, sse)
        except Exception as exc:  # noqa: BLE001 - mapped to an error kind, the run goes on
            return _failed(intended_t, sent_t, sse, exc)
        done_t = max(response.done_t, sent_t)
        if response.status != 200:
            return StreamOutcome(intended_t, sent_t, done_t, f"http_{response.status}",
                                 _error_text(response.body), len(response.body))
        error, message = _stream_error(sse, response)
        return StreamOutcome(intended_t, sent_t, done_t, error, message, sse.body_bytes, sse.token_times,
                             sse.output_tokens)

    def close(self) -> None:
        self._pool.close()


def _failed(intended_t: float, sent_t: float, sse: SseStream, exc: Exception) -> StreamOutcome:
    kind = classify_exception(exc)
    message = str(exc) or type(exc).__name__
    if sse.status == 200 and kind == "connection_closed":
        if sse.error is not None:
            kind, message = "stream_error", sse.error
        else:
            kind = "stream_truncated"
            message = f"connection closed after {sse.chunk_tokens} token chunks, before data: [DONE]"
    return StreamOutcome(intended_t, sent_t, time.monotonic(), kind, message, sse.body_bytes)


def _stream_error(sse: SseStream, response: Response) -> tuple[str | None, str]:
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        content_type = response.headers.get("content-type", "none")
        return "invalid_response", f"200 with Content-Type {content_type}: not streamed"
    if sse.error is not None:
        return "stream_error", sse.error
    if sse.invalid is not None:
        return "invalid_response", sse.invalid
    if not sse.done:
        return "stream_truncated", f"stream ended after {sse.chunk_tokens} token chunks without data: [DONE]"
    return None, ""


def _error_message(chunk: dict[str, Any]) -> str:
    error = chunk.get("error", chunk)
    if isinstance(error, dict):
        return str(error.get("message") or error)[:200]
    return str(error)[:200]


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(data, dict):
        if "error" in data:
            return _error_message(data)
        return str(data.get("message") or data.get("detail") or data)[:200]
    return str(data)[:200]


# -- what is sent -------------------------------------------------------------------------------


def sample_counts(spec: TokenCount, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` token counts drawn from `spec` (integers >= 1).

    >>> sample_counts(TokenCount(dist="uniform", low=8, high=9), 4, np.random.default_rng(0)).tolist()
    [9, 9, 9, 8]
    """
    if spec.dist == "fixed":
        return np.full(count, spec.value, dtype=np.int64)
    if spec.dist == "uniform":
        return rng.integers(spec.low, spec.high + 1, count)
    return np.maximum(1, np.rint(rng.normal(spec.mean, spec.stddev, count))).astype(np.int64)


def synthetic_prompt(words: int, rng: np.random.Generator) -> str:
    """`words` common English words drawn at random: about one token each for real tokenizers."""
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), words))


def read_prompt_file(path: Path, endpoint: str) -> list[tuple[str | list[Any], int | None]]:
    """(prompt or messages, the line's own max_tokens or None) for each line of a JSONL prompt file.

    A line is {"prompt": "..."} or {"messages": [...]}, optionally with "max_tokens"; a chat endpoint
    sends a prompt as one user message, the completions endpoint takes prompts only. Blank lines are
    skipped. Every bad line is reported (ScenarioError, exit 2).
    """
    where = "target.prompt_file"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([f"{where}: cannot read {path}: {exc}"], str(path)) from None
    prompts: list[tuple[str | list[Any], int | None]] = []
    problems: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompts.append(_prompt_line(json.loads(line), endpoint))
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: {path} line {number}: {exc}")
    if not prompts and not problems:
        problems.append(f"{where}: {path} holds no prompts")
    if problems:
        raise ScenarioError(problems[:20], str(path))
    return prompts


def _prompt_line(entry: Any, endpoint: str) -> tuple[str | list[Any], int | None]:
    if not isinstance(entry, dict):
        raise TypeError('expected a JSON object with "prompt" or "messages"')
    max_tokens = entry.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if isinstance(entry.get("prompt"), str):
        return entry["prompt"], max_tokens
    messages = entry.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m for m in messages):
        if endpoint != "chat":
            raise ValueError('"messages" needs the chat endpoint; the completions endpoint takes "prompt"')
        return messages, max_tokens
    raise ValueError('expected "prompt" (a string) or "messages" (a list of {"role", "content"} objects)')


PROTOCOL = ProtocolSpec(
    name="openai",
    options=OpenAITarget,
    client=OpenAIClient,
    streams=True,
    flags=(
        Flag("endpoint", str | None, "chat (default) or completions.", key=("target", "endpoint")),
        Flag("max_tokens", str | None, 'Output tokens a request: 128, "uniform:8,32", "normal:128,16".',
             key=("target", "max_tokens")),
        Flag("input_tokens", str | None, "Words a synthetic prompt (~a token each), as --max-tokens.",
             key=("target", "input_tokens")),
        Flag("prompt_file", Path | None, 'JSONL prompts, {"prompt": ...} or {"messages": [...]} a line.',
             key=("target", "prompt_file"), to_scenario=as_path_text),
    ),
    summary="OpenAI-compatible streaming completions (LLM servers)",
)
