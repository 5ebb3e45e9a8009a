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
stream run concurrently: each becomes a task as soon as it is read, and its response is written when
it completes, so a slow request does not hold back the ones after it (responses may come back out of
order; clients match them by id). At most STREAM_CONCURRENCY requests of one stream are in flight;
past that the stream is not read until one completes, and gRPC's flow control holds the client back.
When the client has sent its last request, the stream ends once every response is written.

With a GrpcTls the port speaks TLS only (tritonserver's --grpc-use-ssl), and asks clients for a
certificate signed by the root CA with `mutual` (--grpc-use-ssl-mutual).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
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
    UnknownModel,
    execute,
    execute_scheduled,
)

MAX_MESSAGE_BYTES = 2**31 - 1
"""Triton's and tritonclient's gRPC message size limit (INT32_MAX) both ways."""

STREAM_CONCURRENCY = 256
"""Requests of one ModelStreamInfer call in flight at once; the stream is read no further until one is
answered."""

_STATUS = {UnknownModel: grpc.StatusCode.NOT_FOUND, InferError: grpc.StatusCode.INVALID_ARGUMENT,
           ModelFailure: grpc.StatusCode.INTERNAL}
Context = grpc.aio.ServicerContext


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
            if request.parameters:
                raise RepositoryError("load parameters are not supported; send none")
            await self._host.load(request.model_name)
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
            await context.abort(_STATUS[type(exc)], str(exc))
            raise  # abort raises; this line only tells type checkers so

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: Context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        answers: asyncio.Queue[pb.ModelStreamInferResponse | BaseException | None] = asyncio.Queue()
        reader = asyncio.ensure_future(self._read_stream(request_iterator, answers))
        try:
            while (answer := await answers.get()) is not None:
                if isinstance(answer, BaseException):
                    raise answer
                yield answer
            await reader  # what ended the reading, if it was not the client's last request
        finally:
            reader.cancel()  # the call is over (cancelled, or failed): the requests in flight go too

    async def _read_stream(self, requests: AsyncIterator[pb.ModelInferRequest],
                           answers: asyncio.Queue[pb.ModelStreamInferResponse | BaseException | None]) -> None:
        """Start a task per request as it is read, then wait for all; None in `answers` says the end."""
        slots = asyncio.Semaphore(STREAM_CONCURRENCY)
        running: set[asyncio.Task] = set()

        def finished(task: asyncio.Task) -> None:
            running.discard(task)
            slots.release()

        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.ensure_future(self._answer_in_stream(request, answers))
                running.add(task)
                task.add_done_callback(finished)
            while running:
                await asyncio.wait(set(running))
        finally:
            for task in running:
                task.cancel()
            answers.put_nowait(None)

    async def _answer_in_stream(self, request: pb.ModelInferRequest,
                                answers: asyncio.Queue[pb.ModelStreamInferResponse | BaseException | None]) -> None:
        try:
            response = await self._infer(request)
        except (UnknownModel, InferError, ModelFailure) as exc:
            answers.put_nowait(pb.ModelStreamInferResponse(error_message=str(exc),
                                                           infer_response=pb.ModelInferResponse(id=request.id)))
            return
        except Exception as exc:  # noqa: BLE001 - a bug ends the call with its error, as a unary call would
            answers.put_nowait(exc)
            return
        if _wants_final_flag(request):
            response.parameters["triton_final_response"].bool_param = True
        answers.put_nowait(pb.ModelStreamInferResponse(infer_response=response))

    async def _lookup(self, name: str, version: str, context: Context) -> ServedModel:
        try:
            return self._host.lookup(name, version)
        except UnknownModel as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise  # abort raises; this line only tells type checkers so

    async def _infer(self, message: pb.ModelInferRequest) -> pb.ModelInferResponse:
        arrival_ns = time.perf_counter_ns()
        served = self._host.lookup(message.model_name, message.model_version)
        model, stats = served.model, served.stats

        def decode() -> InferRequest:
            return decode_request(message, model)

        def encode(request: InferRequest, outputs: dict) -> pb.ModelInferResponse:
            return encode_response(model, request, outputs)

        if served.scheduler is not None:
            return await execute_scheduled(served, arrival_ns, decode, encode)
        if model.inline:
            return execute(model, stats, arrival_ns, decode, encode)
        stats.add_pending(1)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, execute, model, stats, arrival_ns, decode, encode,
                                          True)


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
                     tls: GrpcTls | None = None) -> tuple[grpc.aio.Server, int]:
    """Start serving on address:port (0 picks a free port), over TLS with `tls`; returns the server and
    its bound port. Raises OSError when the port cannot be bound (or the certificate and key are unusable).

    Example:
        server, port = await start_grpc(ModelHost(builtin_models()), executor, "127.0.0.1", 0)
        ...
        await server.stop(grace=None)
    """
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.aio.server(options=options)
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
