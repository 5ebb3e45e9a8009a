"""HTTP/1.1 framing for the reference servers: split a byte stream into requests, format responses.

Shared by the calibration and Triton-compatible servers (servers/calibration, servers/triton).
Only what a KServe v2 client needs, kept lean because a server must answer well over 8,000 small
requests a second on one core: request line + headers, bodies framed by Content-Length (up to
64 MiB, as Triton's --http-max-input-size), keep-alive by HTTP version and the Connection header.
POSTs without a length are refused (the server has to know where a request ends to time it), and
chunked bodies too unless the parser accepts them (`accepts_chunked`: Triton's does, as Triton; the
request is complete, and timed, when its last chunk has come). A framing error is fatal to the connection: the stream can no longer be split. A body
over the limit is refused from its head alone, 413 here (a server answers its own status by
overriding RequestParser.too_large: Triton's is 400). The parser counts the bytes it is fed and the requests it
completed, and says whether it holds part of a request (`partial`), so a connection can drop a client that stalls
mid-request (servers/core/connection.py).
"""

from __future__ import annotations

import json
import json.encoder
import re
from dataclasses import dataclass, field

__all__ = [
    "MAX_BODY_BYTES", "MAX_HEAD_BYTES", "REASONS", "HttpError", "Request", "RequestParser",
    "continue_response", "format_response", "json_body", "json_text",
]

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024
_HEAD_END = b"\r\n\r\n"
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
CHUNKED = -1
"""`_Head.body_length` of a chunked body: framed by its chunks, not by a length."""
"""A method is an HTTP token (RFC 9110 5.6.2)."""

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """A request the stream cannot carry on from: answer `status` with `message`, then close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Request:
    """One parsed request; header names are lower-case."""

    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes = b""
    keep_alive: bool = True

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.partition("?")[0]


@dataclass(slots=True)
class _Head:
    request: Request
    body_length: int
    continued: bool = False
    chunk_left: int | None = None  # chunked: bytes of the current chunk to come; None: a size line next
    trailers: bool = False  # chunked: the last chunk came; trailer lines until an empty one
    decoded: bytearray = field(default_factory=bytearray)  # chunked: the body so far


@dataclass
class RequestParser:
    """Incremental parser: `feed` bytes as they come, then take complete requests with `next_request`."""

    _buffer: bytearray = field(default_factory=bytearray)
    _head: _Head | None = None
    received: int = 0
    """Bytes fed so far: a connection that sees it unchanged knows no byte came in between."""
    completed: int = 0
    """Requests taken so far: a connection that sees it unchanged while `partial` knows the request
    it holds part of is the one it saw before."""
    accepts_chunked = False
    """Whether `Transfer-Encoding: chunked` bodies are taken (else 411)."""

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self.received += len(data)

    def partial(self) -> bool:
        """True while part of a request (head or body) is buffered and the rest has not come."""
        return self._head is not None or bool(self._buffer)

    def too_large(self, length: int) -> HttpError:
        """The error for a declared body over MAX_BODY_BYTES; the connection answers it and closes."""
        return HttpError(413, f"request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}")

    def next_request(self) -> Request | None:
        """The next complete request, or None until more bytes arrive; raises HttpError."""
        if self._head is None:
            self._head = self._parse_head()
            if self._head is None:
                return None
        length = self._head.body_length
        if length == CHUNKED:
            body = self._read_chunks(self._head)
            if body is None:
                return None
            request, self._head = self._head.request, None
            request.body = body
            self.completed += 1
            return request
        if len(self._buffer) < length:
            return None
        request = self._head.request
        if length:
            request.body = bytes(self._buffer[:length])
            del self._buffer[:length]
        self._head = None
        self.completed += 1
        return request

    def _read_chunks(self, head: _Head) -> bytes | None:
        """Decode the chunks buffered so far; the whole body once the last chunk and the trailers came."""
        buffer = self._buffer
        while True:
            if head.chunk_left is None or head.trailers:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise HttpError(400, "chunk size or trailer line too long")
                    return None
                line = bytes(buffer[:end])
                del buffer[:end + 2]
                if head.trailers:
                    if not line:
                        return bytes(head.decoded)
                    continue  # a trailer field: not used
                size = _CHUNK_SIZE.fullmatch(line.split(b";", 1)[0].strip())
                if size is None:
                    raise HttpError(400, f"malformed chunk size line: {line[:40]!r}")
                head.chunk_left = int(size.group(), 16)
                if head.chunk_left == 0:
                    head.trailers = True
                    continue
                if len(head.decoded) + head.chunk_left > MAX_BODY_BYTES:
                    raise self.too_large(len(head.decoded) + head.chunk_left)
            size = head.chunk_left
            if len(buffer) < size + 2:
                return None
            if buffer[size:size + 2] != b"\r\n":
                raise HttpError(400, "chunk data not followed by CRLF")
            head.decoded += buffer[:size]
            del buffer[:size + 2]
            head.chunk_left = None

    def continue_due(self) -> bool:
        """True once for a head that asked for `100-continue` and waits for its body: answer it now."""
        head = self._head
        if head is None or head.continued or head.request.headers.get("expect", "").lower() != "100-continue":
            return False
        head.continued = True
        return True

    def _parse_head(self) -> _Head | None:
        buffer = self._buffer
        end = buffer.find(_HEAD_END)
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise HttpError(431, f"request head longer than {MAX_HEAD_BYTES} bytes")
            _check_start(buffer)
            return None
        if end > MAX_HEAD_BYTES:
            raise HttpError(431, f"request head longer than {MAX_HEAD_BYTES} bytes")
        try:
            text = buffer[:end].decode("latin-1")
        finally:
            del buffer[: end + len(_HEAD_END)]
        request = _parse_lines(text.lstrip("\r\n").split("\r\n"))
        length = _body_length(request, self.accepts_chunked)
        if length > MAX_BODY_BYTES:
            raise self.too_large(length)
        return _Head(request, length)


def _check_start(buffer: bytearray) -> None:
    """Refuse at once a head that can no longer become a request, rather than wait for its end: bytes
    that are not a method before the first space (binary garbage, a TLS hello), or a complete first
    line that is not a request line. Without this, garbage without CRLFCRLF is only dropped at EOF."""
    start = 0
    while start < len(buffer) and buffer[start] in b"\r\n":
        start += 1
    method_end = _METHOD.match(buffer, start).end()
    if method_end < len(buffer) and (buffer[method_end] != 0x20 or method_end == start):
        line = bytes(buffer[start:start + 200]).partition(b"\r\n")[0].decode("latin-1")
        raise HttpError(400, f"malformed request line: {line!r}")
    line_end = buffer.find(b"\r\n", start)
    if line_end >= 0:
        _parse_lines([buffer[start:line_end].decode("latin-1")])


def _parse_lines(lines: list[str]) -> Request:
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1].startswith("/"):
        raise HttpError(400, f"malformed request line: {lines[0][:200]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"unsupported HTTP version: {version[:20]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name[-1] in " \t":
            raise HttpError(400, f"malformed header line: {line[:200]!r}")
        name = name.lower()
        value = value.strip()
        if name in headers and name == "content-length" and headers[name] != value:
            raise HttpError(400, "conflicting Content-Length headers")
        headers[name] = value
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    return Request(method, target, version, headers, keep_alive=keep_alive)


def _body_length(request: Request, accepts_chunked: bool = False) -> int:
    headers = request.headers
    if "transfer-encoding" in headers:
        if not accepts_chunked:
            raise HttpError(411, "Transfer-Encoding is not supported; send the body with a Content-Length")
        if headers["transfer-encoding"].lower() != "chunked":
            raise HttpError(501, f"Transfer-Encoding {headers['transfer-encoding'][:40]!r} is not supported "
                                 "(only chunked)")
        if "content-length" in headers:  # RFC 9112 6.3: ambiguous framing, refused
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        return CHUNKED
    raw = headers.get("content-length")
    if raw is None:
        if request.method == "POST":
            raise HttpError(411, "POST needs a Content-Length header")
        return 0
    if not raw.isdigit() or not raw.isascii():
        raise HttpError(400, f"invalid Content-Length: {raw[:40]!r}")
    return int(raw)


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def continue_response() -> bytes:
    """The interim answer to `Expect: 100-continue`."""
    return _CONTINUE


def json_body(obj: object) -> bytes:
    """Compact JSON bytes, as both servers answer (errors are json_body({"error": message}))."""
    return json_text(obj).encode()


def json_text(obj: object) -> str:
    """Compact JSON text (ASCII): json.dumps(obj, separators=(",", ":")).

    Written by the json module's C encoder made once: json.dumps with separators builds a
    JSONEncoder and its encoder on every call, which took 7 us of a 2 us job on the development
    machine. Without a circular-reference check (the servers' answers are trees); without the C
    encoder, json.dumps itself."""
    if _COMPACT is None:
        return json.dumps(obj, separators=(",", ":"))
    return "".join(_COMPACT(obj, 0))


_COMPACT = None if json.encoder.c_make_encoder is None else json.encoder.c_make_encoder(
    None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False,
    True)
"""The C encoder of JSONEncoder(separators=(",", ":")): (markers, default, encoder, indent, key
separator, item separator, sort_keys, skipkeys, allow_nan), as JSONEncoder.iterencode makes it."""


def format_response(status: int, body: bytes, content_type: str = "application/json", *,
                    keep_alive: bool = True, http10: bool = False, extra_headers: str = "") -> bytes:
    """A complete HTTP/1.1 response; an empty body is sent without a Content-Type.

    `extra_headers` is written as given: complete lines, each ending in CRLF.
    """
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"]
    if body:
        head.append(f"Content-Type: {content_type}\r\n")
    if extra_headers:
        head.append(extra_headers)
    head.append(f"Content-Length: {len(body)}\r\n")
    if not keep_alive:
        head.append("Connection: close\r\n")
    elif http10:
        head.append("Connection: keep-alive\r\n")
    head.append("\r\n")
    return "".join(head).encode("latin-1") + body
