"""The connection lifecycle both reference servers share: an asyncio.Protocol over servers/core/http1.py.

A subclass turns parsed requests into replies (`data_received`) and keeps them in request order in
`self._pending`; this base tracks the transport, registers the connection in the server's set (so a
stopping server can drop them all), relays write back-pressure to reading, answers the peer's EOF,
and closes after a fatal error with a linger: the client's remaining bytes are drained for
LINGER_S before the connection is dropped, because closing with unread bytes sends a reset that
can destroy the error answer at the client.

A client that stops sending in the middle of a request (a head without its end, or part of a body)
would otherwise hold its connection, and the buffered bytes, for ever: a connection that holds part
of a request and has read no byte for the read timeout (HttpOptions.read_timeout_s, READ_TIMEOUT_S
by default) is closed. It is watched by one timer per connection that fires every quarter of the
timeout and compares the parser's byte count with the last one it saw, so the request path itself
does no timing work; the close comes between the timeout and 1.25 times it after the last byte. A
connection waiting for its own replies, or paused by write back-pressure, is not idle. Between
requests a kept-alive connection may stay idle as long as the client likes (load generators keep
their connections).

The per-server options (read timeout, which parser) come with the server's set of connections: a
Connections carries them, a plain set gets the defaults.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from servers.core.http1 import RequestParser

__all__ = ["LINGER_S", "READ_TIMEOUT_S", "Connections", "HttpConnection", "HttpOptions"]

LINGER_S = 2.0
"""After a fatal error, how long the connection keeps draining the client's bytes before it is dropped."""
READ_TIMEOUT_S = 60.0
"""How long a connection holding part of a request waits for its next byte before it is closed."""


@dataclass(frozen=True)
class HttpOptions:
    """What every connection of one server is configured with."""

    read_timeout_s: float | None = READ_TIMEOUT_S
    """None: no read timeout."""
    parser: Callable[[], RequestParser] = RequestParser


class Connections(set):
    """A server's set of open connections, carrying the options its connections are made with."""

    def __init__(self, options: HttpOptions | None = None) -> None:
        super().__init__()
        self.options = options or HttpOptions()


_DEFAULT_OPTIONS = HttpOptions()


class HttpConnection(asyncio.Protocol):
    """Keep-alive HTTP/1.1 connection state; `connections` is the server's set of open ones."""

    def __init__(self, connections: set[Any]) -> None:
        self._connections = connections
        self._options: HttpOptions = getattr(connections, "options", _DEFAULT_OPTIONS)
        self._transport: asyncio.Transport | None = None
        self._parser = self._options.parser()
        self._pending: deque[Any] = deque()
        self._reading = True  # False once no further request will be read on this connection
        self._peer_eof = False
        self._linger: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._paused = False  # reading paused by write back-pressure
        self._seen = -1  # the parser's byte count at the last check
        self._quiet_since = 0.0  # loop time since which the connection has read nothing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self._connections.add(self)
        if self._options.read_timeout_s is not None:
            self._watch = asyncio.get_running_loop().call_later(self._options.read_timeout_s / 4, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._pending.clear()
        self._connections.discard(self)
        if self._linger is not None:
            self._linger.cancel()
        if self._watch is not None:
            self._watch.cancel()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._paused = False
            self._transport.resume_reading()  # even when no longer reading requests: keep draining

    def eof_received(self) -> bool:
        self._peer_eof = True
        self._reading = False
        return bool(self._pending)  # True keeps the socket open to write the replies still pending

    def _close(self, transport: asyncio.Transport) -> None:
        """Close after the reply just written: at once if the peer is gone, else half-close and linger."""
        if self._peer_eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._linger = asyncio.get_running_loop().call_later(LINGER_S, transport.abort)

    def _check_idle(self) -> None:
        """The read-timeout watch: close a connection stalled mid-request, then look again later."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        timeout = cast(float, self._options.read_timeout_s)
        now = loop.time()
        received = self._parser.received
        if received != self._seen or self._pending or self._paused or not self._reading:
            self._seen = received
            self._quiet_since = now
        elif self._parser.partial() and now - self._quiet_since >= timeout * 0.999:
            transport.close()  # a stalled request gets no answer: there is no request to answer yet
            return
        self._watch = loop.call_later(timeout / 4, self._check_idle)
