"""HTTP/1.1 answers read off a raw socket, for the tests that hold connections open by hand (caps on
connections, half-sent requests): no client library between the test and the server's bytes."""

from __future__ import annotations

import socket

__all__ = ["read_answer"]


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response read from `sock`: status, lower-case headers, body (by Content-Length; none: empty)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed: {buffer[:200]!r}"
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    return int(status.split()[1]), headers, body
