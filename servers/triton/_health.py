"""gRPC's standard health service (`grpc.health.v1.Health/Check`) on the Triton-compatible server's gRPC port.

tritonserver registers this service beside GRPCInferenceService (PROTOCOLS.md 2.1) so that load
balancers and Kubernetes' gRPC probes can ask whether it serves. Its Check answers from server
readiness alone, whatever service name is asked about: SERVING when the server is ready, NOT_SERVING
when it is not (with strict readiness, a model asked for that failed to load). Watch is not served by
tritonserver, and is not here either (UNIMPLEMENTED).

The two messages (HealthCheckRequest{string service = 1}, HealthCheckResponse{ServingStatus status =
1}) come from a descriptor built here at import, in a pool of its own, so neither a generated module
nor the grpcio-health-checking package is needed, and that package's own health.proto, if it is ever
imported, cannot clash with this one.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["HEALTH_SERVICE", "HealthCheckRequest", "HealthCheckResponse", "ServingStatus", "health_handler"]

HEALTH_SERVICE = "grpc.health.v1.Health"
"""The full service name; its Check method is `/grpc.health.v1.Health/Check`."""


class ServingStatus:
    """HealthCheckResponse.ServingStatus values (health.proto)."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3


def _health_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/health/v1/health.proto's two messages, as protoc would describe them."""
    proto = descriptor_pb2.FileDescriptorProto(name="grpc/health/v1/health.proto", package="grpc.health.v1",
                                               syntax="proto3")
    field = descriptor_pb2.FieldDescriptorProto
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL,
                      json_name="service")
    response = proto.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for name in ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"):
        status.value.add(name=name, number=getattr(ServingStatus, name))
    response.field.add(name="status", number=1, type=field.TYPE_ENUM, label=field.LABEL_OPTIONAL,
                       type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus", json_name="status")
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_health_file())
HealthCheckRequest = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
HealthCheckResponse = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse"))


def health_handler(ready: Callable[[], bool]) -> grpc.GenericRpcHandler:
    """The handler of `grpc.health.v1.Health` for a grpc.aio server; `ready()` is the server's readiness.

    Example:
        server.add_generic_rpc_handlers((health_handler(host.ready),))
    """
    async def check(request: HealthCheckRequest, context: grpc.aio.ServicerContext) -> HealthCheckResponse:
        return HealthCheckResponse(status=ServingStatus.SERVING if ready() else ServingStatus.NOT_SERVING)

    method = grpc.unary_unary_rpc_method_handler(check, request_deserializer=HealthCheckRequest.FromString,
                                                 response_serializer=HealthCheckResponse.SerializeToString)
    return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {"Check": method})
