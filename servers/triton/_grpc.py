"""The gRPC front end of the Triton-compatible server: `inference.GRPCInferenceService` on grpc.aio.

It runs on the same asyncio loop as the HTTP front end and shares its ModelHost (_infer.py), so both
count into the same statistics. Messages are the stubs tritonclient ships (PROTOCOLS.md 2.1-2.5);
tensors go through _grpc_tensors.py. Served: health, metadata, config, ModelInfer, ModelStreamInfer,
statistics, the repository index and model load/unload, and gRPC's standard health service
(`grpc.health.v1.Health/Check`, _health.py), as tritonserver serves it. The other RPCs (shared memory,
trace, log settings) answer UNIMPLEMENTED. Errors carry Triton's status codes: NOT_FOUND for an
unknown model, INVALID_ARGUMENT for a bad request or a refused load, INTERNAL when a model fails.

ModelStreamInfer answers one response per request, errors in `error_message` (with the request's id,
so a client can tell which one failed), and the stream stays open. As in Triton, the requests of one
stream run concurrently: each starts as soon as it is read (with a callback, not a task: an inline
model answers at once, a scheduled one when its execution ends) and its response is written when it
completes, so a slow request does not hold back the ones after it (responses may come back out of
order; clients match them by id). At most STREAM_CONCURRENCY requests of one stream are in flight;
past that the stream is not read until one completes, and gRPC's flow control holds the client back.
When the client has sent its last request, the stream ends once every response is written.

With a GrpcTls the port speaks TLS only (tritonserver's --grpc-use-ssl), and asks clients for a
certificate signed by the root CA with `mutual` (--grpc-use-ssl-mutual).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from servers.triton._grpc_tensors import decode_request, encode_response
from servers.triton._health import health_handler
from servers.triton._host import RepositoryError, ServedModel
from servers.triton._infer import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    InferError,
    InferRequest,
    ModelFailure,
    ModelHost,
    Unavailable,
    UnknownModel,
    execute,
    execute_scheduled,
    submit_scheduled,
)

MAX_MESSAGE_BYTES = 2**31 - 1
"""Triton's and tritonclient's gRPC message size limit (INT32_MAX) both ways."""

STREAM_CONCURRENCY = 256
"""Requests of one ModelStreamInfer call in flight at once; the stream is read no further until one is
answered."""

_STATUS = {UnknownModel: grpc.StatusCode.NOT_FOUND, InferError: grpc.StatusCode.INVALID_ARGUMENT,
           ModelFailure: grpc.StatusCode.INTERNAL, Unavailable: grpc.StatusCode.UNAVAILABLE}
Context = grpc.aio.ServicerContext
_Encode = Callable[[InferRequest, dict], pb.ModelInferResponse]


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The RPCs of GRPCInferenceService over one ModelHost; models with inline = False run in `executor`.

    Method names are the proto's RPC names, as grpc's generated servicer requires.
    """

    def __init__(self, host: ModelHost, executor: Executor) -> None:
        self._host = host
        self._executor = executor

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._host.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            self._host.lookup(request.name, request.version)
        except UnknownModel:
            return pb.ModelReadyResponse(ready=False)  # as Triton: not an error, just not ready
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: Context) -> pb.ModelMetadataResponse:
        served = await self._lookup(request.name, request.version, context)
        return json_format.ParseDict(self._host.metadata(served, request.version), pb.ModelMetadataResponse())

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        served = await self._lookup(request.name, request.version, context)
        return pb.ModelConfigResponse(config=served.config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: Context) -> pb.ModelStatisticsResponse:
        if request.name:
            served = await self._lookup(request.name, request.version, context)
            versions = [request.version] if request.version else self._host.versions(served.name)
            snapshots = [self._host.lookup(served.name, version).stats.snapshot() for version in versions]
        else:
            snapshots = [stats.snapshot() for stats in self._host.all_stats()]
        return json_format.ParseDict({"model_stats": snapshots}, pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: Context) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for row in self._host.index(ready_only=request.ready):
            response.models.add(**row)
        return response

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Context) -> pb.RepositoryModelLoadResponse:
        try:
            await self._host.load(request.model_name, _load_parameters(request))
        except RepositoryError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Context) -> pb.RepositoryModelUnloadResponse:
        try:
            self._host.unload(request.model_name)
        except RepositoryError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        try:
            return await self._infer(request)
        except (UnknownModel, InferError, ModelFailure) as exc:
            await context.abort(_STATUS.get(type(exc), grpc.StatusCode.INTERNAL), str(exc))
            raise  # abort raises; this line only tells type checkers so

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: Context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        stream = _Stream(STREAM_CONCURRENCY)
        reader = asyncio.ensure_future(self._read_stream(request_iterator, stream))
        try:
            while (answer := await stream.answers.get()) is not None:
                if isinstance(answer, BaseException):
                    raise answer
                yield answer
            await reader  # what ended the reading, if it was not the client's last request
        finally:
            reader.cancel()  # the call is over (cancelled, or failed)

    async def _read_stream(self, requests: AsyncIterator[pb.ModelInferRequest], stream: _Stream) -> None:
        """Start each request as it is read, then wait for every answer; None in the answers says the end."""
        try:
            async for request in requests:
                await stream.take_slot()
                self._start(request, functools.partial(stream.answer, request))
            await stream.drained()
        finally:
            stream.answers.put_nowait(None)

    def _start(self, message: pb.ModelInferRequest,
               done: Callable[[pb.ModelInferResponse | BaseException], None]) -> None:
        """Start one request without a task (as the HTTP front end does); done(response, or the error)
        runs on the loop once: at once for an inline model or a request refused before it runs."""
        try:
            served, arrival_ns, decode, encode = self._prepare(message)
            if served.scheduler is not None:
                submit_scheduled(served, arrival_ns, decode, encode, done)
                return
            if not served.model.inline:
                served.stats.add_pending(1)
                future = asyncio.get_running_loop().run_in_executor(
                    self._executor, execute, served.model, served.stats, arrival_ns, decode, encode, True)
                future.add_done_callback(lambda finished: done(_outcome(finished)))
                return
            outcome: pb.ModelInferResponse | BaseException = execute(served.model, served.stats, arrival_ns,
                                                                      decode, encode)
        except Exception as exc:  # noqa: BLE001 - the request's answer: an error response, or the call's end
            outcome = exc
        done(outcome)

    async def _lookup(self, name: str, version: str, context: Context) -> ServedModel:
        try:
            return self._host.lookup(name, version)
        except UnknownModel as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise  # abort raises; this line only tells type checkers so

    async def _infer(self, message: pb.ModelInferRequest) -> pb.ModelInferResponse:
        served, arrival_ns, decode, encode = self._prepare(message)
        if served.scheduler is not None:
            return await execute_scheduled(served, arrival_ns, decode, encode)
        model, stats = served.model, served.stats
        if model.inline:
            return execute(model, stats, arrival_ns, decode, encode)
        stats.add_pending(1)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, execute, model, stats, arrival_ns, decode, encode,
                                          True)

    def _prepare(self, message: pb.ModelInferRequest) -> tuple[ServedModel, int, Callable[[], InferRequest],
                                                              _Encode]:
        """The model `message` is for (raises UnknownModel), its arrival time, and its decode and encode."""
        arrival_ns = time.perf_counter_ns()
        served = self._host.lookup(message.model_name, message.model_version)
        model = served.model

        def decode() -> InferRequest:
            return decode_request(message, model)

        def encode(request: InferRequest, outputs: dict) -> pb.ModelInferResponse:
            return encode_response(model, request, outputs)

        return served, arrival_ns, decode, encode


