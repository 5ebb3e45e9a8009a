"""The connection lifecycle both reference servers share: an asyncio.Protocol over servers/core/http1.py.

A subclass turns parsed requests into replies (`data_received`) and keeps them in request order in
`self._pending`; this base tracks the transport, registers the connection in the server's set (so a
stopping server can drop them all), relays write back-pressure to reading, answers the peer's EOF,
and closes after a fatal error with a linger: the client's remaining bytes are drained for
LINGER_S before the connection is dropped, because closing with unread bytes sends a reset that
can destroy the error answer at the client.

A client must not be able to hold a connection, and the bytes it buffered, for ever, so two clocks
watch each one:

- the read timeout (HttpOptions.read_timeout_s, READ_TIMEOUT_S by default) is a deadline for the
  whole request: a request whose first byte came that long ago and which is still incomplete is cut
  off (the connection closed, with no answer: there is no request to answer yet), however steadily
  its bytes trickle in. A deadline reset by every byte would let a client that sends one byte a
  second hold a connection for ever;
- the idle timeout (HttpOptions.idle_timeout_s, IDLE_TIMEOUT_S by default) closes a kept-alive
  connection that has held no request and read no byte that long between requests. Load generators
  keep their connections between requests, so it is long.

Both are watched by one timer per connection that fires every eighth of the read timeout (or every
quarter of the idle timeout, when that is sooner) and compares the parser's counts of bytes and of
requests with the last ones it saw, so the request path itself does no timing work: a request is
timed from the check that first saw it, so the cut comes between the timeout and 1.25 times it
after its first byte (an idle connection is closed between the idle timeout and 1.25 times it after
its last byte). A connection waiting for its own replies, or paused by write back-pressure, is
neither late nor idle.

A cap on open connections (HttpOptions.max_connections, a server's --max-connections) bounds what
many clients can hold: a connection beyond it is answered at once with the server's overload reply
(HttpOptions.refusal: 503, `Connection: close`, in the server's error shape), half-closed and dropped
after the linger, without reading a request; the server says so on stderr the first time.

The per-server options come with the server's set of connections: a Connections carries them, a
plain set gets the defaults. Every server takes the cap the same way: `add_max_connections_flag` on its
command line, `max_connections_problems` for a bad value, `capped_connections` (or `refusal_reason` in
its own error shape) for the set its connections join.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from servers.core.http1 import RequestParser, format_response, json_body

__all__ = ["IDLE_TIMEOUT_S", "LINGER_S", "READ_TIMEOUT_S", "Connections", "HttpConnection", "HttpOptions",
           "add_max_connections_flag", "capped_connections", "max_connections_problems", "overload_reply",
           "refusal_reason"]

LINGER_S = 2.0
"""After a fatal error, how long the connection keeps draining the client's bytes before it is dropped."""
READ_TIMEOUT_S = 60.0
"""How long a request may take to arrive, from its first byte to its last, before its connection is closed."""
IDLE_TIMEOUT_S = 300.0
"""How long a kept-alive connection may stay idle between requests before it is closed."""


def overload_reply(body: bytes) -> bytes:
    """The answer to a connection beyond the cap: 503 with `body` (the server's error shape), then close."""
    return format_response(503, body, keep_alive=False)


_REFUSAL = overload_reply(json_body({"error": "too many open connections (--max-connections); try again later"}))


@dataclass(frozen=True)
class HttpOptions:
    """What every connection of one server is configured with."""

    read_timeout_s: float | None = READ_TIMEOUT_S
    """The whole-request deadline; None: none."""
    parser: Callable[[], RequestParser] = RequestParser
    idle_timeout_s: float | None = IDLE_TIMEOUT_S
    """How long a connection may sit idle between requests; None: for ever."""
    max_connections: int | None = None
    """The most connections open at once; None: no cap."""
    refusal: bytes = _REFUSAL
    """What a connection beyond the cap is answered (overload_reply)."""


