"""Connections of the Triton-compatible server: an asyncio.Protocol over servers/core/http1.py.

Per connection: bytes -> RequestParser -> TritonApp (_app.py) -> a reply written at once, a job
run in the worker pool for built-in models that do not run inline, a Deferred settled on the loop
(repository models waiting for their scheduler), or a coroutine run on the loop (model loads).
Replies leave in request order even when requests are pipelined: a reply waits behind any earlier
one still computing. A framing error is answered after the replies already queued, then the
connection is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from servers.core.connection import HttpConnection
from servers.core.http1 import HttpError, Request, continue_response, format_response
from servers.triton._app import Deferred, Job, Pending, Reply, error_reply
from servers.triton._app import connections as triton_connections


class App(Protocol):
    """What a connection asks for each request: TritonApp (_app.py), or the metrics page (_metrics.py)."""

    def handle(self, request: Request) -> Reply | Job | Pending: ...


@dataclass
class ServerContext:
    """What every connection of one server shares."""

    app: App
    executor: Executor
    connections: set[TritonProtocol] = field(default_factory=triton_connections)
    """Its open connections, carrying Triton's parser and read timeout (`_app.connections`)."""


class _Slot:
    """One reply in a connection's queue; `data` is None until its job finishes."""

    __slots__ = ("close", "data")

    def __init__(self, data: bytes | None, close: bool) -> None:
        self.data = data
        self.close = close


class TritonProtocol(HttpConnection):
    """One HTTP/1.1 connection: keep-alive, pipelining, replies in order, Connection: close honoured."""

    def __init__(self, context: ServerContext) -> None:
        super().__init__(context.connections)
        self._context = context
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._loop = asyncio.get_running_loop()  # once: it reads the process id on every call

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
            self._queue(_Slot(_format(error_reply(exc.status, exc.message), False, False), True))
            return
        if self._reading and not self._pending and parser.continue_due():
            self._transport.write(continue_response())

    def _handle(self, request: Request) -> None:
        keep_alive = request.keep_alive
        http10 = request.version == "HTTP/1.0"
        if not keep_alive:
            self._reading = False
        try:
            outcome = self._context.app.handle(request)
        except Exception as exc:  # noqa: BLE001 - a bug in a route answers 500, never crashes
            outcome = error_reply(500, f"internal error: {type(exc).__name__}: {exc}")
        if isinstance(outcome, Reply):
            self._queue(_Slot(_format(outcome, keep_alive, http10), not keep_alive))
            return
        slot = _Slot(None, not keep_alive)
        self._pending.append(slot)
        if isinstance(outcome, Deferred):
            outcome.then(lambda reply: self._fill(slot, reply, keep_alive, http10))
            return
        if callable(outcome):
            future = self._loop.run_in_executor(self._context.executor, outcome)
        else:
            future = self._loop.create_task(outcome)
        future.add_done_callback(lambda done: self._finish(slot, done, keep_alive, http10))

    def _finish(self, slot: _Slot, done: asyncio.Future[Reply], keep_alive: bool, http10: bool) -> None:
        if done.cancelled():
            reply = error_reply(503, "server is shutting down")
        elif done.exception() is not None:
            reply = error_reply(500, f"internal error: {done.exception()}")
        else:
            reply = done.result()
        self._fill(slot, reply, keep_alive, http10)

    def _fill(self, slot: _Slot, reply: Reply, keep_alive: bool, http10: bool) -> None:
        slot.data = _format(reply, keep_alive, http10)
        self._flush()

    def _queue(self, slot: _Slot) -> None:
        self._pending.append(slot)
        self._flush()

    def _flush(self) -> None:
        pending = self._pending
        while pending and pending[0].data is not None:
            slot = pending.popleft()
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            transport.write(slot.data)
            if slot.close:
                self._close(transport)
                return
        if self._peer_eof and not pending and self._transport is not None:
            self._transport.close()

    def _close(self, transport: asyncio.Transport) -> None:
        self._pending.clear()  # nothing after a closing reply is written
        super()._close(transport)


def _format(reply: Reply, keep_alive: bool, http10: bool) -> bytes:
    return format_response(reply.status, reply.body, reply.content_type, keep_alive=keep_alive,
                           http10=http10, extra_headers=reply.headers)


async def run_server(context: ServerContext, host: str, port: int, stop: asyncio.Event,
                     ready_callback: Callable[[str, int], None] | None = None) -> None:
    """Listen on host:port until `stop` is set, then drop every connection and return.

    `ready_callback(host, port)` runs once the socket listens (port is the bound one when 0 was asked).
    """
    server = await listen(context, host, port)
    try:
        if ready_callback is not None:
            ready_callback(host, server.sockets[0].getsockname()[1])
        await stop.wait()
    finally:
        await close(server, context)


async def listen(context: ServerContext, host: str, port: int) -> asyncio.Server:
    """Start accepting connections on host:port; `close` undoes it."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: TritonProtocol(context), host, port,
                                    reuse_address=True, backlog=1024)


async def close(server: asyncio.Server, context: ServerContext) -> None:
    """Stop accepting, drop every open connection, and wait until the listener is gone."""
    server.close()
    for connection in list(context.connections):
        connection.abort()
    await server.wait_closed()
