"""The mock's connections: an asyncio.Protocol that writes each token chunk at its declared instant.

Per connection: bytes -> RequestParser (servers/core/http1.py) -> MockApp (_app.py) -> a reply. A
connection answers one request at a time, in request order (pipelined requests wait their turn).

Timing rule (the ground truth a client is checked against): a completion request's clock starts at
its arrival, the instant right after the complete request (head and body) was parsed, or, when it
waited behind an earlier answer on the same connection, the instant that answer ended. With that
start s, token chunk k (0-based) is written at s + ttft + k * itl (ttft: the request's own, see
--ttft-ms in _app.py), from a PreciseScheduler
(loadgen/lowlevel/precise_timer.py) callback: each instant is computed from s, so no error accumulates.
A stream's response head is written at s; a non-streamed answer is written whole at
s + ttft + (tokens - 1) * itl, when its last token would have been generated.

Who decides when a token is generated is apart from how it is written: `Answer` writes token k of
a completion when told (`emit(k)`), `_TimedAnswer` tells it at the mock's instants, and a server
built on these connections (servers/llm_sim, whose engine decides) overrides
`MockProtocol.start_answer` to tell it at its own.

Faults (--truncate-every, --error-every): a picked stream writes its first `fault_after` token
chunks, then either closes the connection without ending the chunked body (truncate), or writes an
error event, [DONE] and the body's end (error) and keeps the connection.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loadgen.lowlevel.keepawake import KeepAwake
from loadgen.lowlevel.precise_timer import PreciseScheduler
from loadgen.lowlevel.timerfd import reduce_timer_slack
from servers.core.connection import Connections, HttpConnection, capped_connections
from servers.core.http1 import HttpError, Request, continue_response, format_response
from servers.openai_mock._app import Completion, MockApp, Renderer, Reply, error_reply

_STREAM_HEAD = ("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                "Cache-Control: no-cache\r\n{framing}\r\n")
_END = b"0\r\n\r\n"


@dataclass
class ServerContext:
    """What every connection of one server shares."""

    app: MockApp
    scheduler: PreciseScheduler
    ttft_s: float = 0.0  # the declared default; each Completion carries its own (--ttft-ms may cycle)
    itl_s: float = 0.0
    connections: set[MockProtocol] = field(default_factory=set)


class Job:
    """One request's answer on a connection's queue."""

    __slots__ = ("arrival_t", "close", "http10", "reply")

    def __init__(self, reply: Reply | Completion, arrival_t: float, close: bool, http10: bool) -> None:
        self.reply = reply
        self.arrival_t = arrival_t
        self.close = close
        self.http10 = http10


class MockProtocol(HttpConnection):
    """One HTTP/1.1 connection: keep-alive, one answer at a time, Connection: close honoured."""

    def __init__(self, context: ServerContext) -> None:
        super().__init__(context.connections)
        self._context = context
        self._jobs: deque[Job] = deque()
        self._busy = False  # an answer is being written over time
        self._abandoned = False  # the client went away mid-answer (counted once)

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return  # draining after a fatal error or after Connection: close
        parser = self._parser
        parser.feed(data)
        try:
            while self._reading and (request := parser.next_request()) is not None:
                self._queue(request, time.monotonic())
        except HttpError as exc:
            self._reading = False
            body = error_reply(exc.status, exc.message).body
            self._jobs.append(Job(Reply(exc.status, body), time.monotonic(), True, False))
        if self._reading and not self._jobs and not self._busy and parser.continue_due():
            self._transport.write(continue_response())
        self._next()

    def eof_received(self) -> bool:
        self._note_abandoned()
        self._peer_eof = True
        self._reading = False
        return self._busy or bool(self._jobs)  # True keeps the socket open for the answers still due

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._note_abandoned()
        self._jobs.clear()

    def _note_abandoned(self) -> None:
        """Count once a connection whose client went away (EOF or reset) while an answer was being written."""
        if self._busy and not self._abandoned:
            self._abandoned = True
            self._context.app.counters["abandoned"] += 1

    def _queue(self, request: Request, arrival_t: float) -> None:
        reply = self._context.app.handle(request.method, request.target, request.body)
        if not request.keep_alive:
            self._reading = False
        self._jobs.append(Job(reply, arrival_t, not request.keep_alive, request.version == "HTTP/1.0"))

    def _next(self) -> None:
        """Start the answers waiting, in order, until one takes time or none is left."""
        while self._jobs and not self._busy and self._transport is not None:
            job = self._jobs.popleft()
            if isinstance(job.reply, Reply):
                self._write_reply(job)
            else:
                self._busy = True
                self.start_answer(job, max(job.arrival_t, time.monotonic()))
        if not self._jobs and not self._busy and self._peer_eof and self._transport is not None:
            self._transport.close()

    def start_answer(self, job: Job, start_t: float) -> None:
        """Begin writing a completion whose clock starts at start_t (the mock: at its declared delays)."""
        _TimedAnswer(self, job).start(start_t)

    def _write_reply(self, job: Job) -> None:
        reply = job.reply
        assert isinstance(reply, Reply)
        data = format_response(reply.status, reply.body, reply.content_type, keep_alive=not job.close,
                               http10=job.http10)
        self._write(data, job.close)

    def _write(self, data: bytes, close: bool = False) -> bool:
        """Write `data` (and close after it when asked); False when the connection is gone."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        if close:
            self._jobs.clear()
            self._close(transport)
        return True

    def answer_done(self, cut: bool = False) -> None:
        """The answer being written has ended (cut: the connection was closed mid-stream)."""
        self._busy = False
        if cut:
            self._reading = False
            self._jobs.clear()
            if self._transport is not None:
                self._transport.close()
            return
        self._next()