class Connections(set):
    """A server's set of open connections, carrying the options its connections are made with."""

    def __init__(self, options: HttpOptions | None = None) -> None:
        super().__init__()
        self.options = options or HttpOptions()
        self.refused = 0
        """Connections refused for the cap so far."""

    def refuse(self) -> bytes:
        """Count one connection refused for the cap (saying so on stderr the first time); its answer."""
        self.refused += 1
        if self.refused == 1:
            print(f"warning: {len(self)} connections open, the --max-connections cap: further connections "
                  "are answered 503 and closed until some close", file=sys.stderr, flush=True)
        return self.options.refusal


def refusal_reason(max_connections: int | None) -> str:
    """What a connection beyond the cap is told, in the server's error shape."""
    return f"too many open connections: the server's limit is {max_connections} (--max-connections)"


def add_max_connections_flag(parser: argparse.ArgumentParser, where: str = "",
                             answer: str = "with the reason") -> None:
    """--max-connections N (default None: no cap); `where` qualifies the count (" per API port"), `answer`
    says what the 503 holds."""
    parser.add_argument("--max-connections", type=int, default=None, metavar="N",
                        help=f"at most N HTTP connections open at once{where}; a connection beyond it is "
                             f"answered 503 ({answer}) and closed (default: no cap)")


def max_connections_problems(max_connections: int | None, name: str = "--max-connections") -> list[str]:
    """The problem with a cap (`name` as the command line or config calls it), if any."""
    if max_connections is not None and max_connections < 1:
        return [f"{name} must be >= 1, got {max_connections}"]
    return []


def capped_connections(max_connections: int | None, error_body: Callable[[str], bytes]) -> Connections:
    """A server's set of connections with the default timeouts and at most `max_connections` open (None:
    no cap); one beyond it is answered 503 with `error_body(refusal_reason)` (the server's error shape)."""
    refusal = overload_reply(error_body(refusal_reason(max_connections)))
    return Connections(HttpOptions(max_connections=max_connections, refusal=refusal))


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
        self._done = -1  # the parser's count of complete requests at the last check
        self._quiet_since = 0.0  # loop time since which the connection has read nothing
        self._request_since: float | None = None  # loop time of the check that first saw the partial request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        limit = self._options.max_connections
        if limit is not None and len(self._connections) >= limit:
            self._reading = False  # what the client sends is drained and dropped
            refuse = getattr(self._connections, "refuse", None)
            self._transport.write(refuse() if refuse is not None else self._options.refusal)
            self._close(self._transport)
            return
        self._connections.add(self)
        period = self._watch_period()
        if period is not None:
            loop = asyncio.get_running_loop()
            self._quiet_since = loop.time()
            self._watch = loop.call_later(period, self._check_idle)

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

    def _watch_period(self) -> float | None:
        """How often the watch looks: an eighth of the read timeout, a quarter of the idle timeout,
        whichever is sooner; None when neither is set."""
        read, idle = self._options.read_timeout_s, self._options.idle_timeout_s
        periods = [t for t in (read and read / 8, idle and idle / 4) if t]
        return min(periods) if periods else None

    def _check_idle(self) -> None:
        """The watch: cut off a request past its deadline, close a connection idle too long, then look
        again later."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        options = self._options
        now = loop.time()
        parser = self._parser
        received, done = parser.received, parser.completed
        busy = bool(self._pending) or self._paused or not self._reading
        if received != self._seen:
            self._seen = received
            self._quiet_since = now
        if busy or not parser.partial():
            self._request_since = None
        elif self._request_since is None or done != self._done:
            self._request_since = now  # it began since the last look: timed from now, never too soon
        self._done = done
        if self._request_since is not None:
            if options.read_timeout_s is not None and now - self._request_since >= options.read_timeout_s * 0.999:
                transport.close()  # a late request gets no answer: there is no request to answer yet
                return
        elif (not busy and options.idle_timeout_s is not None
              and now - self._quiet_since >= options.idle_timeout_s * 0.999):
            transport.close()
            return
        self._watch = loop.call_later(cast(float, self._watch_period()), self._check_idle)
