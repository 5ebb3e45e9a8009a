"""A lean HTTP/1.1 keep-alive client for the generator's hot path (gevent sockets).

Load tests send the same request thousands of times a second, so the request bytes are built once
(`build_request`) and each send is one `sendall` on a pooled connection followed by a small
response parser: status line, headers, then a Content-Length, chunked or read-to-close body.
Against geventhttpclient this drops per-request header assembly and a liveness select() on every
checkout, which together were a third of the generator's CPU per request at 7,000 req/s.

Each response carries `done_t`: when its last bytes reached this host's network stack, from the
kernel's receive timestamp (SO_TIMESTAMPNS) on plain TCP, else when they were read. The difference
is the generator's own scheduling delay (a busy loop, a CPU taken away by the hypervisor for a
millisecond), which is not the server's latency and must not count as such. Linux switches receive
timestamps on for the host only after a socket first asks, from a work queue, and off again when the last
such socket closes; the first pool in a process therefore holds a timestamping socket open for the
process's life and waits until the kernel stamps on arrival (`keep_receive_timestamps`).

A pooled connection that the server closed while idle shows up as EOF before the first response
byte; the request is then sent once more on a new connection (as browsers and geventhttpclient
do). Any other failure is raised to the caller, which maps it to an error kind (errors.py).

`timeout` is a deadline for the whole request: connect, send and the full answer (a server that
drips a byte a second cannot keep a request alive by never going quiet for a whole timeout); every
socket wait is given what is left of it. A streaming caller (SSE) sets a first-byte deadline and a
limit on each gap between reads instead (`_Reader.gap`), since a stream may rightly last minutes.
An answer past `max_response_bytes` is cut off (ResponseTooLarge) and its connection closed, so a
broken or hostile server cannot make the generator buffer without bound.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Mapping

from loadgen.errors import ConnectionClosed, InvalidResponse, ResponseTooLarge

__all__ = ["MAX_RESPONSE_BYTES", "HTTPError", "Http1Pool", "Response", "build_request", "keep_receive_timestamps"]

_MAX_HEADER_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
"""Default limit on one answer (head and body): generous for any tensor or completion."""
_INF = float("inf")
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python does not name it
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY_BYTES = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0


_stamp_keeper: socket.socket | None = None


def keep_receive_timestamps(wait_s: float = 0.5) -> bool:
    """Keep the kernel's receive timestamping on for this process's life; True once it stamps on arrival.

    Linux stamps arriving packets only while some socket on the host asks for it, and turns that on from a
    work queue after the first setsockopt (net_enable_timestamp): bytes that arrive before it runs are
    stamped when read, the very delay `done_t` leaves out. A datagram sent to a socket of our own and read
    2 ms later shows whether the stamp is the arrival's (checked until `wait_s` passes)."""
    global _stamp_keeper
    if _stamp_keeper is not None or not _ANCILLARY_BYTES:
        return _stamp_keeper is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        deadline = time.monotonic() + wait_s
        while True:
            sent_t = time.monotonic()
            sock.sendto(b"t", sock.getsockname())
            time.sleep(0.002)
            _data, ancillary, _flags, _addr = sock.recvmsg(16, _ANCILLARY_BYTES)
            if _arrival_t(ancillary) < sent_t + 0.001 or time.monotonic() > deadline:
                break
    except OSError:  # not Linux, or no loopback: arrival is when the bytes are read
        sock.close()
        return False
    _stamp_keeper = sock
    return _arrival_t(ancillary) < sent_t + 0.001


class HTTPError(InvalidResponse):
    """The server's bytes are not an HTTP/1.x response."""


class Response:
    __slots__ = ("body", "done_t", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes, done_t: float) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.done_t = done_t
        """time.monotonic() instant the response's last bytes arrived."""


