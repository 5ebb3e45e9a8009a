"""What the gRPC clients share: grpc under gevent, targets, channels, and failed calls as Outcomes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadgen.outcome import Outcome

__all__ = ["call_metadata", "grpc_address", "init_gevent", "open_channel", "rpc_failure", "unreachable"]

MAX_MESSAGE = 2**31 - 1
_gevent_ready = False


def init_gevent() -> None:
    """grpc must cooperate with gevent in the generator (a call blocks its greenlet only); init once,
    before any channel exists, and only in a process gevent has patched."""
    global _gevent_ready
    if _gevent_ready:
        return
    try:
        import gevent.monkey

        if gevent.monkey.is_module_patched("socket"):
            from grpc.experimental import gevent as grpc_gevent

            grpc_gevent.init_gevent()
    except ImportError:
        pass
    _gevent_ready = True


def grpc_address(url: str) -> tuple[str, bool]:
    """`grpc://host:port` -> ("host:port", False); `grpcs://...` -> (..., True); a bare host:port is plain."""
    if "://" not in url:
        return url, False
    parts = urlsplit(url)
    if parts.scheme not in ("grpc", "grpcs"):
        raise ValueError(f"a gRPC target is grpc://host:port or grpcs://host:port, got {url!r}")
    return parts.netloc, parts.scheme == "grpcs"


def open_channel(url: str, ca_file: str | None = None) -> Any:
    """A channel to `url` with no message size limit (as Triton's and TorchServe's clients); grpcs://
    trusts the system's CAs, or only `ca_file` when given."""
    init_gevent()
    import grpc

    address, tls = grpc_address(url)
    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    if tls:
        roots = Path(ca_file).read_bytes() if ca_file else None
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots), options=options)
    return grpc.insecure_channel(address, options=options)


def unreachable(url: str, ca_file: str | None, timeout: float) -> str:
    """The error the user sees when no channel to `url` became ready. grpc only logs a failed TLS
    handshake, so for grpcs:// a handshake of our own (same roots) names a certificate problem."""
    reason = _why_unreachable(url, ca_file, timeout)
    hint = "" if reason.startswith("TLS") else "; is the server running, and is --target right?"
    return f"cannot reach {url} ({reason}){hint}"


def _why_unreachable(url: str, ca_file: str | None, timeout: float) -> str:
    address, tls = grpc_address(url)
    reason = f"connect: no gRPC channel within {timeout:g} s"
    if not tls:
        return reason
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    try:
        with (socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock,
              context.wrap_socket(sock, server_hostname=host.strip("[]"))):
            return reason
    except ssl.SSLCertVerificationError as exc:
        hint = "" if ca_file else "; give the CA that signed it with --ca-file"
        return f"TLS: the server's certificate is not trusted ({exc.verify_message}){hint}"
    except ssl.SSLError as exc:
        return f"TLS handshake failed ({exc.reason or exc})"
    except (OSError, ValueError) as exc:
        return f"connect: {exc or type(exc).__name__}"


def call_metadata(headers: dict[str, str]) -> tuple[tuple[str, str], ...] | None:
    """HTTP-style headers as gRPC metadata (keys lower case, as gRPC requires)."""
    return tuple((key.lower(), value) for key, value in headers.items()) or None


def rpc_failure(exc: Any, intended_t: float, sent_t: float) -> Outcome:
    """A failed call as an Outcome: kind `grpc_<status>` (grpc_invalid_argument, ...) or `timeout`."""
    import grpc

    done_t = time.monotonic()
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        kind = "timeout"
    else:
        kind = f"grpc_{code.name.lower() if code is not None else 'unknown'}"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return Outcome(intended_t, sent_t, done_t, kind, details or "")
