"""KServe v2 over gRPC (`inference.GRPCInferenceService`, Triton's gRPC API) for the generator.

Before the run, `prepare()` uses the stubs tritonclient ships (service_pb2, service_pb2_grpc) for
ServerReady, ModelReady and ModelMetadata, builds one ModelInferRequest with raw_input_contents
(the binary form Triton clients use) from the model's declared inputs, and serializes it once. On
the hot path each request sends those bytes on one HTTP/2 channel through a bytes-in/bytes-out unary
call: nothing is built or parsed per request on success, the response's size is only counted. Many
calls share the channel concurrently (HTTP/2 streams), as tritonclient's own clients do.

The generator runs under gevent (Locust), so grpc's gevent integration is switched on before the
first channel is made: a call blocks its greenlet only. A failed call is an Outcome with the error
kind `grpc_<status>` (e.g. grpc_invalid_argument, grpc_unavailable), or `timeout` past the deadline.

Targets: `grpc://host:port` (plain) or `grpcs://host:port` (TLS, with the system's CA store).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from loadgen.errors import ProtocolMismatch, TargetNotReady, TargetUnreachable
from loadgen.outcome import Outcome
from loadgen.protocols.payloads import synthetic_inputs
from loadgen.scenario import Target
from servers.core.model import NUMPY_DTYPES

__all__ = ["KServeGrpcClient", "grpc_address"]

_INFER = "/inference.GRPCInferenceService/ModelInfer"
_MAX_MESSAGE = 2**31 - 1
_gevent_ready = False


def _init_gevent() -> None:
    """grpc must cooperate with gevent in the generator; init once, before any channel exists."""
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


class KServeGrpcClient:
    """One target model over KServe v2 gRPC, on one HTTP/2 channel."""

    def __init__(self, target: Target, seed: int = 0) -> None:
        _init_gevent()
        import grpc

        self.target = target
        self.seed = seed
        self._grpc = grpc
        self._address, tls = grpc_address(target.url)
        options = [("grpc.max_send_message_length", _MAX_MESSAGE),
                   ("grpc.max_receive_message_length", _MAX_MESSAGE)]
        if tls:
            self._channel = grpc.secure_channel(self._address, grpc.ssl_channel_credentials(), options=options)
        else:
            self._channel = grpc.insecure_channel(self._address, options=options)
        self._infer = self._channel.unary_unary(_INFER, request_serializer=None, response_deserializer=None)
        self.metadata: dict[str, Any] = {}
        self.request = b""
        self.warmup_requests = 0

    # -- before the run -------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Readiness check, metadata, the serialized request. Raises a TargetError when the run cannot start."""
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc

        grpc = self._grpc
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        timeout = self.target.connect_timeout
        model, version = self.target.model, self.target.version or ""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
            if not stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout).ready:
                raise TargetNotReady(f"{self.target.url}: server not ready (ServerReady -> false)")
            ready = stub.ModelReady(pb.ModelReadyRequest(name=model, version=version), timeout=timeout)
            if not ready.ready:
                raise TargetNotReady(f"model {model!r} is not ready at {self.target.url} (ModelReady -> false)")
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TargetUnreachable(f"cannot reach {self.target.url} (connect: no gRPC channel within "
                                    f"{timeout:g} s); is the server running, and is --target right?") from None
        except grpc.RpcError as exc:
            raise ProtocolMismatch(f"{self.target.url}: {exc.code().name}: {exc.details()}") from None
        self.metadata = {
            "name": metadata.name, "versions": list(metadata.versions), "platform": metadata.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in metadata.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in metadata.outputs],
        }
        self.request = build_infer_request(model, version, synthetic_inputs(self.metadata["inputs"], self.seed))
        self._warm_up()
        return self.metadata

    def _warm_up(self, count: int = 8) -> None:
        for _ in range(count):
            outcome = self.send(time.monotonic())
            self.warmup_requests += 1
            if outcome.error is not None:
                raise ProtocolMismatch(f"the warm-up ModelInfer request to {self.target.model!r} failed "
                                       f"({outcome.error}: {outcome.message or 'no detail'})")

    # -- the hot path ---------------------------------------------------------------------------
    def send(self, intended_t: float) -> Outcome:
        """One ModelInfer call with the prebuilt request; the Outcome carries the error kind when it fails."""
        sent_t = time.monotonic()
        try:
            response = self._infer(self.request, timeout=self.target.timeout)
        except self._grpc.RpcError as exc:
            done_t = time.monotonic()
            code = exc.code() if hasattr(exc, "code") else None
            kind = "timeout" if code == self._grpc.StatusCode.DEADLINE_EXCEEDED else \
                f"grpc_{code.name.lower() if code is not None else 'unknown'}"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return Outcome(intended_t, sent_t, done_t, kind, details or "")
        return Outcome(intended_t, sent_t, time.monotonic(), None, "", len(response))

    def close(self) -> None:
        self._channel.close()


def build_infer_request(model: str, version: str, tensors: list[dict[str, Any]]) -> bytes:
    """A serialized ModelInferRequest with raw_input_contents for KServe v2 JSON-style `tensors`."""
    from tritonclient.grpc import service_pb2 as pb

    message = pb.ModelInferRequest(model_name=model, model_version=version)
    for tensor in tensors:
        message.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        message.raw_input_contents.append(_raw(tensor["datatype"], tensor["data"]))
    return message.SerializeToString()


def _raw(datatype: str, data: list[Any]) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in data:
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts += [len(raw).to_bytes(4, "little"), raw]
        return b"".join(parts)
    return np.asarray(data, dtype=NUMPY_DTYPES[datatype]).tobytes()
