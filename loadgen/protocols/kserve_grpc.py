"""KServe v2 over gRPC (`inference.GRPCInferenceService`, Triton's gRPC API) for the generator.

Before the run, `prepare()` uses the stubs tritonclient ships (service_pb2, service_pb2_grpc) for
ServerReady, ModelReady and ModelMetadata, builds one ModelInferRequest with raw_input_contents
(the binary form Triton clients use) from the model's declared inputs, and serializes it once. On
the hot path each request sends those bytes on one HTTP/2 channel through a bytes-in/bytes-out unary
call: nothing is built or parsed per request on success, the response's size is only counted. Many
calls share the channel concurrently (HTTP/2 streams), as tritonclient's own clients do.

The generator runs under gevent (Locust), so grpc's gevent integration is switched on before the
first channel is made (_grpc_common.py): a call blocks its greenlet only. A failed call is an Outcome
with the error kind `grpc_<status>` (e.g. grpc_invalid_argument, grpc_unavailable), or `timeout`.

Targets: `grpc://host:port` (plain) or `grpcs://host:port` (TLS, with the system's CA store).
"""

from __future__ import annotations

import ssl
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from loadgen.errors import ProtocolMismatch, ResponseTooLarge, TargetNotReady, TargetUnreachable
from loadgen.flags import Flag, if_set
from loadgen.outcome import Outcome
from loadgen.protocols.base import ProtocolSpec, warm_up
from loadgen.protocols.common import kserve
from loadgen.protocols.common.grpc_channel import (
    call_metadata,
    grpc_address,
    open_channel,
    rpc_failure,
    unreachable,
)
from loadgen.protocols.common.request_data import AnswerJudge, Outputs, from_raw, request_data, to_raw

if TYPE_CHECKING:
    from loadgen.protocols.common.grpc_h2 import H2Channel

__all__ = ["PROTOCOL", "KServeGrpcClient", "KServeGrpcTarget", "build_infer_request"]

_INFER = "/inference.GRPCInferenceService/ModelInfer"
_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


class KServeGrpcTarget(kserve.KServeOptions):
    """`[target]` of protocol kserve-grpc: grpc(s)://host:port."""

    SCHEMES: ClassVar[tuple[str, ...]] = ("grpc", "grpcs")

    protocol: Literal["kserve-grpc"]
    stream: bool = False
    """Send each request on a ModelStreamInfer stream (one stream per request in flight, reused)
    instead of a unary ModelInfer call."""


