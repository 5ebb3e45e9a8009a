"""TorchServe inference over REST (`POST /predictions/{model}[/{version}]`) and gRPC (Predictions).

TorchServe models declare no inputs, so the request is the user's: `payload` is a file whose bytes
are each request's body (REST) or the `data` input (gRPC), as perf_analyzer's torchserve mode and
TorchServe's own examples send them, or a folder of such files (images, say) that requests cycle
through in name order. Before the run, `prepare()` checks /ping (REST) or Ping (gRPC)
and sends a few unmeasured requests, so a model that rejects the payload stops the run with a clear
error instead of 10,000 failed requests.

REST runs on the same lean keep-alive HTTP/1.1 client as kserve-http (prebuilt request bytes,
kernel receive timestamps); any status other than 200 is `http_<status>`. gRPC sends a prebuilt
PredictionsRequest through a bytes-in/bytes-out unary call on one HTTP/2 channel (see
_grpc_common.py for gevent and failures); the stubs, shared with the reference server, are in
loadgen/lowlevel/torchserve_proto, generated from TorchServe's own service and message definitions.
"""

from __future__ import annotations

import json
import mimetypes
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from loadgen.errors import TargetNotReady, TargetUnreachable, classify_exception
from loadgen.outcome import Outcome
from loadgen.protocols import warm_up
from loadgen.protocols._grpc_common import call_metadata, open_channel, rpc_failure, unreachable
from loadgen.protocols.http1 import Http1Pool, build_request
from loadgen.scenario import Target

__all__ = ["TorchServeGrpcClient", "TorchServeHttpClient", "payload_files"]

_PREDICTIONS = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"


def payload_files(payload: str | None) -> list[Path]:
    """The request bodies' files: `payload` itself, or every visible file of a `payload` folder in name
    order (a folder of images, say); requests cycle through them."""
    if payload is None:
        return []
    path = Path(payload)
    if not path.is_dir():
        return [path]
    return sorted(item for item in path.iterdir() if item.is_file() and not item.name.startswith("."))


def _content_type(target: Target, path: Path) -> str:
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

    def __init__(self, target: Target, seed: int = 0) -> None:
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

    def _new_pool(self, timeout: float) -> Http1Pool:
        context = self.target.ssl_context()
        return Http1Pool(self._host, self._port, tls=context, connect_timeout=self.target.connect_timeout,
                         timeout=timeout)

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
        self.metadata = {"name": self.target.model, "ping": _json(response.body)}
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


class TorchServeGrpcClient:
    """One TorchServe model over the gRPC inference API (org.pytorch.serve.grpc.inference)."""

    def __init__(self, target: Target, seed: int = 0) -> None:
        self.target = target
        self._channel = open_channel(target.url, target.ca_file)
        self._metadata = call_metadata(target.auth_headers())
        import grpc

        from loadgen.lowlevel.torchserve_proto import inference_pb2

        self._grpc = grpc
        self._predict = self._channel.unary_unary(_PREDICTIONS, request_serializer=None,
                                                  response_deserializer=None)
        self._requests = [inference_pb2.PredictionsRequest(
            model_name=target.model, model_version=target.version or "", input={"data": body}).SerializeToString()
            for body in [file.read_bytes() for file in payload_files(target.payload)] or [b""]]
        self._next = 0
        self.metadata: dict[str, Any] = {}
        self.warmup_requests = 0

    def prepare(self) -> dict[str, Any]:
        from google.protobuf import empty_pb2

        from loadgen.lowlevel.torchserve_proto import inference_pb2_grpc

        grpc = self._grpc
        timeout = self.target.connect_timeout
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
            health = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel).Ping(
                empty_pb2.Empty(), timeout=timeout, metadata=self._metadata)
        except grpc.FutureTimeoutError:
            raise TargetUnreachable(unreachable(self.target.url, self.target.ca_file, timeout)) from None
        except grpc.RpcError as exc:
            raise TargetNotReady(f"{self.target.url}: Ping failed: {exc.code().name}: {exc.details()}") from None
        warm_up(self, f"Predictions of {self.target.model!r}")
        self.metadata = {"name": self.target.model, "ping": _json(health.health.encode())}
        return self.metadata

    def send(self, intended_t: float) -> Outcome:
        request = self._requests[self._next]
        self._next = (self._next + 1) % len(self._requests)
        sent_t = time.monotonic()
        try:
            response = self._predict(request, timeout=self.target.timeout, metadata=self._metadata)
        except self._grpc.RpcError as exc:
            return rpc_failure(exc, intended_t, sent_t)
        return Outcome(intended_t, sent_t, time.monotonic(), None, "", len(response))

    def close(self) -> None:
        self._channel.close()


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")


def _error_text(body: bytes) -> str:
    parsed = _json(body)
    if isinstance(parsed, dict):
        return str(parsed.get("message") or parsed.get("error") or parsed)
    return str(parsed)
