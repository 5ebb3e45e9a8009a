"""A lean gRPC unary client for the generator's hot path: HTTP/2 frames (the `h2` state machine) on one
gevent socket, no grpcio on the way.

grpcio under gevent polls its completion queue from the gevent loop: measured here it cost the
generator about half a millisecond of CPU a request and a lag p99 over 1 ms at 500 req/s, where
perf_analyzer spent a tenth of that. A unary gRPC call is only HEADERS + one DATA frame (a 5-byte
length prefix and the serialized message) out, and HEADERS, DATA and trailing HEADERS (grpc-status)
back, so the generator sends prebuilt message bytes itself, many calls multiplexed as HTTP/2 streams
on one connection, and one reader greenlet hands each answer to the greenlet waiting for it. The
arrival instant is taken when the bytes holding the end of the stream were received, before they are
parsed.

Flow control: the connection and stream receive windows are opened wide at the start and every
received byte is acknowledged; a request larger than the peer's window waits for its WINDOW_UPDATE.

A call's `timeout` is its deadline from the moment `unary()` is called: waiting for the connection's
lock, for the peer's flow-control window and for the answer all come out of it (a server that never
opens its window cannot hold a call past it). An answer past `max_response_bytes` is cut off: its
stream reset, the call a ResponseTooLarge.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.queue import Queue
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.settings import SettingCodes

from loadgen.errors import ResponseTooLarge

__all__ = ["STATUS_NAMES", "GrpcReply", "H2Channel"]

_WINDOW = 2**31 - 1
STATUS_NAMES = {0: "ok", 1: "cancelled", 2: "unknown", 3: "invalid_argument", 4: "deadline_exceeded",
                5: "not_found", 6: "already_exists", 7: "permission_denied", 8: "resource_exhausted",
                9: "failed_precondition", 10: "aborted", 11: "out_of_range", 12: "unimplemented",
                13: "internal", 14: "unavailable", 15: "data_loss", 16: "unauthenticated"}
"""gRPC status codes by number (the grpc-status trailer), as grpc.StatusCode names them, lower case."""


@dataclass
class GrpcReply:
    """A finished call: grpc-status (0 = OK), its message, the response message, the arrival instant."""

    status: int
    message: str
    body: bytes
    done_t: float


@dataclass
class _Call:
    event: Event = field(default_factory=Event)
    data: bytearray = field(default_factory=bytearray)
    headers: dict[str, str] = field(default_factory=dict)
    done_t: float = 0.0
    error: str = ""
    too_large: bool = False


class H2Channel:
    """One HTTP/2 connection to a gRPC server; `unary()` from any greenlet, concurrently."""

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None = None,
                 connect_timeout: float = 3.0, max_response_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_response_bytes = max_response_bytes
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            tls.set_alpn_protocols(["h2"])
            sock = tls.wrap_socket(sock, server_hostname=host)
        sock.settimeout(None)
        self._sock = sock
        self._scheme = "https" if tls is not None else "http"
        self._authority = f"{host}:{port}"
        self._conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self._conn.initiate_connection()
        self._conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW, SettingCodes.ENABLE_PUSH: 0})
        self._conn.increment_flow_control_window(_WINDOW - 65_535)
        self._lock = Semaphore()
        self._calls: dict[int, _Call] = {}
        self._window = Event()
        self._closed = ""
        self._out: Queue = Queue()
        self._flush()
        self._writer = gevent.spawn(self._write)
        self._reader = gevent.spawn(self._read)

    def _flush(self) -> None:
        """Hand the frames h2 prepared to the writer greenlet: no caller ever blocks on the socket, so a
        server that stops reading (saturated) delays its own answers, not the generator's schedule."""
        data = self._conn.data_to_send()
        if data:
            self._out.put_nowait(data)

    def _write(self) -> None:
        try:
            while (data := self._out.get()) is not None:
                pending = [data]
                while not self._out.empty():  # coalesce what queued up meanwhile into one send
                    more = self._out.get_nowait()
                    if more is None:
                        self._sock.sendall(b"".join(pending))
                        return
                    pending.append(more)
                self._sock.sendall(b"".join(pending) if len(pending) > 1 else data)
        except OSError as exc:
            self._fail(f"{type(exc).__name__}: {exc}")

    def unary(self, path: str, message: bytes, timeout: float,
              metadata: tuple[tuple[str, str], ...] = ()) -> GrpcReply:
        """One call: `message` (a serialized request) to `path`; raises TimeoutError past `timeout` (from
        now: the send, flow-control waits included), ResponseTooLarge for an answer past
        max_response_bytes and ConnectionError when the connection is gone."""
        if self._closed:
            raise ConnectionError(self._closed)
        deadline = time.monotonic() + timeout
        call = _Call()
        framed = b"\x00" + len(message).to_bytes(4, "big") + message
        if not self._lock.acquire(timeout=timeout):
            raise TimeoutError(f"no answer within {timeout:g} s (the connection stayed busy)")
        try:
            stream_id = self._conn.get_next_available_stream_id()
            headers = [(":method", "POST"), (":scheme", self._scheme), (":path", path),
                       (":authority", self._authority), ("content-type", "application/grpc"), ("te", "trailers"),
                       ("grpc-timeout", f"{max(int(timeout * 1000), 1)}m"), *metadata]
            self._calls[stream_id] = call
            self._conn.send_headers(stream_id, headers)
            sent = self._send_body(stream_id, framed, deadline)
        finally:
            self._lock.release()
        if not sent or not call.event.wait(max(0.0, deadline - time.monotonic())):
            self._calls.pop(stream_id, None)
            self._reset(stream_id)
            waited = "" if sent else " (the server's flow-control window stayed shut)"
            raise TimeoutError(f"no answer within {timeout:g} s{waited}")
        if call.too_large:
            self._reset(stream_id)
            raise ResponseTooLarge(call.error)
        if call.error:
            raise ConnectionError(call.error)
        return _reply(call)

    def _reset(self, stream_id: int) -> None:
        with self._lock, contextlib.suppress(Exception):  # the stream may have ended meanwhile
            self._conn.reset_stream(stream_id)
            self._flush()

    def _send_body(self, stream_id: int, framed: bytes, deadline: float) -> bool:
        """DATA frames within the peer's windows (waiting for WINDOW_UPDATE when needed), lock held;
        False when the deadline passed first."""
        view = memoryview(framed)
        while True:
            room = min(self._conn.local_flow_control_window(stream_id), self._conn.max_outbound_frame_size)
            if room <= 0:
                wait = deadline - time.monotonic()
                if wait <= 0.0:
                    self._flush()
                    return False
                self._flush()
                self._window.clear()
                self._lock.release()
                try:
                    self._window.wait(wait)
                finally:
                    self._lock.acquire()
                continue
            chunk, view = view[:room], view[room:]
            self._conn.send_data(stream_id, bytes(chunk), end_stream=not view)
            if not view:
                break
        self._flush()
        return True

    def _read(self) -> None:
        try:
            while True:
                data = self._sock.recv(65_536)
                received_t = time.monotonic()
                if not data:
                    raise ConnectionError("the server closed the connection")
                with self._lock:
                    events = self._conn.receive_data(data)
                    for event in events:
                        self._on(event, received_t)
                    self._flush()
                # a socket with bytes waiting never blocks, so under load this loop would never give
                # the loop back: let the dispatcher and the request greenlets run between reads
                gevent.sleep(0)
        except (OSError, ConnectionError, Exception) as exc:  # noqa: BLE001 - every call waiting learns of it
            self._fail(f"{type(exc).__name__}: {exc}")

    def _on(self, event: Any, received_t: float) -> None:
        if isinstance(event, DataReceived):
            if event.flow_controlled_length:
                self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.data += event.data
                if len(call.data) > self.max_response_bytes + 5:  # the 5-byte message prefix aside
                    del self._calls[event.stream_id]
                    call.too_large = True
                    call.error = f"answer larger than {self.max_response_bytes} bytes (--max-response-bytes); cut off"
                    call.event.set()
        elif isinstance(event, (ResponseReceived, TrailersReceived)):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.headers.update((str(k), str(v)) for k, v in event.headers)
        elif isinstance(event, StreamEnded):
            call = self._calls.pop(event.stream_id, None)
            if call is not None:
                call.done_t = received_t
                call.event.set()
        elif isinstance(event, StreamReset):
            call = self._calls.pop(event.stream_id, None)
            if call is not None:
                call.error = f"stream reset by the server (error code {event.error_code})"
                call.event.set()
        elif isinstance(event, WindowUpdated):
            self._window.set()
        elif isinstance(event, ConnectionTerminated):
            raise ConnectionError(f"the server ended the connection (GOAWAY, error code {event.error_code})")

    def _fail(self, reason: str) -> None:
        self._closed = reason
        for call in list(self._calls.values()):
            call.error = reason
            call.event.set()
        self._calls.clear()
        self._window.set()

    def close(self) -> None:
        self._closed = self._closed or "closed"
        with contextlib.suppress(Exception), self._lock:  # closing what may already be gone
            self._conn.close_connection()
            self._flush()
        self._out.put_nowait(None)
        self._writer.join(timeout=1.0)
        self._writer.kill(block=False)
        self._reader.kill(block=False)
        self._sock.close()


def _reply(call: _Call) -> GrpcReply:
    headers = call.headers
    message = headers.get("grpc-message", "")
    raw_status = headers.get("grpc-status", "2" if headers.get(":status") != "200" else "0")
    try:
        status = int(raw_status)
    except ValueError:  # not a number: the call failed, with a status we cannot name
        status, message = 2, f"malformed grpc-status {raw_status[:40]!r}: {message}"
    if headers.get(":status", "200") != "200" and "grpc-status" not in headers:
        message = f"HTTP status {headers.get(':status')}"
    body = bytes(call.data[5:]) if len(call.data) >= 5 else b""
    return GrpcReply(status, _percent_decoded(message), body, call.done_t)


def _percent_decoded(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)
