"""The gRPC front ends of the TorchServe-compatible server (PROTOCOLS.md 5.6): TorchServe's
`org.pytorch.serve.grpc.inference.InferenceAPIsService` (default port 7070) and
`org.pytorch.serve.grpc.management.ManagementAPIsService` (7071), on grpc.aio in the server's event loop,
over the same ModelManager as HTTP; stubs generated from loadgen/lowlevel/torchserve_proto/*.proto.

What TorchServe 0.12's InferenceImpl, ManagementImpl and GRPCJob answer (captures grpc.json, and its
classes): each entry of `input` is a handler input of that name with no content type (bytes, as the
HTTP API's form fields); a prediction is the handler's body; Ping's health and every management `msg`
are Gson-pretty JSON or a sentence, without the HTTP API's final newline. Errors carry the exception's
message, a newline and its Java class name: an unknown model or version is INTERNAL on the inference
service and NOT_FOUND on the management one; a refused prediction takes the status of its HTTP code
(503 -> UNAVAILABLE, 507 -> RESOURCE_EXHAUSTED, others as GRPCUtils.getGRPCStatusCode); a bad
management request is INVALID_ARGUMENT; a duplicate registration is UNKNOWN with no description (an
exception TorchServe does not catch there); with token authorization on, a call needs `authorization:
Bearer <key>` metadata, else PERMISSION_DENIED. StreamPredictions yields one response per part of a
streaming handler, then the final one; StreamPredictions2 answers each request of the stream in turn
and reports a failed one inside PredictionResponse.status.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import empty_pb2

from loadgen.lowlevel.torchserve_proto import (
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)
from servers.torchserve._auth import TokenAuth
from servers.torchserve._handler import Answer, Failure, Request
from servers.torchserve._models import ModelManager, RegisterRequest
from servers.torchserve._wire import TsError, gson

__all__ = ["grpc_status", "start_grpc"]

Context = grpc.aio.ServicerContext
_INTERNAL_CLASS = "org.pytorch.serve.http.InternalServerException"
_BY_HTTP = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
            403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
            409: grpc.StatusCode.ABORTED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
            416: grpc.StatusCode.OUT_OF_RANGE, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
            499: grpc.StatusCode.CANCELLED, 501: grpc.StatusCode.UNIMPLEMENTED,
            503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


def grpc_status(http_status: int) -> grpc.StatusCode:
    """TorchServe's GRPCUtils.getGRPCStatusCode: the gRPC status of an HTTP-like code."""
    if http_status in _BY_HTTP:
        return _BY_HTTP[http_status]
    if 200 <= http_status < 300:
        return grpc.StatusCode.OK
    if 400 <= http_status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    if 500 <= http_status < 600:
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.UNKNOWN