class KServeGrpcClient:
    """One target model over KServe v2 gRPC, on one HTTP/2 channel."""

    def __init__(self, target: KServeGrpcTarget, seed: int = 0) -> None:
        self.target = target
        self.seed = seed
        self._channel = open_channel(target.url, target.ca_file)
        self._metadata = call_metadata(target.auth_headers())
        self._requests: list[bytes] = []
        self._judge: AnswerJudge | None = None
        """Checks and scores each answer (validation data, declared outputs, labels); None: neither."""
        self._next = 0
        import grpc

        self._grpc = grpc
        self._infer = self._channel.unary_unary(_INFER, request_serializer=None, response_deserializer=None)
        self._open_stream = self._channel.stream_stream(_STREAM, request_serializer=None,
                                                        response_deserializer=None)
        self._streams: list[_Stream] = []
        self._h2: H2Channel | None = None
        """The hot path's own HTTP/2 connection for unary calls (grpc_h2.py); grpcio serves prepare() and
        streams."""
        """Idle ModelStreamInfer calls (target.stream): one request in flight on each, reused LIFO."""
        self.metadata: dict[str, Any] = {}
        self.request = b""
        self.warmup_requests = 0
        self.request_name = f"{target.model} infer"
        from loadgen.protocols.common.grpc_h2 import STATUS_NAMES  # gevent: only once load is sent

        self._status_names = STATUS_NAMES

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
            meta = self._metadata
            if not stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout, metadata=meta).ready:
                raise TargetNotReady(f"{self.target.url}: server not ready (ServerReady -> false)")
            ready = stub.ModelReady(pb.ModelReadyRequest(name=model, version=version), timeout=timeout, metadata=meta)
            if not ready.ready:
                raise TargetNotReady(f"model {model!r} is not ready at {self.target.url} (ModelReady -> false)")
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), timeout=timeout,
                                          metadata=meta)
        except grpc.FutureTimeoutError:
            raise TargetUnreachable(unreachable(self.target.url, self.target.ca_file, timeout)) from None
        except grpc.RpcError as exc:
            raise ProtocolMismatch(f"{self.target.url}: {exc.code().name}: {exc.details()}") from None
        self.metadata = {
            "name": metadata.name, "versions": list(metadata.versions), "platform": metadata.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in metadata.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in metadata.outputs],
        }
        data = request_data(self.metadata, self.seed, self.target.shapes, self.target.input_data,
                            self.target.batch_size)
        self._requests = [build_infer_request(model, version, tensors) for tensors in data.tensors]
        self.request = self._requests[0]
        if self.target.check_response:
            data.with_specs(self.metadata)
        self._judge = data.judge(self.metadata, self.target.labels, self.target.reference_outputs)
        if not self.target.stream:
            self._h2 = self._open_h2()
        warm_up(self, f"ModelInfer of {self.target.model!r}")
        return self.metadata

    # -- the hot path ---------------------------------------------------------------------------
    def send(self, intended_t: float) -> Outcome:
        """One ModelInfer call (or one exchange on a ModelStreamInfer stream, with target.stream) with
        the prebuilt request; the Outcome carries the error kind when it fails."""
        index = self._next
        if len(self._requests) > 1:
            self._next = (index + 1) % len(self._requests)
        if self.target.stream:
            return self._send_streamed(intended_t, index)
        sent_t = time.monotonic()
        try:
            reply = self._h2.unary(_INFER, self._requests[index], self.target.timeout, self._metadata or ())
        except TimeoutError as exc:
            return Outcome(intended_t, sent_t, time.monotonic(), "timeout", str(exc))
        except ResponseTooLarge as exc:
            return Outcome(intended_t, sent_t, time.monotonic(), "response_too_large", str(exc))
        except (ConnectionError, OSError) as exc:
            self._h2.close()
            self._h2 = self._open_h2()
            return Outcome(intended_t, sent_t, time.monotonic(), "connection_closed", str(exc))
        done_t = max(reply.done_t, sent_t)
        response = reply.body
        if reply.status != 0:
            return Outcome(intended_t, sent_t, done_t, f"grpc_{self._status_names.get(reply.status, 'unknown')}",
                           reply.message)
        if self._judge is not None:
            from tritonclient.grpc import service_pb2 as pb

            answer = _outputs(pb.ModelInferResponse.FromString(response))
            problem, scored, correct, similar = self._judge.judge(answer, index)
            if problem is not None:
                return Outcome(intended_t, sent_t, done_t, "invalid_response", problem, len(response))
            return Outcome(intended_t, sent_t, done_t, None, "", len(response), scored, correct, similar)
        return Outcome(intended_t, sent_t, done_t, None, "", len(response))

    def answers(self) -> list[Outputs | str]:
        """Each request sent once, in order (after prepare), and its answer decoded (or what was wrong)."""
        from tritonclient.grpc import service_pb2 as pb

        results: list[Outputs | str] = []
        for request in self._requests:
            try:
                raw = self._infer(request, timeout=self.target.timeout, metadata=self._metadata)
            except self._grpc.RpcError as exc:
                results.append(f"{exc.code().name}: {exc.details()}")
                continue
            results.append(_outputs(pb.ModelInferResponse.FromString(raw)))
        return results

    def _send_streamed(self, intended_t: float, index: int) -> Outcome:
        """One request and its response on an idle stream of the pool (a new stream when none is idle).
        A stream that failed or timed out is dropped: a late answer on it must not be taken for the
        next request's."""
        from tritonclient.grpc import service_pb2 as pb

        stream = self._streams.pop() if self._streams else _Stream(self._open_stream, self._metadata)
        sent_t = time.monotonic()
        try:
            raw = stream.exchange(self._requests[index] if self._requests else self.request, self.target.timeout)
        except self._grpc.RpcError as exc:
            stream.close()
            return rpc_failure(exc, intended_t, sent_t)
        except TimeoutError:
            stream.close()
            return Outcome(intended_t, sent_t, time.monotonic(), "timeout", "no answer on the stream in time")
        except StopIteration:
            stream.close()
            return Outcome(intended_t, sent_t, time.monotonic(), "stream_truncated", "the server ended the stream")
        done_t = time.monotonic()
        self._streams.append(stream)
        message = pb.ModelStreamInferResponse.FromString(raw)
        if message.error_message:
            return Outcome(intended_t, sent_t, done_t, "stream_error", message.error_message, len(raw))
        if self._judge is not None:
            problem, scored, correct, similar = self._judge.judge(_outputs(message.infer_response), index)
            if problem is not None:
                return Outcome(intended_t, sent_t, done_t, "invalid_response", problem, len(raw))
            return Outcome(intended_t, sent_t, done_t, None, "", len(raw), scored, correct, similar)
        return Outcome(intended_t, sent_t, done_t, None, "", len(raw))

    def _open_h2(self) -> H2Channel:
        from loadgen.protocols.common.grpc_h2 import H2Channel

        address, tls = grpc_address(self.target.url)
        host, _, port = address.rpartition(":")
        context = ssl.create_default_context(cafile=self.target.ca_file) if tls else None
        try:
            return H2Channel(host.strip("[]"), int(port), tls=context, connect_timeout=self.target.connect_timeout,
                             max_response_bytes=self.target.max_response_bytes)
        except OSError as exc:
            raise TargetUnreachable(f"cannot reach {self.target.url} (connect: {exc})") from None

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        if self._h2 is not None:
            self._h2.close()
        self._channel.close()