class _Stream:
    """One ModelStreamInfer call's answers, in the order they complete, and its requests in flight."""

    def __init__(self, limit: int) -> None:
        self.answers: asyncio.Queue[pb.ModelStreamInferResponse | BaseException | None] = asyncio.Queue()
        self._limit = limit
        self._in_flight = 0
        self._answered = asyncio.Event()

    async def take_slot(self) -> None:
        """Wait until fewer than `limit` requests are in flight, and count one more."""
        while self._in_flight >= self._limit:
            self._answered.clear()
            await self._answered.wait()
        self._in_flight += 1

    async def drained(self) -> None:
        """Wait until every request started is answered."""
        while self._in_flight:
            self._answered.clear()
            await self._answered.wait()

    def answer(self, request: pb.ModelInferRequest, outcome: pb.ModelInferResponse | BaseException) -> None:
        """Queue the response to `request`: its result, an error response, or an error that ends the call."""
        self._in_flight -= 1
        self._answered.set()
        if isinstance(outcome, UnknownModel | InferError | ModelFailure):
            self.answers.put_nowait(pb.ModelStreamInferResponse(
                error_message=str(outcome), infer_response=pb.ModelInferResponse(id=request.id)))
        elif isinstance(outcome, BaseException):
            self.answers.put_nowait(outcome)  # a bug ends the call with its error, as a unary call would
        else:
            if _wants_final_flag(request):
                outcome.parameters["triton_final_response"].bool_param = True
            self.answers.put_nowait(pb.ModelStreamInferResponse(infer_response=outcome))


