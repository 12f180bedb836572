"""The standard grpc.health.v1.Health/Check call, without grpcio-health-checking.

Its two messages are built here from a FileDescriptorProto, in a private descriptor pool: a
process that also imports grpc_health's health_pb2 (the server does) registers the same names in
the default pool, and two definitions of one name there would clash.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"

#: The ServingStatus values, by number, as grpc/health/v1/health.proto defines them.
STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def _build_pool() -> descriptor_pool.DescriptorPool:
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="rerank_client/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    serving_status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(STATUSES):
        serving_status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=field.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=field.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool


_POOL = _build_pool()
_Request = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
_Response = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse"))
_STATUS_FIELD = _Response.DESCRIPTOR.fields_by_name["status"]
_STATUS_NAMES = _Response.DESCRIPTOR.enum_types_by_name["ServingStatus"].values_by_number


def encode_request(service: str) -> bytes:
    """Request serializer: the call takes the service name itself."""
    return _Request(service=service).SerializeToString()


def decode_status(data: bytes) -> str:
    """Response deserializer: the call returns the status name; a number newer than this code is UNKNOWN."""
    number = getattr(_Response.FromString(data), _STATUS_FIELD.name)
    value = _STATUS_NAMES.get(number)
    return value.name if value is not None else STATUSES[0]
