"""The generator's HTTP/1.1 client against a raw socket server on 127.0.0.1 that says exactly what
each test scripts: chunked and sized bodies, closes, interim responses, garbage. At the end, the
servers' side (servers/core/http1.py): a head refused as soon as it cannot become a request, and
valid requests still parsed when they arrive one byte at a time."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from loadgen.errors import classify_exception
from loadgen.protocols.common.http1 import (
    ConnectionClosed,
    Http1Pool,
    HTTPError,
    _read_response,
    build_request,
    keep_receive_timestamps,
)
from servers.core.http1 import HttpError, RequestParser
from tests.support.timing import HostNoise


class ScriptedServer:
    """Accepts connections; for each request read, calls `reply(conn, index)` (index counts requests)."""

    def __init__(self, reply: Callable[[socket.socket, int], None]) -> None:
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buffer[:length])
                buffer = buffer[length:]
                if self.reply(conn, len(self.requests) - 1) == "close":
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    servers = []

    def start(reply):
        server = ScriptedServer(reply)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def pool_for(server: ScriptedServer, timeout: float = 2.0) -> Http1Pool:
    return Http1Pool("127.0.0.1", server.port, connect_timeout=1.0, timeout=timeout)


def test_build_request_is_complete() -> None:
    request = build_request("POST", "h:1", "/v2/models/m/infer", b'{"a":1}', {"Content-Type": "application/json"})
    assert request == (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: h:1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 7\r\n\r\n{\"a\":1}")
    assert build_request("GET", "h", "/v2") == b"GET /v2 HTTP/1.1\r\nHost: h\r\n\r\n"


def test_sized_bodies_on_one_kept_alive_connection(scripted) -> None:
    server = scripted(lambda conn, i: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    pool = pool_for(server)
    for _ in range(5):
        response = pool.send(build_request("POST", "h", "/x", b"{}"))
        assert (response.status, response.body) == (200, b"hello")
    assert server.connections == 1 and pool.opened == 1
    assert len(server.requests) == 5 and server.requests[0].endswith(b"{}")


def test_chunked_body_with_trailers_and_interim_response(scripted) -> None:
    def reply(conn, i):
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"4;ext=1\r\nWiki\r\n6\r\npedia \r\n0\r\nX-Trailer: y\r\n\r\n")

    pool = pool_for(scripted(reply))
    response = pool.send(build_request("GET", "h", "/"))
    assert response.body == b"Wikipedia "
    assert pool.send(build_request("GET", "h", "/")).body == b"Wikipedia "
    assert pool.opened == 1


def test_error_status_and_body_are_returned(scripted) -> None:
    body = b'{"error":"no such model"}'
    server = scripted(lambda conn, i: conn.sendall(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))
    response = pool_for(server).send(build_request("GET", "h", "/v2/models/x"))
    assert response.status == 404 and response.body == body


def test_read_to_close_body_and_connection_close(scripted) -> None:
    def reply(conn, i):
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        return "close"

    server = scripted(reply)
    pool = pool_for(server)
    assert pool.send(build_request("GET", "h", "/")).body == b"all of it"
    assert pool.send(build_request("GET", "h", "/")).body == b"all of it"
    assert server.connections == 2


def test_idle_connection_closed_by_server_is_retried_once(scripted) -> None:
    def reply(conn, i):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return "close"  # without saying so: the client only finds out on its next send

    server = scripted(reply)
    pool = pool_for(server)
    assert pool.send(build_request("GET", "h", "/")).body == b"ok"
    assert pool.send(build_request("GET", "h", "/")).body == b"ok"
    assert pool.opened == 2 and len(server.requests) == 2


@pytest.mark.parametrize(
    ("answer", "exception", "kind"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", HTTPError, "invalid_response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", ConnectionClosed, "connection_closed"),
    ],
    ids=["garbage", "truncated-body"],
)
def test_broken_answers_raise_their_kind(scripted, answer: bytes, exception: type, kind: str) -> None:
    def reply(conn, i):
        conn.sendall(answer)
        return "close"

    with pytest.raises(exception) as info:
        pool_for(scripted(reply)).send(build_request("GET", "h", "/"))
    assert classify_exception(info.value) == kind


def test_silent_server_times_out(scripted) -> None:
    server = scripted(lambda conn, i: None)  # reads the request, never answers
    with pytest.raises(TimeoutError) as info:
        pool_for(server, timeout=0.2).send(build_request("GET", "h", "/"))
    assert classify_exception(info.value) == "timeout"


def test_refused_connection_is_connect() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionRefusedError) as info:
        Http1Pool("127.0.0.1", port).send(build_request("GET", "h", "/"))
    assert classify_exception(info.value) == "connect"


def test_done_t_is_when_the_response_arrived_not_when_it_was_read(host_noise: HostNoise) -> None:
    # The generator may be busy (or descheduled) when a response arrives: that delay is its own,
    # not the server's, and the kernel's receive timestamp keeps it out of the measurement.
    server = socket.create_server(("127.0.0.1", 0))
    pool = Http1Pool("127.0.0.1", server.getsockname()[1], timeout=5.0)
    conn = pool._connect()
    peer, _ = server.accept()
    with server, peer:
        conn.sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        peer.recv(1024)
        written_t = time.monotonic()
        peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        time.sleep(0.05)  # the client reads 50 ms late
        response, _keep = _read_response(conn.reader)
    conn.close()
    assert response.body == b"ok"
    assert written_t <= response.done_t
    # the loopback delivers within microseconds; read time would be 50 ms later
    host_noise.assert_below(response.done_t, written_t + 0.005, what="done_t (s)", quantile="max", unit=1000.0)


VALID_REQUESTS = [
    b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\nGET /v2 HTTP/1.0\r\n\r\n",  # an empty line before a request is allowed (RFC 9112 2.2)
    b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 4\r\nInference-Header-Content-Length: 2\r\n\r\n{}ab",
    b"M-SEARCH! /x?a=b%20c HTTP/1.1\r\n\r\n",  # any token is a method; the app decides 405
]


@pytest.mark.parametrize("raw", VALID_REQUESTS, ids=["get", "leading empty line", "post", "odd method"])
def test_server_parser_takes_a_request_fed_byte_by_byte(raw: bytes) -> None:
    whole = RequestParser()
    whole.feed(raw)
    expected = whole.next_request()
    parser = RequestParser()
    for index in range(len(raw) - 1):
        parser.feed(raw[index:index + 1])
        assert parser.next_request() is None, raw[:index + 1]
    parser.feed(raw[-1:])
    assert parser.next_request() == expected


@pytest.mark.parametrize(("start", "status", "message"), [
    (b"\x16\x03\x01", 400, "malformed request line"),  # a TLS ClientHello: refused at its first byte
    (b"GET\x00", 400, "malformed request line"),
    (b" GET /v2", 400, "malformed request line"),
    (b"\r\n\x80", 400, "malformed request line"),
    (b"GET /v2\r\n", 400, "malformed request line: 'GET /v2'"),
    (b"GET /v2 HTTP/2.0\r\nHost: x", 505, "unsupported HTTP version"),
])
def test_server_parser_refuses_a_head_that_cannot_become_a_request(start: bytes, status: int, message: str) -> None:
    parser = RequestParser()
    parser.feed(start)  # no blank line yet: it is refused without waiting for the rest of the head
    with pytest.raises(HttpError, match=message) as caught:
        parser.next_request()
    assert caught.value.status == status


def test_arrival_stamps_survive_the_host_closing_its_last_other_timestamping_socket(host_noise: HostNoise) -> None:
    """Linux stamps arrivals only while a socket on the host asks for it; it switches that off when the last
    one closes and on again for the next, both from a work queue: a response that comes before the queue
    has run is stamped when read. The pool holds a socket of its own that keeps the stamps on
    (keep_receive_timestamps). Ten times over, the only connection is closed, the queue given 5 ms, and a
    new connection's response read 20 ms late: each done_t must be the arrival, not the read."""
    pool = Http1Pool("127.0.0.1", 1, timeout=5.0)  # no connection yet: holding the stamps is the pool's start
    assert keep_receive_timestamps()
    server = socket.create_server(("127.0.0.1", 0))
    pool.port = server.getsockname()[1]
    with server:
        for _ in range(10):
            time.sleep(0.005)  # the last connection closed: the kernel's work queue runs
            conn = pool._connect()
            peer, _ = server.accept()
            with peer:
                conn.sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                peer.recv(1024)
                written_t = time.monotonic()
                peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                time.sleep(0.02)
                response, _keep = _read_response(conn.reader)
            conn.close()
            assert written_t <= response.done_t
            host_noise.assert_below(response.done_t, written_t + 0.005, what="done_t (s)", quantile="max",
                                    unit=1000.0)
