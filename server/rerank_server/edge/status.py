"""The one place that maps the server's errors to what each transport sends: a gRPC status code
and an HTTP status."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

import grpc

from rerank_server.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    MessageTooLargeError,
    ModelError,
    ModelNotFoundError,
    NoReplicaError,
    OverloadedError,
    ReplicaLostError,
    UnauthenticatedError,
)

log = logging.getLogger(__name__)

STATUS_OF_ERROR: dict[type[Exception], tuple[grpc.StatusCode, int]] = {
    InvalidRequestError: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    MessageTooLargeError: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    ModelNotFoundError: (grpc.StatusCode.NOT_FOUND, 404),
    OverloadedError: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    NoReplicaError: (grpc.StatusCode.UNAVAILABLE, 503),
    ReplicaLostError: (grpc.StatusCode.UNAVAILABLE, 503),
    DeadlineExceededError: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ModelError: (grpc.StatusCode.INTERNAL, 500),  # its message is generic; the log has the detail
    UnauthenticatedError: (grpc.StatusCode.UNAUTHENTICATED, 401),
}
INTERNAL = (grpc.StatusCode.INTERNAL, 500)


@dataclass(frozen=True)
class ErrorStatus:
    """What a client sees for an error: the gRPC code, the HTTP status, and the message."""

    code: grpc.StatusCode
    http_status: int
    message: str


def error_status(error: Exception) -> ErrorStatus:
    """The statuses and message a client sees for an error; unknown errors are INTERNAL (500)."""
    for error_type, (code, http_status) in STATUS_OF_ERROR.items():
        if isinstance(error, error_type):
            return ErrorStatus(code, http_status, str(error))
    # Where it failed, not the error's text: that may quote a caller's query or documents.
    where = "".join(traceback.format_tb(error.__traceback__))
    log.error("unexpected error %s, traceback:\n%s", type(error).__name__, where)
    return ErrorStatus(*INTERNAL, f"internal error: {type(error).__name__}: {error}")


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a client sees for an error."""
    status = error_status(error)
    return status.code, status.message
