"""The server's own errors; `edge.status` maps each to a gRPC status code and an HTTP status."""

from __future__ import annotations


class RerankServerError(Exception):
    """Base class: the message is what the client reads."""


class InvalidRequestError(RerankServerError):
    pass


class ModelNotFoundError(RerankServerError):
    pass


class OverloadedError(RerankServerError):
    """The queue is full: fail at once so the caller can back off or go elsewhere."""


class NoReplicaError(RerankServerError):
    """No model replica can take work now (none loaded yet, all dead, or draining)."""


class ReplicaLostError(RerankServerError):
    """A replica died twice while holding the same pairs."""


class ModelError(RerankServerError):
    """The model raised on a request's pairs, even run apart from other requests' pairs.

    The message is generic on purpose: the exception's own text may echo user input, so only the
    server's log carries it.
    """

    def __init__(self) -> None:
        super().__init__("the model failed on this request")


class DeadlineExceededError(RerankServerError):
    pass


class MessageTooLargeError(RerankServerError):
    """A request body over the message size limit, refused before it is parsed."""


class UnauthenticatedError(RerankServerError):
    """The call carries no accepted bearer token; the message never repeats what it sent."""
