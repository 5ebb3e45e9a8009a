"""The calibration server's connections: an asyncio.Protocol that times each infer answer precisely.

Per connection: bytes -> RequestParser (servers/core/http1.py) -> CalibrationApp (_app.py) -> a reply that is
written at once, or, for a successful infer, held until the done instant of TimingModel (timing.py)
and written from a PreciseScheduler (loadgen/lowlevel/precise_timer.py) callback. Replies leave in request
order even when requests are pipelined: a reply waits behind any earlier one still held.

Measurement rule: the arrival instant is time.monotonic() right after the complete request (head and
body) has been parsed, before routing; a zero delay is written at once, without a timer.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loadgen.lowlevel.precise_timer import PreciseScheduler
from servers.calibration._app import CalibrationApp, error_reply
from servers.calibration.timing import TimingModel
from servers.core.connection import HttpConnection
from servers.core.http1 import HttpError, Request, continue_response, format_response


@dataclass
class ServerContext:
    """What every connection of one server shares."""

    app: CalibrationApp
    model: TimingModel
    scheduler: PreciseScheduler
    connections: set[CalibrationProtocol] = field(default_factory=set)


class _Slot:
    """One reply in a connection's queue; `ready` once its done instant has passed."""

    __slots__ = ("close", "data", "ready", "timed")

    def __init__(self, data: bytes, timed: bool, close: bool, ready: bool) -> None:
        self.data = data
        self.timed = timed
        self.close = close
        self.ready = ready


class CalibrationProtocol(HttpConnection):
    """One HTTP/1.1 connection: keep-alive, pipelining, replies in order, Connection: close honoured."""

    def __init__(self, context: ServerContext) -> None:
        super().__init__(context.connections)
        self._context = context

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return  # draining after a fatal error or after Connection: close
        parser = self._parser
        parser.feed(data)
        try:
            while self._reading and (request := parser.next_request()) is not None:
                self._handle(request, time.monotonic())
        except HttpError as exc:
            self._fail(exc)
            return
        if self._reading and not self._pending and parser.continue_due():
            self._transport.write(continue_response())

    def _handle(self, request: Request, arrival_t: float) -> None:
        context = self._context
        reply = context.app.handle(request.method, request.path, request.body)
        keep_alive = request.keep_alive
        data = format_response(reply.status, reply.body, keep_alive=keep_alive,
                               http10=request.version == "HTTP/1.0")
        if not keep_alive:
            self._reading = False
        if reply.timed:
            done_t = context.model.done_at(arrival_t)
            if done_t > time.monotonic():
                slot = _Slot(data, True, not keep_alive, ready=False)
                self._pending.append(slot)
                context.scheduler.call_at(done_t, self._release, slot)
                return
        self._send(_Slot(data, reply.timed, not keep_alive, ready=True))

    def _fail(self, exc: HttpError) -> None:
        """Answer a framing error after the replies already queued, then close the connection."""
        self._reading = False
        reply = error_reply(exc.status, exc.message)
        data = format_response(reply.status, reply.body, keep_alive=False)
        self._send(_Slot(data, False, True, ready=True))

    def _send(self, slot: _Slot) -> None:
        if self._pending:
            self._pending.append(slot)
        else:
            self._write(slot)

    def _release(self, slot: _Slot) -> None:
        slot.ready = True
        pending = self._pending
        while pending and pending[0].ready:
            self._write(pending.popleft())
        if self._peer_eof and not pending and self._transport is not None:
            self._transport.close()

    def _write(self, slot: _Slot) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(slot.data)
        if slot.timed:
            self._context.app.answered += 1
        if slot.close:
            self._close(transport)


async def run_server(context_factory: Callable[[float], ServerContext], host: str, port: int,
                     stop: asyncio.Event, ready_callback: Callable[[str, int], None] | None = None,
                     tls: ssl.SSLContext | None = None) -> None:
    """Listen on host:port (HTTPS with `tls`) until `stop` is set, then drop every connection and return.

    `context_factory(t0)` builds the shared context once t0, the start instant, is known;
    `ready_callback(host, port)` runs once the socket listens (port is the bound one when 0 was asked).
    """
    loop = asyncio.get_running_loop()
    context = context_factory(time.monotonic())
    server = await loop.create_server(lambda: CalibrationProtocol(context), host, port,
                                      reuse_address=True, backlog=1024, ssl=tls)
    try:
        if ready_callback is not None:
            ready_callback(host, server.sockets[0].getsockname()[1])
        await stop.wait()
    finally:
        server.close()
        for connection in list(context.connections):
            connection.abort()
        await server.wait_closed()
        context.scheduler.close()