def _outcome(future: asyncio.Future) -> object:
    """A finished worker job's result, or the error it raised."""
    if future.cancelled():
        return RuntimeError("the server is shutting down")
    return future.exception() or future.result()


def _wants_final_flag(message: pb.ModelInferRequest) -> bool:
    parameter = message.parameters.get("triton_enable_empty_final_response")
    return parameter is not None and parameter.bool_param


@dataclass(frozen=True)
class GrpcTls:
    """TLS for the gRPC port, in PEM: the server's certificate (chain) and key, and the root CA that
    client certificates must chain to (needed with `mutual`, when clients must present one)."""

    cert: bytes
    key: bytes
    root: bytes | None = None
    mutual: bool = False

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.root,
                                           require_client_auth=self.mutual)


async def start_grpc(host: ModelHost, executor: Executor, address: str, port: int,
                     tls: GrpcTls | None = None, max_concurrent_rpcs: int | None = None,
                     ) -> tuple[grpc.aio.Server, int]:
    """Start serving on address:port (0 picks a free port), over TLS with `tls`; returns the server and
    its bound port. Raises OSError when the port cannot be bound (or the certificate and key are unusable).

    With `max_concurrent_rpcs`, an RPC that finds that many in progress is refused at once with
    RESOURCE_EXHAUSTED (grpc's own check, "Concurrent RPC limit exceeded!"), so many clients cannot
    make the server hold unbounded work; a stream counts as one RPC however many requests it carries.

    Example:
        server, port = await start_grpc(ModelHost(builtin_models()), executor, "127.0.0.1", 0)
        ...
        await server.stop(grace=None)
    """
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(host, executor), server)
    server.add_generic_rpc_handlers((health_handler(host.ready),))
    shown = f"[{address}]" if ":" in address else address
    try:
        if tls is None:
            bound = server.add_insecure_port(f"{shown}:{port}")
        else:
            bound = server.add_secure_port(f"{shown}:{port}", tls.credentials())
    except RuntimeError as exc:  # grpc's "Failed to bind": a port in use, or credentials it cannot load
        bound = 0
        reason = f": {exc}"
    else:
        reason = ""
    if bound == 0:
        unusable = " (or the TLS certificate and key do not match or cannot be loaded)" if tls else ""
        raise OSError(f"cannot bind gRPC to {shown}:{port}{unusable}{reason}")
    await server.start()
    return server, bound


def _load_parameters(request: pb.RepositoryModelLoadRequest) -> dict[str, str | bytes | bool | int]:
    """A load request's parameters as ModelHost.load takes them: `config` a JSON string, `file:...`
    raw bytes (bytes_param; a string_param is read as base64, as over HTTP)."""
    return {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
            for key, value in request.parameters.items()}