def build_request(
    method: str, host: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
) -> bytes:
    """The complete bytes of one request, to be sent as is every time."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Reader:
    """Buffered reads from one socket."""

    __slots__ = ("buffer", "deadline", "gap", "limit", "received", "rx_t", "sock", "timestamps")

    def __init__(self, sock: socket.socket, timestamps: bool) -> None:
        self.sock = sock
        self.timestamps = timestamps
        self.buffer = bytearray()
        self.received = 0  # bytes received for the current request
        self.rx_t = 0.0  # monotonic arrival instant of the latest bytes
        self.deadline = _INF
        """monotonic instant by which the answer (a stream: its first byte) must have come."""
        self.gap = _INF
        """A stream's longest wait between reads once its first byte came (inf: the deadline holds)."""
        self.limit = MAX_RESPONSE_BYTES
        """Most bytes the current answer may have."""

    def start(self, deadline: float, gap: float, limit: int) -> None:
        """A new request on this connection: its deadline, gap and size limits."""
        self.received = 0
        self.deadline = deadline
        self.gap = gap
        self.limit = limit

    def fill(self) -> bool:
        wait = self.gap if self.received and self.gap < _INF else self.deadline - time.monotonic()
        if wait <= 0.0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(wait if wait < _INF else None)
        if self.timestamps:
            chunk, ancillary, _flags, _addr = self.sock.recvmsg(65536, _ANCILLARY_BYTES)
        else:
            chunk, ancillary = self.sock.recv(65536), []
        if not chunk:
            return False
        self.rx_t = _arrival_t(ancillary)
        self.buffer += chunk
        self.received += len(chunk)
        if self.received > self.limit:
            raise ResponseTooLarge(f"answer larger than {self.limit} bytes (--max-response-bytes); cut off")
        return True

    def line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            if len(self.buffer) > _MAX_HEADER_BYTES:
                raise HTTPError("response header line too long")
            if not self.fill():
                raise ConnectionClosed("connection closed inside the response head")

    def exactly(self, count: int) -> bytes:
        if count > self.limit:
            raise ResponseTooLarge(f"answer of {count} bytes announced, over {self.limit} (--max-response-bytes)")
        while len(self.buffer) < count:
            if not self.fill():
                raise ConnectionClosed(f"connection closed {count - len(self.buffer)} bytes before the body's end")
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def rest(self) -> bytes:
        while self.fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def _arrival_t(ancillary: list) -> float:
    """The monotonic instant of a kernel receive timestamp (CLOCK_REALTIME), else now."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            # realtime -> monotonic through an offset read now: exact to well under a microsecond
            # over the milliseconds between arrival and read
            return sec + nsec * 1e-9 - (time.time() - time.monotonic())
    return time.monotonic()


class _Connection:
    __slots__ = ("reader", "sock")

    def __init__(self, sock: socket.socket, timestamps: bool) -> None:
        self.sock = sock
        self.reader = _Reader(sock, timestamps)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Http1Pool:
    """Keep-alive connections to one host:port (TLS when `tls`), reused most-recent first."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 3.0,
        timeout: float = 30.0,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        """Deadline of each request: connect + send + the whole answer."""
        self.max_response_bytes = max_response_bytes
        self._idle: list[_Connection] = []
        self.opened = 0
        if tls is None:
            keep_receive_timestamps()

    def _connect(self, deadline: float = _INF) -> _Connection:
        wait = min(self.connect_timeout, deadline - time.monotonic())
        if wait <= 0.0:
            raise TimeoutError("deadline passed")
        sock = socket.create_connection((self.host, self.port), timeout=wait)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        timestamps = False
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        elif _ANCILLARY_BYTES:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
                timestamps = True
            except OSError:  # not Linux: arrival is when the bytes are read
                pass
        self.opened += 1
        return _Connection(sock, timestamps)

    def send(self, request: bytes) -> Response:
        """Send prebuilt request bytes and read the whole response, all within `timeout`."""
        deadline = time.monotonic() + self.timeout
        try:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else self._connect(deadline)
            try:
                return self._exchange(conn, request, deadline)
            except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
                if reused and conn.reader.received == 0:  # closed while idle: once more, on a fresh one
                    return self._exchange(self._connect(deadline), request, deadline)
                raise
        except TimeoutError:
            raise TimeoutError(f"no complete answer within {self.timeout:g} s") from None

    def _exchange(self, conn: _Connection, request: bytes, deadline: float) -> Response:
        conn.reader.start(deadline, _INF, self.max_response_bytes)
        try:
            _send_within(conn.sock, request, deadline)
            response, keep = _read_response(conn.reader)
        except BaseException:
            conn.close()
            raise
        self._release(conn, keep)
        return response

    def _release(self, conn: _Connection, keep: bool) -> None:
        if keep and not conn.reader.buffer:
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


_NOTHING = "connection closed before any response byte"


def _send_within(sock: socket.socket, data: bytes, deadline: float) -> None:
    """sendall, all of it by `deadline` (a socket timeout bounds a whole sendall, in Python and gevent)."""
    wait = deadline - time.monotonic()
    if wait <= 0.0:
        raise TimeoutError("deadline passed")
    sock.settimeout(wait)
    sock.sendall(data)


def _read_head(reader: _Reader) -> tuple[int, str, dict[str, str]]:
    if not reader.buffer and not reader.fill():
        raise ConnectionClosed(_NOTHING)
    while True:
        status_line = reader.line()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HTTPError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        while line := reader.line():
            name, sep, value = line.partition(b":")
            if not sep:
                raise HTTPError(f"malformed header line: {line[:80]!r}")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        status = int(parts[1])
        if status >= 200 or status == 101:
            return status, parts[0].decode("latin-1"), headers
        # 1xx interim responses (100 Continue, 103 Early Hints) precede the real one


def _read_chunked(reader: _Reader) -> bytes:
    body = bytearray()
    while True:
        size_line = reader.line().split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise HTTPError(f"bad chunk size {size_line[:20]!r}") from None
        if size == 0:
            while reader.line():  # trailers end with an empty line
                pass
            return bytes(body)
        body += reader.exactly(size)
        if reader.exactly(2) != b"\r\n":
            raise HTTPError("chunk not followed by CRLF")


def _read_response(reader: _Reader) -> tuple[Response, bool]:
    status, version, headers = _read_head(reader)
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    if status in (204, 304):
        body = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = _read_chunked(reader)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise HTTPError(f"bad Content-Length {headers['content-length']!r}") from None
        body = reader.exactly(length)
    else:
        body, keep = reader.rest(), False
    return Response(status, headers, body, reader.rx_t), keep