class Answer:
    """Writes one completion: a stream's head at `open()`, then token chunk k at `emit(k)` (a
    non-streamed answer: the whole body at the last token's emit). When is the caller's choice."""

    __slots__ = ("_chunked", "_close", "_conn", "_context", "_renderer", "completion")

    def __init__(self, conn: MockProtocol, job: Job) -> None:
        assert isinstance(job.reply, Completion)
        self._conn = conn
        self._context = conn._context
        self.completion = job.reply
        self._renderer = Renderer(job.reply)
        self._close = job.close or job.http10
        self._chunked = not job.http10

    def open(self) -> None:
        """Write a stream's response head (nothing for a non-streamed answer)."""
        if not self.completion.stream:
            return
        framing = "Transfer-Encoding: chunked\r\n" if self._chunked else ""
        if self._close:
            framing += "Connection: close\r\n"
        self._conn._write(_STREAM_HEAD.format(framing=framing).encode("latin-1"))

    def emit(self, k: int) -> bool:
        """Token k (0-based) is generated now: write what goes with it. False once nothing more will be
        written (the last token went out, a fault ended the answer, or the client went away)."""
        completion = self.completion
        if not completion.stream:
            if k == completion.tokens - 1:
                self._whole()
                return False
            return True
        return self._token(k)

    def _whole(self) -> None:
        self._context.app.counters["completed"] += 1
        body = self._renderer.whole()
        data = format_response(200, body, keep_alive=not self._close, http10=not self._chunked)
        if self._conn._write(data, self._close):
            self._conn.answer_done()

    def _token(self, k: int) -> bool:
        completion, counters = self.completion, self._context.app.counters
        if completion.fault is not None and k == completion.fault_after:
            self._fault(completion.fault)
            return False
        last = k == completion.tokens - 1
        data = self._frame(self._renderer.part(k))
        if last:
            counters["completed"] += 1
            data += _END if self._chunked else b""
        counters["tokens"] += 1
        if not self._conn._write(data, last and self._close):
            return False  # the client went away: nothing more to write
        if k == 0:
            completion.record["first_token_t"] = time.monotonic()
        if last:
            self._conn.answer_done()
        return not last

    def _fault(self, fault: str) -> None:
        counters = self._context.app.counters
        if fault == "truncate":
            counters["truncated"] += 1
            self._conn.answer_done(cut=True)
            return
        counters["error_events"] += 1
        data = self._frame(self._renderer.error_event()) + (_END if self._chunked else b"")
        if self._conn._write(data, self._close):
            self._conn.answer_done()

    def _frame(self, payload: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(payload), payload) if self._chunked else payload


class _TimedAnswer(Answer):
    """The mock's timing: token k at start + its ttft + k * itl (a non-streamed body at the last token's)."""

    __slots__ = ("_start_t",)

    def start(self, start_t: float) -> None:
        self._start_t = start_t
        completion = self.completion
        completion.record["arrival_t"] = start_t
        self.open()
        self._at(0 if completion.stream else completion.tokens - 1)

    def _at(self, k: int) -> None:
        context = self._context
        context.scheduler.call_at(self._start_t + self.completion.ttft_s + k * context.itl_s, self._fire, k)

    def _fire(self, k: int) -> None:
        if self.emit(k):
            self._at(k + 1)


async def run_server(context_factory: Callable[[float], ServerContext], host: str, port: int,
                     stop: asyncio.Event, ready_callback: Callable[[str, int], None] | None = None,
                     protocol: Callable[[ServerContext], MockProtocol] = MockProtocol) -> None:
    """Listen on host:port until `stop` is set, then drop every connection and return.

    `context_factory(t0)` builds the shared context once t0, the start instant, is known;
    `ready_callback(host, port)` runs once the socket listens (port is the bound one when 0 was asked);
    `protocol(context)` makes each connection.
    """
    loop = asyncio.get_running_loop()
    context = context_factory(time.monotonic())
    server = await loop.create_server(lambda: protocol(context), host, port,
                                      reuse_address=True, backlog=1024)
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


def openai_connections(max_connections: int | None) -> Connections:
    """The connections of the mock (and llm-sim): at most `max_connections` open (None: no cap), one beyond
    it answered 503 in OpenAI's error shape and closed."""
    return capped_connections(max_connections, lambda reason: error_reply(503, reason, kind="server_error").body)


def serve_until_signal(serving: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `serving(stop)` on a fresh loop (uvloop when installed) until SIGTERM or SIGINT sets `stop`
    (signals are caught only in the main thread). Timer slack is cut first, and what exists now is
    frozen out of the garbage collector: it lives as long as the server, and a full collection must
    not walk it mid-stream."""
    reduce_timer_slack()
    gc.collect()
    gc.freeze()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_until_signal(serving))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _until_signal(serving: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        await serving(stop)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def print_listening(host: str, port: int) -> None:
    """The one line a server prints once listening (tests read the port from it when 0 was asked)."""
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on http://{shown}:{port}", flush=True)


def command_main(args: Any, config: Any, problems: list[str], parser: Any,
                 serve: Callable[[Any, str, int, Callable[[str, int], None]], None]) -> int:
    """The end of a server command's main(): bad flags exit 2 (usage and each problem), a port that cannot
    be listened on 1, else serve until stopped (0), with keep-awake spinners when --keep-awake."""
    if problems:
        parser.print_usage(sys.stderr)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        with KeepAwake(os.sched_getaffinity(0) if args.keep_awake else ()):
            serve(config, args.host, args.port, print_listening)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