class _Stream:
    """One ModelStreamInfer call that carries one request at a time."""

    def __init__(self, open_stream: Any, metadata: Any) -> None:
        try:
            from gevent.queue import Queue
        except ImportError:  # pragma: no cover - the generator always runs under gevent
            from queue import Queue
        self._queue: Any = Queue()
        self._responses = open_stream(iter(self._queue.get, None), metadata=metadata)

    def exchange(self, request: bytes, timeout: float) -> bytes:
        """Send `request`, wait for the next response; TimeoutError past `timeout`."""
        self._queue.put(request)
        try:
            import gevent

            with gevent.Timeout(timeout, TimeoutError):
                return next(self._responses)
        except ImportError:  # pragma: no cover
            return next(self._responses)

    def close(self) -> None:
        self._queue.put(None)
        self._responses.cancel()


def _outputs(message: Any) -> Outputs | str:
    """A ModelInferResponse's raw outputs, decoded, or what makes them no answer."""
    try:
        outputs = {tensor.name: (tensor.datatype, list(tensor.shape), from_raw(tensor.datatype, list(tensor.shape), raw))
                   for tensor, raw in zip(message.outputs, message.raw_output_contents, strict=True)}
    except ValueError as exc:  # raw contents that do not fit the shape, or not one per output
        return f"outputs do not match their raw contents: {exc}"
    return outputs


def build_infer_request(model: str, version: str, tensors: list[dict[str, Any]]) -> bytes:
    """A serialized ModelInferRequest with raw_input_contents for KServe v2 JSON-style `tensors`."""
    from tritonclient.grpc import service_pb2 as pb

    message = pb.ModelInferRequest(model_name=model, model_version=version)
    for tensor in tensors:
        message.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        message.raw_input_contents.append(to_raw(tensor["datatype"], tensor["data"]))
    return message.SerializeToString()


PROTOCOL = ProtocolSpec(
    name="kserve-grpc",
    options=KServeGrpcTarget,
    client=KServeGrpcClient,
    flags=(*kserve.FLAGS,
           Flag("grpc_stream", bool, "ModelStreamInfer streams (one per request in flight) instead of unary "
                "ModelInfer.", key=("target", "stream"), to_scenario=if_set, default=False,
                decls=("--grpc-stream",))),
    summary="KServe v2 / Triton over gRPC (--target grpc://host:port)",
)
