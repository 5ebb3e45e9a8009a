"""The error tree of loadgen, and the exit codes the CLI returns for run-level failures.

    LoadgenError (exit 2 unless stated)
    +-- ScenarioError        a scenario file or flag that cannot run (each bad key named)
    +-- TargetError          the target cannot be used
    |   +-- TargetUnreachable    nothing answers at the URL within the connect timeout
    |   +-- TargetNotReady       it answers, but the server or the model is not ready
    |   +-- ProtocolMismatch     it answers, but not as the protocol says (metadata, status)

Per-request failures are never raised to the run: a protocol client maps its library's
exceptions, once, at the boundary (`classify_exception`), into an error kind string that goes
into the Outcome: "connect", "timeout", "connection_closed", "http_<status>", "invalid_response",
"response_too_large", "event_too_large", "transport". A raise that escapes a client's send anyway (a bug
the mapping missed: a malformed gRPC status, a RecursionError in an error body) is counted as
"client_error:<exception type>" at the run's boundary (loadgen/protocols/base.py `guarded_send`).
"""

from __future__ import annotations

import re
import socket
import ssl

__all__ = [
    "ConnectionClosed",
    "EventTooLarge",
    "InvalidResponse",
    "LoadgenError",
    "ProtocolMismatch",
    "ResponseTooLarge",
    "ScenarioError",
    "TargetError",
    "TargetNotReady",
    "TargetUnreachable",
    "classify_exception",
    "redact_url",
]

_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]+@")


def redact_url(text: str) -> str:
    """`text` with the user:password of every URL in it replaced by *** (a target URL may carry
    credentials; they are never printed or written to results).

    >>> redact_url("cannot reach http://ann:s3cret@host:8000/v2 (connect)")
    'cannot reach http://***@host:8000/v2 (connect)'
    """
    return _USERINFO.sub(r"\1***@", text) if "@" in text else text


class LoadgenError(Exception):
    """A run-level failure: the CLI prints the message (no traceback) and exits with exit_code."""

    exit_code = 2


class ScenarioError(LoadgenError, ValueError):
    """A scenario that cannot run; `problems` lists each bad key (or flag) with what is wrong with it."""

    def __init__(self, problems: list[str], source: str = "scenario") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class TargetError(LoadgenError):
    pass


class TargetUnreachable(TargetError):
    pass


class TargetNotReady(TargetError):
    pass


class ProtocolMismatch(TargetError):
    pass


class InvalidResponse(Exception):
    """Bytes from the server that are not a response of the protocol (kind "invalid_response")."""


class ConnectionClosed(ConnectionError):
    """EOF where a response, or the rest of one, was expected (kind "connection_closed")."""


class ResponseTooLarge(Exception):
    """An answer past --max-response-bytes: cut off, its connection closed (kind "response_too_large")."""


class EventTooLarge(ResponseTooLarge):
    """A server-sent event that grew past its limit without ending (kind "event_too_large")."""


def classify_exception(exc: BaseException) -> str:
    """The error kind of a transport exception (the one place foreign errors are mapped)."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError | socket.gaierror):
        return "connect"
    if isinstance(exc, (ConnectionClosed, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "connection_closed"
    if isinstance(exc, ResponseTooLarge):
        return "event_too_large" if isinstance(exc, EventTooLarge) else "response_too_large"
    if isinstance(exc, InvalidResponse):
        return "invalid_response"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    return "transport"
