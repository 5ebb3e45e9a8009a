"""HTTP connections of the TorchServe-compatible server: servers/core's parser and connection base, with
TorchServe's framing rules.

Per connection: bytes -> RequestParser -> the API's `handle` (inference, management or metrics) -> a
Reply at once, or a coroutine on the loop (predictions wait for a worker; registration for workers to
load). Replies leave in request order, also when pipelined. A coroutine may also stream: it pushes
bytes through the `send` callable it is given (a chunked prediction, PROTOCOLS.md 5.11) and finally
returns STREAMED.

Framing as Netty's in TorchServe: a body larger than `max_request_size` (6553500 bytes by default) is
answered `413 Request Entity Too Large` with an empty body and the connection closed; a POST or PUT
without Content-Length has an empty body (curl -X POST sends none); other framing errors are 400
BadRequestException "Invalid HTTP message.". Every error reply closes the connection.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from servers.core.connection import Connections, HttpConnection, HttpOptions, refusal_reason
from servers.core.http1 import HttpError, Request, RequestParser, continue_response
from servers.torchserve._wire import Reply, TsError, error_reply, format_reply

__all__ = ["STREAMED", "Api", "FrontEnd", "close_server", "listen"]

STREAMED = object()
"""What a coroutine returns once it has written its whole reply through `send` itself."""

_TOO_LARGE = b"HTTP/1.1 413 Request Entity Too Large\r\ncontent-length: 0\r\n\r\n"
_BAD_MESSAGE = TsError(400, "BadRequestException", "Invalid HTTP message.")

Send = Callable[[bytes], None]


class Api(Protocol):
    """One API's routes: a Reply, or a coroutine whose result is a Reply (or STREAMED)."""

    def handle(self, request: Request, send: Send) -> Reply | Awaitable[Any]: ...


@dataclass
class FrontEnd:
    """What the connections of one listening port share."""

    api: Api
    max_request_size: int = 6553500
    count: Callable[[int], None] = lambda status: None
    """Hears the status of every reply (the Requests2XX/4XX/5XX metrics)."""
    max_connections: int | None = None
    """The most connections open at once (None: no cap); beyond it 503 in TorchServe's error shape."""
    connections: set[TsConnection] = field(init=False)

    def __post_init__(self) -> None:
        reason = refusal_reason(self.max_connections)
        refusal = format_reply(error_reply(TsError(503, "ServiceUnavailableException", reason[0].upper() + reason[1:])),
                               keep_alive=False)
        self.connections = Connections(HttpOptions(max_connections=self.max_connections, refusal=refusal))


@dataclass
class _Parser(RequestParser):
    """servers/core's parser with TorchServe's limits: max_request_size, and no length = empty body."""

    max_body: int = 6553500

    def _parse_head(self) -> Any:
        end = self._buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(self._buffer[:end]).lower()
            if b"\ncontent-length:" not in head and b"\ntransfer-encoding:" not in head:
                self._buffer[end:end] = b"\r\nContent-Length: 0"
        parsed = super()._parse_head()
        if parsed is not None and parsed.body_length > self.max_body:
            raise HttpError(413, "request body too large")
        return parsed


class _Slot:
    """One reply in a connection's queue: bytes ready to write, whether it is complete, and whether the
    connection closes after it."""

    __slots__ = ("close", "data", "done")

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.done = False
        self.close = False


class TsConnection(HttpConnection):
    """One HTTP/1.1 connection: keep-alive, pipelining, replies in order, errors close."""

    def __init__(self, front: FrontEnd) -> None:
        super().__init__(front.connections)
        self._front = front
        self._parser = _Parser(max_body=front.max_request_size)

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return
        parser = self._parser
        parser.feed(data)
        try:
            while self._reading and (request := parser.next_request()) is not None:
                self._handle(request)
        except HttpError as exc:
            self._reading = False
            slot = _Slot()
            self._pending.append(slot)
            if exc.status == 413:
                self._front.count(413)
                self._complete(slot, _TOO_LARGE, close=True)
            else:
                self._complete_reply(slot, error_reply(_BAD_MESSAGE), keep_alive=False)
            return
        if self._reading and not self._pending and parser.continue_due():
            self._transport.write(continue_response())

    def _handle(self, request: Request) -> None:
        keep_alive = request.keep_alive
        if not keep_alive:
            self._reading = False
        slot = _Slot()
        self._pending.append(slot)
        try:
            outcome = self._front.api.handle(request, lambda data: self._push(slot, data))
        except TsError as exc:
            outcome = error_reply(exc)
        except Exception as exc:  # noqa: BLE001 - a bug in a route answers 500, never kills the connection
            outcome = error_reply(TsError(500, "InternalServerException", f"{type(exc).__name__}: {exc}"))
        if not inspect.isawaitable(outcome):
            self._complete_reply(slot, outcome, keep_alive)
            return
        future = asyncio.ensure_future(outcome)
        future.add_done_callback(lambda done: self._finish(slot, done, keep_alive))

    def _finish(self, slot: _Slot, done: asyncio.Future, keep_alive: bool) -> None:
        if done.cancelled():
            reply: Any = error_reply(TsError(503, "ServiceUnavailableException", "Server is shutting down"))
        elif isinstance(done.exception(), TsError):
            reply = error_reply(done.exception())
        elif done.exception() is not None:
            error = done.exception()
            reply = error_reply(TsError(500, "InternalServerException", f"{type(error).__name__}: {error}"))
        else:
            reply = done.result()
        if reply is STREAMED:
            self._complete(slot, b"", close=not keep_alive)
        else:
            self._complete_reply(slot, reply, keep_alive)

    def _complete_reply(self, slot: _Slot, reply: Reply, keep_alive: bool) -> None:
        self._front.count(reply.status)
        self._complete(slot, format_reply(reply, keep_alive), close=reply.close or not keep_alive)

    def _push(self, slot: _Slot, data: bytes) -> None:
        """Part of a streamed reply: written at once when this reply is the oldest one pending."""
        slot.data.append(data)
        self._flush()

    def _complete(self, slot: _Slot, data: bytes, close: bool) -> None:
        if data:
            slot.data.append(data)
        slot.done = True
        slot.close = close
        self._flush()

    def _flush(self) -> None:
        pending = self._pending
        while pending:
            slot = pending[0]
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            if slot.data:
                transport.write(b"".join(slot.data))
                slot.data.clear()
            if not slot.done:
                return
            pending.popleft()
            if slot.close:
                self._pending.clear()
                self._close(transport)
                return
        if self._peer_eof and self._transport is not None:
            self._transport.close()


async def listen(front: FrontEnd, host: str, port: int) -> asyncio.Server:
    """Start accepting connections of one API on host:port (0 = a free port)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: TsConnection(front), host, port, reuse_address=True, backlog=1024)


async def close_server(server: asyncio.Server, front: FrontEnd) -> None:
    """Stop accepting, drop every open connection, and wait until the listener is gone."""
    server.close()
    for connection in list(front.connections):
        connection.abort()
    await server.wait_closed()
