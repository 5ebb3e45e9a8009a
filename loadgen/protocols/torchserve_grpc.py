"""TorchServe inference over gRPC: the Predictions call of org.pytorch.serve.grpc.inference
(protocol torchserve-grpc).

`payload` is a file whose bytes are each request's `data` input, or a folder of such files that
requests cycle through in name order (see common/torchserve.py). Before the run, `prepare()` waits
for the channel, calls Ping and sends a few unmeasured requests. Each request is a prebuilt
PredictionsRequest sent through a bytes-in/bytes-out unary call on one HTTP/2 channel (see
common/grpc_channel.py for gevent and failures); the stubs, shared with the reference server, are in
loadgen/lowlevel/torchserve_proto, generated from TorchServe's own service and message definitions.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from loadgen.errors import TargetNotReady, TargetUnreachable
from loadgen.outcome import Outcome
from loadgen.protocols.base import ProtocolSpec, warm_up
from loadgen.protocols.common.grpc_channel import call_metadata, open_channel, rpc_failure, unreachable
from loadgen.protocols.common.torchserve import PAYLOAD_FLAG, TorchServeOptions, json_or_text, payload_files

__all__ = ["PROTOCOL", "TorchServeGrpcClient", "TorchServeGrpcTarget"]

_PREDICTIONS = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"


class TorchServeGrpcTarget(TorchServeOptions):
    """`[target]` of protocol torchserve-grpc: grpc(s)://host:port (the inference gRPC port, 7070)."""

    SCHEMES: ClassVar[tuple[str, ...]] = ("grpc", "grpcs")

    protocol: Literal["torchserve-grpc"]


class TorchServeGrpcClient:
    """One TorchServe model over the gRPC inference API (org.pytorch.serve.grpc.inference)."""

    def __init__(self, target: TorchServeGrpcTarget, seed: int = 0) -> None:
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
        self.request_name = f"{target.model} infer"

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
        self.metadata = {"name": self.target.model, "ping": json_or_text(health.health.encode())}
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


PROTOCOL = ProtocolSpec(
    name="torchserve-grpc",
    options=TorchServeGrpcTarget,
    client=TorchServeGrpcClient,
    flags=(PAYLOAD_FLAG,),
    summary="TorchServe's inference gRPC API (--target grpc://host:7070, with --payload)",
)
