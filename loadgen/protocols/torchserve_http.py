"""TorchServe inference over REST: `POST /predictions/{model}[/{version}]` (protocol torchserve-http).

TorchServe models declare no inputs, so the request is the user's: `payload` is a file whose bytes
are each request's body, as perf_analyzer's torchserve mode and TorchServe's own examples send them,
or a folder of such files (images, say) that requests cycle through in name order. Before the run,
`prepare()` checks /ping and sends a few unmeasured requests, so a model that rejects the payload
stops the run with a clear error instead of 10,000 failed requests.

REST runs on the same lean keep-alive HTTP/1.1 client as kserve-http (prebuilt request bytes,
kernel receive timestamps); any status other than 200 is `http_<status>`.
"""

from __future__ import annotations

import mimetypes
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from loadgen.errors import TargetNotReady, TargetUnreachable, classify_exception
from loadgen.flags import Flag
from loadgen.outcome import Outcome
from loadgen.protocols.base import ProtocolSpec, warm_up
from loadgen.protocols.common.http1 import Http1Pool, build_request
from loadgen.protocols.common.torchserve import PAYLOAD_FLAG, TorchServeOptions, json_or_text, payload_files

__all__ = ["PROTOCOL", "TorchServeHttpClient", "TorchServeHttpTarget", "payload_files"]


class TorchServeHttpTarget(TorchServeOptions):
    """`[target]` of protocol torchserve-http: http(s)://host:port (the inference API)."""

    protocol: Literal["torchserve-http"]
    content_type: str | None = None
    """The body's Content-Type (default by extension: JSON, image/*, audio/*, video/*, else
    application/octet-stream)."""


def _content_type(target: TorchServeHttpTarget, path: Path) -> str:
    """--content-type, else by extension: JSON, images, audio and video by their media type, anything
    else application/octet-stream."""
    if target.content_type:
        return target.content_type
    guessed = mimetypes.guess_type(path.name)[0] or ""
    if guessed == "application/json" or guessed.split("/")[0] in ("image", "audio", "video"):
        return guessed
    return "application/octet-stream"


class TorchServeHttpClient:
    """One TorchServe model over the inference REST API."""

    def __init__(self, target: TorchServeHttpTarget, seed: int = 0) -> None:
        self.target = target
        parts = urlsplit(target.url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._tls else 80)
        self._netloc = self._host + (f":{parts.port}" if parts.port else "")
        self._prefix = parts.path.rstrip("/")
        path = f"{self._prefix}/predictions/{quote(target.model, safe='')}"
        if target.version:
            path += f"/{quote(target.version, safe='')}"
        self._path = path
        self._pool = self._new_pool(target.timeout)
        self._headers = target.auth_headers()
        self._requests = [build_request("POST", self._netloc, path, file.read_bytes(),
                                        {**self._headers, "Content-Type": _content_type(target, file)})
                          for file in payload_files(target.payload)] or [build_request("POST", self._netloc, path)]
        self._next = 0
        self.metadata: dict[str, Any] = {}
        self.warmup_requests = 0
        self.request_name = f"{target.model} infer"

    def _new_pool(self, timeout: float) -> Http1Pool:
        context = self.target.ssl_context()
        return Http1Pool(self._host, self._port, tls=context, connect_timeout=self.target.connect_timeout,
                         timeout=timeout, max_response_bytes=self.target.max_response_bytes)

    def prepare(self) -> dict[str, Any]:
        control = self._new_pool(self.target.connect_timeout)
        try:
            response = control.send(build_request("GET", self._netloc, f"{self._prefix}/ping", headers=self._headers))
        except Exception as exc:  # noqa: BLE001 - every way of not answering is "unreachable"
            raise TargetUnreachable(f"cannot reach {self.target.url} ({classify_exception(exc)}: "
                                    f"{exc or type(exc).__name__}); is the server running, and is --target right?"
                                    ) from None
        finally:
            control.close()
        if response.status != 200:
            raise TargetNotReady(f"{self.target.url}: not healthy (GET /ping -> {response.status} "
                                 f"{_error_text(response.body)})")
        warm_up(self, f"POST {self._path}")
        self.metadata = {"name": self.target.model, "ping": json_or_text(response.body)}
        return self.metadata

    def send(self, intended_t: float) -> Outcome:
        request = self._requests[self._next]
        self._next = (self._next + 1) % len(self._requests)
        sent_t = time.monotonic()
        try:
            response = self._pool.send(request)
        except Exception as exc:  # noqa: BLE001 - mapped to an error kind, the run goes on
            return Outcome(intended_t, sent_t, time.monotonic(), classify_exception(exc), str(exc))
        done_t = max(response.done_t, sent_t)
        if response.status != 200:
            return Outcome(intended_t, sent_t, done_t, f"http_{response.status}", _error_text(response.body),
                           len(response.body))
        return Outcome(intended_t, sent_t, done_t, None, "", len(response.body))

    def close(self) -> None:
        self._pool.close()


def _error_text(body: bytes) -> str:
    parsed = json_or_text(body)
    if isinstance(parsed, dict):
        return str(parsed.get("message") or parsed.get("error") or parsed)
    return str(parsed)


PROTOCOL = ProtocolSpec(
    name="torchserve-http",
    options=TorchServeHttpTarget,
    client=TorchServeHttpClient,
    flags=(PAYLOAD_FLAG,
           Flag("content_type", str | None, "Content-Type of --payload (default by extension: JSON, image/*, "
                "audio/*, video/*, else application/octet-stream).", key=("target", "content_type"))),
    summary="TorchServe's inference REST API (with --payload)",
)
