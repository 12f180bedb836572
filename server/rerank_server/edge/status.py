"""The one place that maps the server's errors to gRPC status codes."""

from __future__ import annotations

import logging
import traceback

import grpc

from rerank_server.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelError,
    ModelNotFoundError,
    NoReplicaError,
    OverloadedError,
    ReplicaLostError,
    UnauthenticatedError,
)

log = logging.getLogger(__name__)

STATUS_OF_ERROR: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NoReplicaError: grpc.StatusCode.UNAVAILABLE,
    ReplicaLostError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelError: grpc.StatusCode.INTERNAL,  # its message is generic; the log has the detail
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
}


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for an error; unknown errors are INTERNAL."""
    for error_type, code in STATUS_OF_ERROR.items():
        if isinstance(error, error_type):
            return code, str(error)
    # Where it failed, not the error's text: that may quote a caller's query or documents.
    where = "".join(traceback.format_tb(error.__traceback__))
    log.error("unexpected error %s, traceback:\n%s", type(error).__name__, where)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
