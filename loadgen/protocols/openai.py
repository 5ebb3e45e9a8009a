"""OpenAI-compatible completions and embeddings (protocol "openai"): the protocol-client stage for LLM servers.

`prepare()` builds the pool of request bodies first (so a bad dataset or tokenizer stops the run before
anything is sent), checks that the server answers and lists the model (GET /v1/models; a server without
that route is let through to the warm-up), and sends two unmeasured warm-up requests.
`send(intended_t)` posts the next body of the pool in turn, `send(intended_t, row=k)` the body of row
k (modulo the pool's length), and returns a StreamOutcome; the client never records anything.

The pool is made of rows (loadgen/protocols/common/llm_data.py: a prompt or a size in tokens, the
max_tokens asked for, per-row body extras), each made bytes once before the run:
- synthetic rows: `input_tokens` / `max_tokens` drawn per row (POOL_SIZE rows), or the per-row
  `sizes` (input_tokens, output_tokens) the client was made with (a trace replay: one body per trace
  row, sent with `send(t, row=k)`). A synthetic prompt is common English words: with `tokenizer` it
  is built to exactly input_tokens tokens, without it input_tokens words (about a token each).
- dataset rows: `dataset` (ShareGPT JSON or JSONL, `dataset_format` or told by content), a seeded
  shuffle of its entries cut at `dataset_limit`; max_tokens is a JSONL line's own, or with
  `dataset_output_tokens` a ShareGPT entry's reference answer length, else drawn from `max_tokens`.
  `prompt_file` is the older JSONL form: its lines in file order.
A row that asks for max_tokens also sends `"ignore_eos": true` (vLLM's extension, so the length is
honoured) when `ignore_eos` says so: by default for synthetic rows, not for dataset rows.

Modes: streamed chat/completions (the default), non-streamed (`stream = false`: one JSON answer,
latency and usage tokens, no TTFT/ITL), and `endpoint = "embeddings"` (/v1/embeddings with the
prompts as `input`: latency only; the answer must carry `data[].embedding`).

Wire of a stream (PROTOCOLS.md 6.1): Server-Sent Events, `data: {json}` events separated by a blank
line and ended by `data: [DONE]`, in a chunked (or read-to-close) HTTP/1.1 body. The body is parsed
as it arrives on the same lean keep-alive connections as kserve-http (loadgen/protocols/http1.py),
and each event is stamped with the kernel's receive instant of the bytes that completed it, so a
generator busy elsewhere does not stretch the gaps it measures.

Timing points (PROTOCOLS.md 6.2 and 8; the recorder computes TTFT, ITL and TPOT from them):
- a token chunk is a chunk whose choices carry output: non-empty `delta.content` (or
  `reasoning_content`, `tool_calls`, `refusal`) for chat, non-empty `text` for completions. A
  role-only first chunk with empty content is not one: TTFT is the first chunk with a token.
- token_times holds the arrival of every token chunk; done_t is the end of the whole response.
- output tokens: `usage.completion_tokens` when the server gives it; else, with a tokenizer, the
  tokens of the streamed (or answered) text; else the count of token chunks (non-streamed: words).
  summary.json's `token_counts` says which (`input` and `output`), the output one as the warm-up's
  answers showed it.

Cancellation (`cancel_rate` P): each measured stream is picked with probability P from a generator
seeded with the run's seed (`cancel_draws`; warm-ups are never picked), and a picked stream's
connection is closed by the client as soon as its first token chunk arrived (never reused). Its
outcome has error kind `cancelled` (loadgen/outcome.py CANCELLED): counted apart, not an error;
its TTFT counts, it has no latency, ITL or TPOT.

Error kinds beyond the transport ones (errors.py): `http_<status>` for any status other than 200
(message from OpenAI's `{"error": {"message": ...}}`); `stream_error` for an event carrying an
`error` object in a 200 stream; `stream_truncated` for a stream that ended, or whose connection
closed, before `data: [DONE]`; `invalid_response` for a 200 that is not text/event-stream (when
streamed), an event that is not JSON, or a non-streamed answer without choices (embeddings: without
`data[].embedding`); `response_too_large` for an answer past `max_response_bytes` and `event_too_large`
for one event that grew past `max_event_bytes` without ending (its connection is closed).

Deadlines: a non-streamed answer must be complete within `target.timeout` (connect, send and the whole
answer). A stream must send its first byte within `stream_first_byte_timeout` (default: `timeout`) and
then never go quiet for longer than `stream_gap_timeout` (default: `timeout`); its total length is
not bounded, since a long generation may rightly take minutes.

`Authorization: Bearer $OPENAI_API_KEY` is sent when that variable is set.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import Field, field_validator, model_validator

from loadgen.errors import (
    ConnectionClosed,
    EventTooLarge,
    ProtocolMismatch,
    ScenarioError,
    TargetNotReady,
    TargetUnreachable,
    classify_exception,
)
from loadgen.flags import Flag, as_path_text, if_set
from loadgen.outcome import CANCELLED, StreamOutcome
from loadgen.patterns.trace import Trace
from loadgen.protocols.base import ProtocolSpec, TargetOptions, existing_file, warm_up
from loadgen.protocols.common.http1 import (
    _INF,
    Http1Pool,
    HTTPError,
    Response,
    _Connection,
    _read_chunked,
    _read_head,
    _Reader,
    _send_within,
    build_request,
)
from loadgen.protocols.common.llm_data import (
    Dataset,
    Prompt,
    Row,
    TokenCounter,
    block_prompt,
    exact_prompt,
    read_dataset,
    sample_rows,
    synthetic_prompt,
)
from loadgen.protocols.common.tokens import TokenCount, TokenCountField
from loadgen.units import Duration

__all__ = ["DEFAULT_INPUT_TOKENS", "DEFAULT_MAX_TOKENS", "PROTOCOL", "OpenAIClient", "OpenAITarget", "SseStream",
           "StreamCancelled", "StreamPool", "cancel_draws", "read_prompt_file", "sample_counts",
           "synthetic_prompt"]

DEFAULT_MAX_TOKENS = TokenCount(value=128)
DEFAULT_INPUT_TOKENS = TokenCount(value=128)
POOL_SIZE = 256
"""Distinct synthetic requests built before the run and sent in turn (distinct prompts keep a server's
prefix cache from answering every request from one cached prompt)."""
WARMUP_REQUESTS = 2
MAX_EVENT_BYTES = 1024 * 1024
"""Default limit on one server-sent event: a chunk of a few tokens is a few hundred bytes."""
_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}
_TRUNCATION_KINDS = ("stream_truncated", "stream_error")


class OpenAITarget(TargetOptions):
    """`[target]` of protocol openai: the base URL of an OpenAI-compatible server (it may end in /v1)."""

    protocol: Literal["openai"]
    endpoint: Literal["chat", "completions", "embeddings"] | None = None
    """POST /v1/chat/completions ("chat", the default), /v1/completions or /v1/embeddings."""
    max_tokens: TokenCountField | None = None
    """Output tokens asked for per request (max_tokens); default 128."""
    input_tokens: TokenCountField | None = None
    """Tokens of each synthetic prompt (exact with `tokenizer`, else words of about a token each); default 128."""
    prompt_file: str | None = None
    """JSONL prompts instead of synthetic ones, one {"prompt": ...} or {"messages": [...]} a line, sent in
    file order."""
    dataset: str | None = None
    """A prompt dataset: ShareGPT JSON or JSONL (see dataset_format), sampled and shuffled with the seed."""
    dataset_format: Literal["sharegpt", "jsonl"] | None = None
    """The dataset's format; told by its content when not given ('[' first: ShareGPT)."""
    dataset_output_tokens: bool = False
    """ShareGPT: ask each request for its reference answer's length as max_tokens (as vLLM's benchmark)."""
    dataset_limit: int | None = Field(default=None, ge=1)
    """Keep at most this many dataset entries (a seeded sample)."""
    tokenizer: str | None = None
    """A Hugging Face tokenizer.json: exact input token counts, and output counts when the server gives
    no usage."""
    stream: bool = True
    """Stream the answer (TTFT, ITL); false: one JSON answer, latency and usage tokens only."""
    ignore_eos: bool | None = None
    """Send "ignore_eos": true with max_tokens (vLLM); default: for synthetic rows, not dataset rows."""
    cancel_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of streams the client closes after their first token (seeded); counted as cancelled."""
    stream_first_byte_timeout: Duration | None = Field(default=None, gt=0)
    """A stream's first byte (connect and send included) must come within this; default `timeout`."""
    stream_gap_timeout: Duration | None = Field(default=None, gt=0)
    """Longest silence inside a stream once it started; default `timeout`."""
    max_event_bytes: int = Field(default=MAX_EVENT_BYTES, gt=0)
    """Longest server-sent event; a longer one is cut off as event_too_large."""

    @field_validator("prompt_file", "dataset", "tokenizer")
    @classmethod
    def _files_exist(cls, value: str | None) -> str | None:
        return existing_file(value)

    @model_validator(mode="after")
    def _consistent(self) -> OpenAITarget:
        sources = [name for name in ("input_tokens", "prompt_file", "dataset") if getattr(self, name) is not None]
        if len(sources) > 1:
            raise ValueError(f"give one prompt source: {' or '.join(sources)}, not both")
        if self.dataset is None:
            given = [name for name in ("dataset_format", "dataset_limit") if getattr(self, name) is not None]
            given += ["dataset_output_tokens"] if self.dataset_output_tokens else []
            if given:
                raise ValueError(f"{', '.join(given)} needs dataset")
        if self.endpoint == "embeddings":
            given = [name for name in ("max_tokens", "ignore_eos") if getattr(self, name) is not None]
            given += ["dataset_output_tokens"] if self.dataset_output_tokens else []
            if given:
                raise ValueError(f"{', '.join(given)} does not apply to the embeddings endpoint")
        if self.cancel_rate > 0 and (not self.stream or self.endpoint == "embeddings"):
            raise ValueError("cancel_rate needs streamed chat or completions (a stream is cancelled after its "
                             "first token)")
        return self


class SseStream:
    """Incremental Server-Sent Events parser for one streamed completion.

    `feed(data, at)` takes body bytes as they arrive (`at`: their arrival instant) and keeps what the
    run needs: token chunk instants, the usage count, [DONE], an error event, and with `keep_text` the
    streamed text (to count its tokens when the server gives no usage). With `cancel` set, the first
    token chunk raises StreamCancelled once stamped (the caller closes the connection).

    >>> s = SseStream()
    >>> s.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\\n\\ndata: {"choi', 1.0)
    >>> s.feed(b'ces":[{"delta":{"content":"Hi"}}]}\\n\\n: ping\\n\\ndata: [DONE]\\n\\n', 1.5)
    >>> s.token_times, s.done, s.output_tokens
    ([1.5], True, 1)
    """

    __slots__ = (
        "_buffer",
        "_text",
        "body_bytes",
        "cancel",
        "chunk_tokens",
        "done",
        "error",
        "invalid",
        "max_event_bytes",
        "status",
        "token_times",
        "usage_tokens",
    )

    def __init__(self, keep_text: bool = False, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        """An event (the bytes up to its blank line) longer than this is cut off: EventTooLarge."""
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
        self.cancel = False
        """Raise StreamCancelled at the first token chunk."""
        self._buffer = b""
        self._text: list[str] | None = [] if keep_text else None

    @property
    def text(self) -> str:
        """The streamed output text (empty unless made with keep_text)."""
        return "".join(self._text or ())

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
        if len(self._buffer) > self.max_event_bytes:
            raise EventTooLarge(f"an event grew past {self.max_event_bytes} bytes without ending; cut off")

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
        except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
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
            if self._text is not None:
                self._text.extend(_choice_text(choice) for choice in choices)
            if self.cancel:
                raise StreamCancelled
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]


class StreamCancelled(Exception):
    """Raised out of SseStream.feed at the first token chunk of a stream picked for cancellation."""


def _carries_token(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
                    or delta.get("refusal"))
    return bool(choice.get("text"))


def _choice_text(choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        parts = (delta.get("reasoning_content"), delta.get("content"))
        return "".join(part for part in parts if isinstance(part, str))
    text = choice.get("text")
    return text if isinstance(text, str) else ""


class StreamPool(Http1Pool):
    """Http1Pool that hands a text/event-stream body to an SseStream as it arrives.

    `first_byte_timeout` and `gap_timeout` bound a streamed request (`stream(..., streamed=True)`):
    connect, send and the answer's first byte within the first, then each wait for more within the
    second; a request not streamed has the whole-request deadline `timeout`. The first-byte limit holds
    until the response head is complete, so a head dripped a byte at a time cannot outlast it."""

    first_byte_timeout: float | None = None
    gap_timeout: float | None = None

    def stream(self, request: bytes, sse: SseStream, streamed: bool = False) -> Response:
        """Send prebuilt request bytes; a 200 event stream is fed to `sse` (the Response's body is then
        empty), any other answer is read whole. done_t is the arrival of the response's last bytes."""
        if streamed:
            first = self.first_byte_timeout or self.timeout
            gap = self.gap_timeout or self.timeout
        else:
            first, gap = self.timeout, _INF
        deadline = time.monotonic() + first
        try:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else self._connect(deadline)
            try:
                return self._stream_on(conn, request, sse, deadline, gap)
            except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
                if reused and conn.reader.received == 0:  # closed while idle: once more, on a fresh one
                    return self._stream_on(self._connect(deadline), request, sse, deadline, gap)
                raise
        except TimeoutError:
            if not streamed:
                raise TimeoutError(f"no complete answer within {first:g} s") from None
            if sse.status:
                raise TimeoutError(f"the stream went quiet for {gap:g} s (stream_gap_timeout)") from None
            raise TimeoutError(f"no first byte within {first:g} s (stream_first_byte_timeout)") from None

    def _stream_on(self, conn: _Connection, request: bytes, sse: SseStream, deadline: float,
                   gap: float) -> Response:
        conn.reader.start(deadline, _INF, self.max_response_bytes)
        try:
            _send_within(conn.sock, request, deadline)
            response, keep = _read_streamed(conn.reader, sse, gap)
        except BaseException:
            conn.close()
            raise
        self._release(conn, keep)
        return response


def _read_streamed(reader: _Reader, sse: SseStream, gap: float = _INF) -> tuple[Response, bool]:
    """Read the head within the reader's deadline, then the body: each wait within `gap` when it is
    finite (a stream), else within the same deadline."""
    status, version, headers = _read_head(reader)
    reader.gap = gap
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
    """One model behind an OpenAI-compatible server, on a keep-alive pool.

    `sizes`: per-row (input_tokens, output_tokens) to build the pool from, one body per row in that
    order, instead of the target's prompt source (a trace replay); `send(t, row=k)` then sends row k.
    """

    def __init__(self, target: OpenAITarget, seed: int = 0,
                 sizes: Sequence[tuple[int, int]] | None = None) -> None:
        self.target = target
        self.seed = seed
        self.sizes = list(sizes) if sizes is not None else None
        self._trace: Trace | None = None
        if self.sizes is not None and not self.sizes:
            raise ValueError("sizes: at least one (input_tokens, output_tokens) row is needed")
        parts = urlsplit(target.url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/").removesuffix("/v1")  # the base URL may end in /v1
        self._netloc = self._host + (f":{parts.port}" if parts.port else "")
        self.endpoint = target.endpoint or "chat"
        self.path = self._prefix + _PATHS[self.endpoint]
        self.request_name = f"{target.model} {self.endpoint}"
        self.streamed = target.stream and self.endpoint != "embeddings"
        self._pool = self._new_pool(target.timeout)
        self.rows: list[Row] = []
        """The pool's rows, in the order of `requests`."""
        self.input_tokens: list[int] = []
        """Each row's prompt tokens (tokenizer) or words, as built."""
        self.requests: list[bytes] = []
        self.dataset: Dataset | None = None
        self._next = 0
        self.warmup_requests = 0
        self._counter = TokenCounter()
        self._keep_text = False
        self._send: Callable[[bytes, float], StreamOutcome] = self._send_stream if self.streamed else self._send_whole
        self._cancel_rate = 0.0  # set once the warm-up is done: warm-ups are never cancelled
        self._cancel_draws = cancel_draws(seed)
        self.usage_seen = False
        """Some answer so far carried usage.completion_tokens."""

    def use_trace(self, trace: Trace) -> None:
        """A trace replay (SizedClient): one body per trace row, with the row's input and output tokens
        (a size the row lacks is drawn from input_tokens / max_tokens; an output of 0, a failed request
        in BurstGPT, asks for 1 token); `send(t, row=k)` sends row k. Rows too long for the model's
        context (`max_model_len` in GET /v1/models, as vLLM lists it) are refused in prepare(). Rows with
        Mooncake `hash_ids` get prompts built of one shared block of words per id (llm_data.block_prompt),
        so requests that share cached prefix blocks in the trace share the same prompt prefix here."""
        self.sizes = list(zip(trace.input_tokens.tolist(), trace.output_tokens.tolist(), strict=True))
        self._trace = trace

    def _new_pool(self, timeout: float) -> StreamPool:
        context = self.target.ssl_context()
        pool = StreamPool(self._host, self._port, tls=context, connect_timeout=self.target.connect_timeout,
                          timeout=timeout, max_response_bytes=self.target.max_response_bytes)
        pool.first_byte_timeout = self.target.stream_first_byte_timeout
        pool.gap_timeout = self.target.stream_gap_timeout
        return pool

    # -- before the run -------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Request pool (nothing is sent before it is built), reachability and model check, warm-up.
        Raises a ScenarioError (bad dataset, prompt file or tokenizer) or a TargetError when the run
        cannot start."""
        self._counter = TokenCounter.load(self.target.tokenizer)
        self._keep_text = self._counter.exact
        self.rows = self._rows()
        bodies = self._bodies(self.rows)
        served = self._served_models()
        accept = "text/event-stream" if self.streamed else "application/json"
        headers = {"Content-Type": "application/json", "Accept": accept}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        headers.update(self.target.auth_headers())
        self.requests = [build_request("POST", self._netloc, self.path, body, headers) for body in bodies]
        warm_up(self, self.path, _TRUNCATION_KINDS, WARMUP_REQUESTS)
        self._next = 0
        self._cancel_rate = self.target.cancel_rate
        return {"name": self.target.model, "endpoint": self.path, "served_models": served,
                "requests_built": len(self.requests), "to_summary": self.summary_notes()}

    def summary_notes(self) -> dict[str, Any]:
        """What summary.json says of the requests: where token counts come from, the prompts' sizes."""
        counts: dict[str, str] = {"input": self._counter.source}
        if self.endpoint != "embeddings":
            if self.usage_seen:
                counts["output"] = "server usage"
            elif self._counter.exact:
                counts["output"] = "tokenizer"
            else:
                counts["output"] = "approximate (chunks)" if self.streamed else "approximate (words)"
        sizes = np.array(self.input_tokens or [0])
        notes: dict[str, Any] = {
            "token_counts": counts,
            "prompts": {"rows": len(self.rows), "stream": self.streamed,
                        "input_tokens": {"min": int(sizes.min()), "mean": round(float(sizes.mean()), 3),
                                         "max": int(sizes.max())}},
        }
        if self.dataset is not None:
            notes["prompts"]["dataset"] = self.dataset.describe()
        return notes

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
        entry = next(e for e in json.loads(response.body)["data"] if str(e["id"]) == self.target.model)
        self._check_context(entry.get("max_model_len") if isinstance(entry, dict) else None)
        return served

    def _check_context(self, max_model_len: Any) -> None:
        """A trace row whose prompt + output exceeds the context the server lists: an input error naming
        the trace's file and line (exit 2), before anything is sent."""
        if self._trace is None or not isinstance(max_model_len, int) or max_model_len <= 0:
            return
        too_long = [(k, row.input_tokens + (row.max_tokens or 0)) for k, row in enumerate(self.rows)
                    if row.input_tokens is not None and row.input_tokens + (row.max_tokens or 0) > max_model_len]
        if too_long:
            where = [f"{self._trace.path}:{int(self._trace.lines[k])}: {size} tokens (prompt + output)"
                     for k, size in too_long[:5]]
            more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
            raise ScenarioError([f"{line} is over the model's context of {max_model_len} tokens "
                                 f"(max_model_len of GET /v1/models)" for line in where]
                                + ([f"...{more}"] if more else []), "open_loop.trace")

    def _rows(self) -> list[Row]:
        """The pool's rows: the per-row sizes given, the dataset's entries, or synthetic sizes."""
        rng = np.random.default_rng(self.seed)
        target = self.target
        synthetic_eos = target.ignore_eos is not False and self.endpoint != "embeddings"
        if self.sizes is not None:
            count = len(self.sizes)  # a size a row lacks (-1: a trace without it) is drawn as for synthetic rows
            inputs = sample_counts(target.input_tokens or DEFAULT_INPUT_TOKENS, count, rng)
            outputs = sample_counts(target.max_tokens or DEFAULT_MAX_TOKENS, count, rng)
            return [self._sized_row(int(inp) if inp >= 0 else int(drawn_in),
                                    max(int(out), 1) if out >= 0 else int(drawn_out), synthetic_eos)
                    for (inp, out), drawn_in, drawn_out in zip(self.sizes, inputs, outputs, strict=True)]
        if target.prompt_file is not None or target.dataset is not None:
            return self._dataset_rows(rng)
        count = POOL_SIZE
        lengths = sample_counts(target.input_tokens or DEFAULT_INPUT_TOKENS, count, rng)
        if self.endpoint == "embeddings":
            return [Row(None, int(length)) for length in lengths]
        outputs = sample_counts(target.max_tokens or DEFAULT_MAX_TOKENS, count, rng)
        return [self._sized_row(int(length), int(n), synthetic_eos) for length, n in zip(lengths, outputs, strict=True)]

    def _sized_row(self, input_tokens: int, output_tokens: int, ignore_eos: bool) -> Row:
        if self.endpoint == "embeddings":
            return Row(None, input_tokens)
        return Row(None, input_tokens, output_tokens, {"ignore_eos": True} if ignore_eos else {})

    def _dataset_rows(self, rng: np.random.Generator) -> list[Row]:
        target = self.target
        if target.prompt_file is not None:  # the older form: JSONL lines in file order
            dataset = read_dataset(Path(target.prompt_file), "jsonl", self.endpoint, self._counter,
                                   where="target.prompt_file")
            order: Sequence[int] = range(len(dataset.prompts))
        else:
            assert target.dataset is not None
            dataset = read_dataset(Path(target.dataset), target.dataset_format, self.endpoint, self._counter)
            order = sample_rows(len(dataset.prompts), target.dataset_limit, rng)
        self.dataset = dataset
        if self.endpoint == "embeddings":
            return [Row(dataset.prompts[i]) for i in order]
        fallback = sample_counts(target.max_tokens or DEFAULT_MAX_TOKENS, len(order), rng)
        extras = {"ignore_eos": True} if target.ignore_eos else {}
        rows = []
        for i, drawn in zip(order, fallback, strict=True):
            own = dataset.output_tokens[i]
            if dataset.format == "sharegpt" and not target.dataset_output_tokens:
                own = None  # the reference answer's length only when asked for
            rows.append(Row(dataset.prompts[i], None, own if own is not None else int(drawn), extras))
        return rows

    def _bodies(self, rows: list[Row]) -> list[bytes]:
        rng = np.random.default_rng([self.seed, 1])
        bodies, self.input_tokens = [], []
        shared = self._trace.hash_ids if self._trace is not None and self.sizes is not None else None
        blocks: dict[int, list[str]] = {}
        for k, row in enumerate(rows):
            prompt: Prompt
            if row.prompt is None and shared is not None and shared[k]:
                prompt = block_prompt(shared[k], row.input_tokens or 1, self.seed, blocks)
            elif row.prompt is None:
                prompt = exact_prompt(self._counter, row.input_tokens or 1, rng)
            else:
                prompt = row.prompt
            self.input_tokens.append(self._counter.count_prompt(prompt))
            bodies.append(self._body(prompt, row))
        return bodies

    def _body(self, prompt: Prompt, row: Row) -> bytes:
        body: dict[str, Any] = {"model": self.target.model}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        elif self.endpoint == "completions":
            body["prompt"] = prompt
        else:
            body["input"] = prompt
        if row.max_tokens is not None:
            body["max_tokens"] = row.max_tokens
        if self.streamed:
            body.update(stream=True, stream_options={"include_usage": True})
        elif self.endpoint != "embeddings":
            body["stream"] = False
        body.update(row.extras)
        return json.dumps(body, separators=(",", ":")).encode()

    # -- the hot path ---------------------------------------------------------------------------
    def send(self, intended_t: float, row: int | None = None) -> StreamOutcome:
        """POST the next request of the pool (or row `row`, modulo the pool's length) and read its
        answer; errors come back as their kind."""
        requests = self.requests
        if row is None:
            request = requests[self._next]
            self._next = (self._next + 1) % len(requests)
        else:
            request = requests[row % len(requests)]
        return self._send(request, intended_t)

    def _send_stream(self, request: bytes, intended_t: float) -> StreamOutcome:
        sse = SseStream(self._keep_text, self.target.max_event_bytes)
        if self._cancel_rate and self._cancel_draws.random() < self._cancel_rate:
            sse.cancel = True
        sent_t = time.monotonic()
        try:
            response = self._pool.stream(request, sse, streamed=True)
        except StreamCancelled:  # the connection was closed, never to be reused
            return StreamOutcome(intended_t, sent_t, time.monotonic(), CANCELLED,
                                 "closed by the client after its first token (cancel_rate)", sse.body_bytes,
                                 sse.token_times, sse.chunk_tokens)
        except Exception as exc:  # noqa: BLE001 - mapped to an error kind, the run goes on
            return _failed(intended_t, sent_t, sse, exc)
        done_t = max(response.done_t, sent_t)
        if response.status != 200:
            return StreamOutcome(intended_t, sent_t, done_t, f"http_{response.status}",
                                 _error_text(response.body), len(response.body))
        error, message = _stream_error(sse, response)
        if sse.usage_tokens is not None:
            self.usage_seen = True
            tokens = sse.usage_tokens
        else:
            tokens = self._counter.count(sse.text) if self._keep_text else sse.chunk_tokens
        return StreamOutcome(intended_t, sent_t, done_t, error, message, sse.body_bytes, sse.token_times, tokens)

    def _send_whole(self, request: bytes, intended_t: float) -> StreamOutcome:
        """A non-streamed completion or an embedding: one JSON answer, no token timings."""
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
        error, message, tokens = self._read_answer(response)
        return StreamOutcome(intended_t, sent_t, done_t, error, message, len(response.body) + sse.body_bytes,
                             (), tokens)

    def _read_answer(self, response: Response) -> tuple[str | None, str, int]:
        """(error kind, message, output tokens) of a non-streamed answer."""
        if sse_typed(response):
            return "invalid_response", "an event stream answered a request with \"stream\": false", 0
        try:
            answer = json.loads(response.body)
        except (ValueError, RecursionError):
            return "invalid_response", f"answer is not JSON: {response.body[:80]!r}", 0
        if not isinstance(answer, dict):
            return "invalid_response", "answer is not a JSON object", 0
        if self.endpoint == "embeddings":
            problem = _embeddings_problem(answer)
            return ("invalid_response", problem, 0) if problem else (None, "", 0)
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return "invalid_response", "answer has no choices", 0
        usage = answer.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_seen = True
            return None, "", usage["completion_tokens"]
        choice = choices[0]
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        text = text if isinstance(text, str) else ""
        return None, "", self._counter.count(text)

    def close(self) -> None:
        self._pool.close()


def cancel_draws(seed: int) -> random.Random:
    """The generator that picks the streams to cancel: one `random()` draw per measured stream, in send
    order, the stream cancelled when the draw is below cancel_rate."""
    return random.Random(f"cancel-{seed}")


def sse_typed(response: Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def _embeddings_problem(answer: dict[str, Any]) -> str:
    data = answer.get("data")
    if not isinstance(data, list) or not data:
        return "embeddings answer has no data list"
    for index, item in enumerate(data):
        embedding = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(embedding, str) and embedding:  # encoding_format "base64"
            continue
        if not isinstance(embedding, list) or not embedding or not isinstance(embedding[0], (int, float)):
            return f"data[{index}] has no embedding (a non-empty list of numbers)"
    return ""


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
    except (ValueError, RecursionError):
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


def read_prompt_file(path: Path, endpoint: str) -> list[tuple[Prompt, int | None]]:
    """(prompt or messages, the line's own max_tokens or None) for each line of a JSONL prompt file.

    A line is {"prompt": "..."} or {"messages": [...]}, optionally with "max_tokens"; a chat endpoint
    sends a prompt as one user message, the completions endpoint takes prompts only. Blank lines are
    skipped. Every bad line is reported (ScenarioError, exit 2).
    """
    dataset = read_dataset(path, "jsonl", endpoint, TokenCounter(), where="target.prompt_file")
    return list(zip(dataset.prompts, dataset.output_tokens, strict=True))


PROTOCOL = ProtocolSpec(
    name="openai",
    options=OpenAITarget,
    client=OpenAIClient,
    streams=True,
    sized=True,
    flags=(
        Flag("endpoint", str | None, "chat (default), completions or embeddings.", key=("target", "endpoint")),
        Flag("max_tokens", str | None, 'Output tokens a request: 128, "uniform:8,32", "normal:128,16".',
             key=("target", "max_tokens")),
        Flag("input_tokens", str | None, "Tokens of a synthetic prompt (exact with --tokenizer, else words of "
             "~a token each), as --max-tokens.", key=("target", "input_tokens")),
        Flag("prompt_file", Path | None, 'JSONL prompts, {"prompt": ...} or {"messages": [...]} a line.',
             key=("target", "prompt_file"), to_scenario=as_path_text),
        Flag("dataset", Path | None, "Prompt dataset: ShareGPT JSON or JSONL, sampled and shuffled with the "
             "seed.", key=("target", "dataset"), to_scenario=as_path_text),
        Flag("dataset_format", str | None, "sharegpt or jsonl (default: told by the file's content).",
             key=("target", "dataset_format")),
        Flag("dataset_output_tokens", bool, "ShareGPT: each request's max_tokens is its reference answer's "
             "token count (as vLLM's benchmark).", key=("target", "dataset_output_tokens"), to_scenario=if_set,
             default=False, decls=("--dataset-output-tokens",)),
        Flag("dataset_limit", int | None, "Keep at most N dataset entries (a seeded sample).",
             key=("target", "dataset_limit")),
        Flag("tokenizer", Path | None, "Hugging Face tokenizer.json: exact prompt token counts, and output "
             "counts when the server gives no usage.", key=("target", "tokenizer"), to_scenario=as_path_text),
        Flag("no_stream", bool, "Non-streamed answers: latency and usage tokens, no TTFT/ITL.",
             key=("target", "stream"), to_scenario=lambda value: False if value else None, default=False,
             decls=("--no-stream",)),
        Flag("ignore_eos", bool | None, 'Send "ignore_eos": true with max_tokens (vLLM; default: synthetic '
             "prompts yes, datasets no).", key=("target", "ignore_eos"), decls=("--ignore-eos/--no-ignore-eos",)),
        Flag("cancel_rate", float | None, "Share (0..1) of streams closed by the client after their first "
             "token, counted as cancelled (seeded).", key=("target", "cancel_rate")),
        Flag("stream_first_byte_timeout", str | None, "A stream's first byte within this, e.g. 30s (default: "
             "--timeout).", key=("target", "stream_first_byte_timeout")),
        Flag("stream_gap_timeout", str | None, "Longest silence inside a stream, e.g. 10s (default: --timeout).",
             key=("target", "stream_gap_timeout")),
    ),
    summary="OpenAI-compatible completions, streamed or not, and embeddings (LLM servers)",
)
