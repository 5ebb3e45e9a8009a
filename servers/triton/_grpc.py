"""The gRPC front end of the Triton-compatible server: `inference.GRPCInferenceService` on grpc.aio.

It runs on the same asyncio loop as the HTTP front end and shares its ModelHost (_infer.py), so both
count into the same statistics. Messages are the stubs tritonclient ships (PROTOCOLS.md 2.1-2.5);
tensors go through _grpc_tensors.py. Served: health, metadata, config, ModelInfer, ModelStreamInfer
(one response per request, errors in `error_message`, the stream stays open), statistics, the
repository index and model load/unload, and gRPC's standard health service
(`grpc.health.v1.Health/Check`, _health.py), as tritonserver serves it. The other RPCs (shared memory,
trace, log settings) answer UNIMPLEMENTED. Errors carry Triton's status codes: NOT_FOUND for an unknown model, INVALID_ARGUMENT
for a bad request or a refused load, INTERNAL when a model fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor

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
        async for request in request_iterator:
            try:
                response = await self._infer(request)
            except (UnknownModel, InferError, ModelFailure) as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc))
                continue
            if _wants_final_flag(request):
                response.parameters["triton_final_response"].bool_param = True
            yield pb.ModelStreamInferResponse(infer_response=response)

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


async def start_grpc(host: ModelHost, executor: Executor, address: str,
                     port: int) -> tuple[grpc.aio.Server, int]:
    """Start serving on address:port (0 picks a free port); returns the server and its bound port.

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
    bound = server.add_insecure_port(f"{shown}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {shown}:{port}")
    await server.start()
    return server, bound
