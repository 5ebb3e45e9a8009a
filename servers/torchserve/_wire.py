"""What the TorchServe-compatible server writes on the wire: its JSON, its errors, its HTTP responses.

TorchServe's front end is Java: bodies are Gson's pretty printing (two-space indent, `": "`, a final
newline on HTTP, HTML-sensitive characters escaped as \\u003c and so on), every error is
`{"code", "type", "message"}` where type is the Java exception's class name, and every response
carries the same cache headers and a fresh `x-request-id` (../shared/torchserve-captures, PROTOCOLS.md
5.4). An error always closes the connection (`connection: close`); a prediction answers with the
status and reason phrase its handler set (by default 200 and an empty phrase) and no content type
unless the handler chose one.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, ClassVar, NamedTuple

__all__ = [
    "METHOD_NOT_ALLOWED", "NOT_FOUND", "Reply", "TsError", "chunk", "chunked_head", "error_reply",
    "format_reply", "gson", "json_reply", "reason_phrase",
]

_GSON_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "=": "\\u003d",
                               "'": "\\u0027", "\u2028": "\\u2028", "\u2029": "\\u2029"})

_REASONS = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 206: "Partial Content",
    210: "Partial Success", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Request Entity Too Large",
    415: "Unsupported Media Type", 429: "Too Many Requests", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
    507: "Insufficient Storage",
}
"""Netty's reason phrases (HttpResponseStatus.valueOf)."""

_CACHE_HEADERS = ("Pragma: no-cache\r\nCache-Control: no-cache; no-store, must-revalidate, private\r\n"
                  "Expires: Thu, 01 Jan 1970 00:00:00 UTC\r\n")


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown Status")


def gson(obj: Any) -> str:
    """`obj` as Gson's pretty printer writes it (no final newline)."""
    return json.dumps(obj, indent=2, ensure_ascii=False).translate(_GSON_ESCAPES)


class TsError(Exception):
    """A refusal TorchServe answers as {"code", "type", "message"}: HTTP status, exception class, text.

    `java_class` is the canonical class name TorchServe's gRPC front end appends to the description.
    """

    _PACKAGES: ClassVar[dict[str, str]] = {
        "ModelNotFoundException": "org.pytorch.serve.archive.model",
        "ModelVersionNotFoundException": "org.pytorch.serve.archive.model",
        "InvalidModelException": "org.pytorch.serve.archive.model",
        "InvalidKeyException": "org.pytorch.serve.archive.model",
        "DownloadArchiveException": "org.pytorch.serve.archive",
    }

    def __init__(self, code: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.type = type_
        self.message = message

    @property
    def java_class(self) -> str:
        return f"{self._PACKAGES.get(self.type, 'org.pytorch.serve.http')}.{self.type}"

    def grpc_details(self) -> str:
        """The description TorchServe's gRPC front end sends: the message, then the class name."""
        return f"{self.message}\n{self.java_class}"


NOT_FOUND = TsError(404, "ResourceNotFoundException",
                    "Requested resource is not found, please refer to API document.")
METHOD_NOT_ALLOWED = TsError(405, "MethodNotAllowedException",
                             "Requested method is not allowed, please refer to API document.")


class Reply(NamedTuple):
    """One HTTP answer. `reason` None = Netty's phrase for the status; `headers` are (name, value)."""

    status: int
    body: bytes
    content_type: str | None = "application/json"
    reason: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False
    request_id: str | None = None
    """The x-request-id (the id the handler saw for a prediction); None = a fresh one."""


def json_reply(obj: Any, status: int = 200, reason: str | None = None) -> Reply:
    """A JSON body as TorchServe's front end sends it: Gson-pretty with a final newline."""
    return Reply(status, (gson(obj) + "\n").encode(), reason=reason)


def error_reply(error: TsError) -> Reply:
    body = {"code": error.code, "type": error.type, "message": error.message}
    return Reply(error.code, (gson(body) + "\n").encode(), close=True)


def format_reply(reply: Reply, keep_alive: bool = True) -> bytes:
    """The bytes of `reply`: TorchServe's headers, in its order; errors close the connection."""
    reason = reason_phrase(reply.status) if reply.reason is None else reply.reason
    head = [f"HTTP/1.1 {reply.status} {reason}\r\n"]
    if reply.content_type:
        head.append(f"content-type: {reply.content_type}\r\n")
    for name, value in reply.headers:
        head.append(f"{name}: {value}\r\n")
    head.append(f"x-request-id: {reply.request_id or uuid.uuid4()}\r\n")
    head.append(_CACHE_HEADERS)
    head.append(f"content-length: {len(reply.body)}\r\n")
    closing = reply.close or not keep_alive
    head.append("connection: close\r\n\r\n" if closing else "connection: keep-alive\r\n\r\n")
    return "".join(head).encode("latin-1") + reply.body


def chunked_head(status: int, reason: str, content_type: str | None, headers: tuple[tuple[str, str], ...],
                 request_id: str) -> bytes:
    """The head of a streamed prediction (handler parts sent as they come, PROTOCOLS.md 5.11)."""
    head = [f"HTTP/1.1 {status} {reason}\r\n"]
    if content_type:
        head.append(f"content-type: {content_type}\r\n")
    for name, value in headers:
        head.append(f"{name}: {value}\r\n")
    head.append(f"x-request-id: {request_id}\r\n")
    head.append(_CACHE_HEADERS)
    head.append("transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n")
    return "".join(head).encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty data ends the body."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n"
