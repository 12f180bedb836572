"""Bearer tokens on the gRPC port: the accepted tokens, and the interceptor that checks every call.

Health checks stay open, so load balancers and container probes need no token. Neither the tokens
nor what a caller sent is ever logged or echoed: only how many tokens are loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from rerank_server.edge.status import status_of
from rerank_server.errors import UnauthenticatedError

log = logging.getLogger(__name__)

#: Methods served without a token: the standard health service.
OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"
REFUSAL = "missing or invalid bearer token"


def _read_digests(path: str) -> tuple[bytes, ...]:
    """SHA-256 digests of the tokens in `path`, one a line (blank lines and surrounding whitespace
    ignored); ValueError when the file cannot be read or holds no token."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read --auth-tokens-file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"--auth-tokens-file {path} is not UTF-8 text") from exc
    tokens = {line.strip() for line in text.splitlines()} - {""}
    if not tokens:
        raise ValueError(f"--auth-tokens-file {path} holds no token")
    return tuple(hashlib.sha256(token.encode()).digest() for token in tokens)


class TokenStore:
    """The accepted bearer tokens, read from a file at start and again on reload() (SIGHUP).

    Only the tokens' SHA-256 digests are kept. A check compares the digest of what the caller sent
    with every token's, all of equal length and without stopping at a match, so its time tells
    neither which token matched nor how much of one.
    """

    def __init__(self, path: str) -> None:
        """Read `path`; ValueError says why it cannot serve (unreadable, or no token in it)."""
        self.path = path
        self._digests = _read_digests(path)
        log.info("bearer tokens: %d loaded from %s", len(self._digests), path)

    def reload(self) -> bool:
        """Reread the file; when it cannot be read or is empty, keep the tokens loaded before, so a
        half-written file neither locks every client out nor lets every caller in."""
        try:
            digests = _read_digests(self.path)
        except ValueError as exc:
            log.error("bearer tokens not reloaded, %d kept: %s", len(self._digests), exc)
            return False
        self._digests = digests
        log.info("bearer tokens: %d reloaded from %s", len(digests), self.path)
        return True

    def accepts(self, token: str) -> bool:
        """Whether `token` is one of the accepted tokens, in time independent of which or how much."""
        candidate = hashlib.sha256(token.encode()).digest()
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's first `authorization: Bearer <token>` entry (the scheme in any case)."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but a health check with UNAUTHENTICATED unless it carries an accepted
    bearer token; reflection is refused too, so it shows nothing to a caller without one."""

    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler_call_details.method.startswith(OPEN_METHOD_PREFIX):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and self._tokens.accepts(token):
            return handler
        return refusing_handler(handler)


def refusing_handler(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary or streaming each way) that only refuses the
    call; it never deserializes the request, so an unauthenticated caller's bytes are not parsed."""
    code, message = status_of(UnauthenticatedError(REFUSAL))

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    request_streaming = handler is not None and handler.request_streaming
    response_streaming = handler is not None and handler.response_streaming
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
