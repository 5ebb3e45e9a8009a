"""The connection lifecycle both reference servers share: an asyncio.Protocol over servers/core/http1.py.

A subclass turns parsed requests into replies (`data_received`) and keeps them in request order in
`self._pending`; this base tracks the transport, registers the connection in the server's set (so a
stopping server can drop them all), relays write back-pressure to reading, answers the peer's EOF,
and closes after a fatal error with a linger: the client's remaining bytes are drained for
LINGER_S before the connection is dropped, because closing with unread bytes sends a reset that
can destroy the error answer at the client.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

from servers.core.http1 import RequestParser

__all__ = ["LINGER_S", "HttpConnection"]

LINGER_S = 2.0
"""After a fatal error, how long the connection keeps draining the client's bytes before it is dropped."""


class HttpConnection(asyncio.Protocol):
    """Keep-alive HTTP/1.1 connection state; `connections` is the server's set of open ones."""

    def __init__(self, connections: set[Any]) -> None:
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._parser = RequestParser()
        self._pending: deque[Any] = deque()
        self._reading = True  # False once no further request will be read on this connection
        self._peer_eof = False
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._pending.clear()
        self._connections.discard(self)
        if self._linger is not None:
            self._linger.cancel()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
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