class _Refusal(Exception):
    """A call to end with `code` and `details` (raised inside, answered at the RPC's top)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


async def _authorize(auth: TokenAuth, kind: str, context: Context) -> None:
    if not auth.enabled:
        return
    metadata = dict(context.invocation_metadata() or ())
    try:
        auth.check(kind, metadata.get("authorization"))
    except TsError as error:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, error.message)


class InferenceService(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """InferenceAPIsService over one ModelManager (method names are the proto's RPC names)."""

    def __init__(self, models: ModelManager, auth: TokenAuth) -> None:
        self._models = models
        self._auth = auth

    async def Ping(self, request: empty_pb2.Empty,
                   context: Context) -> inference_pb2.TorchServeHealthResponse:
        await _authorize(self._auth, "inference", context)
        health = "Healthy" if self._models.healthy() else "Unhealthy"
        return inference_pb2.TorchServeHealthResponse(health=gson({"status": health}))

    async def Predictions(self, request: inference_pb2.PredictionsRequest,
                          context: Context) -> inference_pb2.PredictionResponse:
        await _authorize(self._auth, "inference", context)
        try:
            answer = await self._predict(request)
        except _Refusal as refusal:
            await context.abort(refusal.code, refusal.details)
        return inference_pb2.PredictionResponse(prediction=answer.body)

    async def StreamPredictions(self, request: inference_pb2.PredictionsRequest,
                                context: Context) -> AsyncIterator[inference_pb2.PredictionResponse]:
        await _authorize(self._auth, "inference", context)
        parts: asyncio.Queue[Answer | _Refusal] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def run() -> None:
            try:
                outcome: Answer | _Refusal = await self._predict(
                    request, lambda part: loop.call_soon_threadsafe(parts.put_nowait, part))
            except _Refusal as refusal:
                outcome = refusal
            parts.put_nowait(outcome)  # after every part: they were queued before the answer was settled

        task = asyncio.ensure_future(run())
        try:
            while True:
                item = await parts.get()
                if isinstance(item, _Refusal):
                    await context.abort(item.code, item.details)
                yield inference_pb2.PredictionResponse(prediction=item.body)
                if item.final:
                    return
        finally:
            task.cancel()

    async def StreamPredictions2(self, requests: AsyncIterator[inference_pb2.PredictionsRequest],
                                 context: Context) -> AsyncIterator[inference_pb2.PredictionResponse]:
        await _authorize(self._auth, "inference", context)
        async for request in requests:
            sequence = {"sequence_id": request.sequence_id} if request.HasField("sequence_id") else {}
            try:
                answer = await self._predict(request)
            except _Refusal as refusal:
                status = _rpc_status(refusal.code.value[0], refusal.details)
                yield inference_pb2.PredictionResponse(status=status, **sequence)
                continue
            yield inference_pb2.PredictionResponse(prediction=answer.body, **sequence)

    async def _predict(self, request: inference_pb2.PredictionsRequest,
                       on_part: Callable[[Answer], None] | None = None) -> Answer:
        arrival_ns = time.perf_counter_ns()
        if not request.model_name:
            raise _Refusal(grpc.StatusCode.INTERNAL,
                           "Parameter model_name is required.\nBadRequestException.()")
        parameters = [(name, "", value) for name, value in request.input.items()]
        job = Request(str(uuid.uuid4()), parameters, {}, on_part)
        try:
            outcome = await self._models.predict(request.model_name, request.model_version or None, job,
                                                 arrival_ns)
        except TsError as error:
            if error.type == "ServiceUnavailableException":  # no worker: InternalServerException over gRPC
                details = f"{error.message}\nInternalServerException.()"
            else:
                details = error.grpc_details()
            raise _Refusal(grpc.StatusCode.INTERNAL, details) from None
        if isinstance(outcome, Failure):
            raise _Refusal(grpc_status(outcome.code), f"{outcome.message}\n{_INTERNAL_CLASS}")
        if not 200 <= outcome.status < 300:
            text = outcome.body.decode(errors="replace")
            raise _Refusal(grpc_status(outcome.status), f"{text}\n{_INTERNAL_CLASS}")
        return outcome


_RPC_STATUS = type(inference_pb2.PredictionResponse().status)
"""google.rpc.Status, whichever module defines it (googleapis-common-protos or the copy in proto/)."""


def _rpc_status(code: int, message: str) -> Any:
    return _RPC_STATUS(code=code, message=message)


class ManagementService(management_pb2_grpc.ManagementAPIsServiceServicer):
    """ManagementAPIsService over one ModelManager (method names are the proto's RPC names)."""

    def __init__(self, models: ModelManager, auth: TokenAuth) -> None:
        self._models = models
        self._auth = auth

    async def _call(self, context: Context, work: Any) -> management_pb2.ManagementResponse:
        """Authorize, run `work` (a coroutine or a callable giving the msg), map refusals to statuses."""
        await _authorize(self._auth, "management", context)
        try:
            message = await work() if asyncio.iscoroutinefunction(work) else work()
        except TsError as error:
            code, details = _management_status(error)
            await context.abort(code, details)
        except _Refusal as refusal:
            await context.abort(refusal.code, refusal.details)
        return management_pb2.ManagementResponse(msg=message)

    async def DescribeModel(self, request: management_pb2.DescribeModelRequest,
                            context: Context) -> management_pb2.ManagementResponse:
        async def describe() -> str:
            served = self._models.describe(request.model_name, request.model_version or None)
            answers = []
            for entry in served:
                described = entry.describe()
                if request.customized:
                    try:
                        described["customizedMetadata"] = await self._models.describe_custom(entry)
                    except TsError as error:
                        details = f"{error.message}\nInternalServerException.()"
                        raise _Refusal(grpc.StatusCode.INTERNAL, details) from None
                answers.append(described)
            return gson(answers)

        return await self._call(context, describe)

    async def ListModels(self, request: management_pb2.ListModelsRequest,
                         context: Context) -> management_pb2.ManagementResponse:
        return await self._call(context, lambda: gson(self._models.list_models(request.limit,
                                                                                request.next_page_token)))

    async def RegisterModel(self, request: management_pb2.RegisterModelRequest,
                            context: Context) -> management_pb2.ManagementResponse:
        async def register() -> str:
            self._require_model_api()
            status, message = await self._models.register(_register_request(request, self._models))
            if status >= 300:
                raise _Refusal(grpc_status(status), f"{message}\n{_INTERNAL_CLASS}")
            return message

        return await self._call(context, register)

    async def ScaleWorker(self, request: management_pb2.ScaleWorkerRequest,
                          context: Context) -> management_pb2.ManagementResponse:
        async def scale() -> str:
            low = request.min_worker if request.min_worker > 0 else 1
            high = request.max_worker if request.max_worker > 0 else low
            status, message = await self._models.scale(request.model_name, request.model_version or None,
                                                       low, high, request.synchronous)
            if status >= 300:
                raise _Refusal(grpc_status(status), f"{message}\n{_INTERNAL_CLASS}")
            return message

        return await self._call(context, scale)

    async def SetDefault(self, request: management_pb2.SetDefaultRequest,
                         context: Context) -> management_pb2.ManagementResponse:
        return await self._call(context,
                                lambda: self._models.set_default(request.model_name, request.model_version))

    async def UnregisterModel(self, request: management_pb2.UnregisterModelRequest,
                              context: Context) -> management_pb2.ManagementResponse:
        def unregister() -> str:
            self._require_model_api()
            if not request.model_name:
                # sic: TorchServe's text for a missing model name
                raise TsError(400, "BadRequestException", "Parameter url is required.")
            return self._models.unregister(request.model_name, request.model_version or None)

        return await self._call(context, unregister)

    def _require_model_api(self) -> None:
        if not self._models.settings.model_api:
            raise _Refusal(grpc.StatusCode.PERMISSION_DENIED,
                           "Model API disabled\norg.pytorch.serve.archive.model.ModelException")


def _register_request(request: management_pb2.RegisterModelRequest, models: ModelManager) -> RegisterRequest:
    """A gRPC register call as TorchServe reads it: proto3's zero values mean "not given"."""
    def given(value: int) -> int:
        return value if value > 0 else -1

    return RegisterRequest(
        url=request.url or None, model_name=request.model_name or None, batch_size=given(request.batch_size),
        max_batch_delay=given(request.max_batch_delay),
        initial_workers=request.initial_workers if request.initial_workers > 0
        else models.settings.default_workers_per_model,
        synchronous=request.synchronous, response_timeout=given(request.response_timeout),
        startup_timeout=given(request.startup_timeout), runtime=request.runtime or None,
        handler=request.handler or None,
    )


def _management_status(error: TsError) -> tuple[grpc.StatusCode, str]:
    """ManagementImpl's mapping: not found -> NOT_FOUND, a bad request -> INVALID_ARGUMENT; the
    IllegalArgumentExceptions it does not catch (conflict, removing the default version) -> UNKNOWN."""
    if error.type in ("ConflictStatusException", "InvalidModelVersionException"):
        return grpc.StatusCode.UNKNOWN, ""
    if error.code == 404:
        return grpc.StatusCode.NOT_FOUND, error.grpc_details()
    if error.code == 400:
        return grpc.StatusCode.INVALID_ARGUMENT, error.grpc_details()
    return grpc.StatusCode.INTERNAL, error.grpc_details()


async def start_grpc(api: str, models: ModelManager, auth: TokenAuth, host: str,
                     port: int) -> tuple[grpc.aio.Server, int]:
    """Serve "grpc-inference" or "grpc-management" on host:port (0 picks a free port); returns the
    server and its bound port. A request message over max_request_size is refused RESOURCE_EXHAUSTED,
    as TorchServe's (maxInboundMessageSize); answers are not limited here, as TorchServe's are not: a
    handler's answer over max_response_size ends its worker before it gets here (_workers.py)."""
    options = [("grpc.max_receive_message_length", models.settings.max_request_size)]
    server = grpc.aio.server(options=options)
    if api == "grpc-inference":
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(InferenceService(models, auth), server)
    else:
        service = ManagementService(models, auth)
        management_pb2_grpc.add_ManagementAPIsServiceServicer_to_server(service, server)
    shown = f"[{host}]" if ":" in host else host
    bound = server.add_insecure_port(f"{shown}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {api} to {shown}:{port}")
    await server.start()
    return server, bound
