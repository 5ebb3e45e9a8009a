"""HTTP compression of infer requests and responses, as Triton and tritonclient do it (PROTOCOLS.md 1.10).

A request body with `Content-Encoding: gzip` or `deflate` (a zlib stream, as tritonclient's
zlib.compress writes it; `identity` or empty = none) is decompressed before it is parsed, and its
Inference-Header-Content-Length counts bytes of the decompressed body. Decompression stops one byte
past MAX_BODY_BYTES, the limit an uncompressed body has, so a small body that inflates to gigabytes
(a zip bomb) costs that much memory at most and is refused. Any other encoding is refused with
Triton's "Unsupported compression type" and an `Accept-Encoding: gzip, deflate` header.

A response is compressed when the request's Accept-Encoding prefers gzip or deflate: the highest
q-value among identity, deflate and gzip wins, the first one listed on a tie, as Triton's
CompressionTypeUsed picks. Its Content-Length is the compressed size; Inference-Header-Content-Length
keeps counting the JSON part of the uncompressed body (tritonclient decompresses, then splits).
Only successful infer responses are compressed; errors go out as they are, as in Triton.
"""

from __future__ import annotations

import functools
import zlib

from servers.core.http1 import MAX_BODY_BYTES

__all__ = ["EncodingError", "compress", "decompress", "response_encoding"]

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
"""zlib window bits per encoding: gzip's header and trailer, or a zlib stream."""
_CHUNK = 1 << 20


class EncodingError(ValueError):
    """A request body that cannot be decoded; `accept` is the Accept-Encoding header to answer with."""

    def __init__(self, message: str, accept: str = "") -> None:
        super().__init__(message)
        self.accept = accept


def decompress(body: bytes, encoding: str, limit: int = MAX_BODY_BYTES) -> bytes:
    """`body` decoded from its Content-Encoding; raises EncodingError for an unknown encoding, a corrupt
    or truncated stream, or one that inflates past `limit` bytes."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return body
    wbits = _WBITS.get(name)
    if wbits is None:
        raise EncodingError("Unsupported compression type", accept="gzip, deflate")
    parts: list[bytes] = []
    size = 0
    data = body
    while True:  # gzip may hold several members one after the other
        inflater = zlib.decompressobj(wbits)
        try:
            while data:
                part = inflater.decompress(data, min(_CHUNK, limit + 1 - size))
                size += len(part)
                parts.append(part)
                if size > limit:
                    raise EncodingError(f"Request body size after {name} decompression exceeds the maximum "
                                        f"allowed value of {limit} bytes")
                data = inflater.unconsumed_tail
            tail = inflater.flush()
        except zlib.error as exc:
            raise EncodingError(f"failed to decompress the {name} request body: {exc}") from None
        size += len(tail)
        parts.append(tail)
        if size > limit:
            raise EncodingError(f"Request body size after {name} decompression exceeds the maximum allowed "
                                f"value of {limit} bytes")
        if not inflater.eof:
            raise EncodingError(f"failed to decompress the {name} request body: the stream ends early")
        data = inflater.unused_data
        if not data or name != "gzip":
            break
    if data:
        raise EncodingError(f"failed to decompress the {name} request body: {len(data)} bytes after its end")
    return b"".join(parts)


@functools.lru_cache(maxsize=64)
def response_encoding(accept_encoding: str) -> str | None:
    """"gzip" or "deflate" when the Accept-Encoding header prefers one, else None (identity).

    >>> response_encoding("deflate;q=0.5, gzip")
    'gzip'
    >>> response_encoding("br") is None
    True
    """
    chosen, weight = "identity", 0.0
    for item in accept_encoding.split(","):
        name, _, parameter = item.partition(";")
        name = name.strip().lower()
        value = 1.0
        parameter = parameter.strip()
        if parameter:
            if not parameter.startswith("q="):
                continue
            try:
                value = float(parameter[2:])
            except ValueError:
                continue
        if name in ("identity", "deflate", "gzip") and value > weight:
            chosen, weight = name, value
    return None if chosen == "identity" else chosen


def compress(body: bytes, encoding: str) -> bytes:
    """`body` compressed for Content-Encoding `encoding` ("gzip" or "deflate"), at zlib's default level."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _WBITS[encoding])
    return compressor.compress(body) + compressor.flush()
