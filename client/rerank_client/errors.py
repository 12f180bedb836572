"""Typed errors: a failed call raises the RerankError subclass of its gRPC status code.

Callers catch what they can act on (fix the request, back off, retry later) without comparing
status codes, and never see raw grpc.RpcError objects.
"""

from __future__ import annotations

import grpc


class RerankError(Exception):
    """A call failed with gRPC status `code`; `message` is the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name


class InvalidArgumentError(RerankError):
    """The request is wrong (unknown option value, pair too long with truncate=False): fix it."""


class NotFoundError(RerankError):
    """The named model (or health service) does not exist on this server."""


class ResourceExhaustedError(RerankError):
    """The server is overloaded or the request is too large; retried by the default RetryPolicy."""


class UnavailableError(RerankError):
    """The server could not be reached or is shutting down; retried by the default RetryPolicy."""


class DeadlineExceededError(RerankError):
    """The call's timeout expired before the server answered."""


class UnauthenticatedError(RerankError):
    """The server wants a bearer token (`token=`) and this call carried none it accepts."""


class CancelledError(RerankError):
    """The call was cancelled, by the server or the transport."""


class InternalError(RerankError):
    """The server failed, or broke the protocol (a stream that ends without its final result)."""


_BY_CODE: dict[grpc.StatusCode, type[RerankError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def from_rpc_error(error: grpc.RpcError) -> RerankError:
    """The typed error for a failed call (grpc or grpc.aio); codes without a subclass give RerankError.

    A bare grpc.RpcError (raised by some interceptors) carries no status: it maps to UNKNOWN.
    """
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details = details_of() if callable(details_of) else None
    return _BY_CODE.get(code, RerankError)(code, details or "")
