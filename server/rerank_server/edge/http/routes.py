"""The HTTP routes (a Starlette app): POST /v1/rerank and /v2/rerank, GET /v1/models and /health.

A rerank call is the same call as gRPC's Rerank: the same gate of calls in flight, the same data
plane and limits, max_call_s as its deadline (these SDKs send none), and the same observation
(`edge.calls`: metrics, log line, span, calls in flight for the drain) under the method name
"POST /v2/rerank" or "POST /v1/rerank". Every error is `{"message": ...}` with the status
`edge.status` gives it. Every response carries `x-request-id`: the caller's when sane, else a new
one. With tokens, every route but /health needs `Authorization: Bearer <token>`; a refused call is
turned away before it is served, as on the gRPC port (no call line, not counted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from rerank_server.edge.auth import REFUSAL, TokenStore, bearer_token
from rerank_server.edge.calls import Calls, off_the_loop
from rerank_server.edge.http import convert
from rerank_server.edge.http.convert import Api
from rerank_server.edge.status import error_status
from rerank_server.errors import MessageTooLargeError, UnauthenticatedError
from rerank_server.logs import REQUEST_ID_KEY, request_id
from rerank_server.service.request import MIB
from rerank_server.service.rerank import RerankService
from rerank_server.types import RerankResult

ROUTES = "POST /v1/rerank, POST /v2/rerank, GET /v1/models, GET /health"
# Bodies and replies larger than this are parsed and encoded in a thread, so the event loop keeps
# answering (health checks, small calls) meanwhile; smaller ones cost less than the hand-off.
BYTES_ON_THE_LOOP = 256 * 1024
RESULTS_ON_THE_LOOP = 256

_T = TypeVar("_T")


class HttpRoutes:
    """The routes over one server's data plane and calls."""

    def __init__(
        self,
        service: RerankService,
        calls: Calls,
        *,
        tokens: TokenStore | None,
        max_body_bytes: int,
        serving: Callable[[], bool],
    ) -> None:
        """`serving()`: whether the server takes calls now (some model has a replica, not draining)."""
        self._service = service
        self._calls = calls
        self._tokens = tokens
        self._max_body_bytes = max_body_bytes
        self._serving = serving

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/rerank", partial(self._rerank, Api.V1), methods=["POST"]),
                Route("/v2/rerank", partial(self._rerank, Api.V2), methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._routing_error},
        )

    async def _rerank(self, api: Api, request: Request) -> Response:
        headers = request.headers
        if not self._authenticated(request):
            return _refusal(headers.get(REQUEST_ID_KEY))
        method = f"POST /v{api.value}/rerank"
        with self._calls.observe(
            method, sent_request_id=headers.get(REQUEST_ID_KEY), peer=_peer(request), metadata=headers
        ) as call:
            try:
                with self._calls.reranks.admit():
                    async with self._calls.deadline() as timeout:
                        body = await self._body(request)
                        parsed = await off_the_loop(
                            len(body) > BYTES_ON_THE_LOOP,
                            convert.rerank_request,
                            body,
                            api,
                            self._max_length_limit,
                        )
                        query = parsed.query
                        call.asked(query.model, query.query, query.documents)
                        result = await _unless_disconnected(request, self._service.rerank(query, timeout))
                call.answered(result)
                large = len(result.results) > RESULTS_ON_THE_LOOP or (
                    query.return_documents and len(body) > BYTES_ON_THE_LOOP
                )
                reply = await off_the_loop(
                    large,
                    _encode_reply,
                    result,
                    api,
                    call.request_id,
                    parsed.sent_documents,
                )
                return _json(reply, 200, call.request_id)
            except ClientDisconnect:
                call.code = "CANCELLED"  # the client went away: no one reads a reply
                return Response(status_code=499)
            except Exception as exc:
                status = call.failed(exc)
                return _json(
                    convert.encode(convert.error_body(status.message)), status.http_status, call.request_id
                )

    def _max_length_limit(self, model: str) -> int:
        return self._service.models.get(model).max_length_limit

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) past max_body_bytes before it is parsed: at once when
        Content-Length says so, else as soon as the bytes received pass it."""
        limit = self._max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _models(self, request: Request) -> Response:
        sent_id = request.headers.get(REQUEST_ID_KEY)
        if not self._authenticated(request):
            return _refusal(sent_id)
        body = convert.models_response(self._service.list_models())
        return _json(convert.encode(body), 200, request_id(sent_id))

    async def _health(self, request: Request) -> Response:
        """200 while the server takes calls, 503 while it does not (loading, no replica, draining):
        what a load balancer's health check asks. Open: no token needed."""
        serving = self._serving()
        body = {"status": "SERVING" if serving else "NOT_SERVING"}
        return _json(
            convert.encode(body), 200 if serving else 503, request_id(request.headers.get(REQUEST_ID_KEY))
        )

    async def _routing_error(self, request: Request, exc: Exception) -> Response:
        """An unknown route (404) or method (405), in the same {"message": ...} shape."""
        assert isinstance(exc, HTTPException)
        message = f"{request.method} {request.url.path}: {exc.detail}; the routes are {ROUTES}"
        return _json(
            convert.encode(convert.error_body(message)),
            exc.status_code,
            request_id(request.headers.get(REQUEST_ID_KEY)),
            dict(exc.headers or {}),
        )

    def _authenticated(self, request: Request) -> bool:
        if self._tokens is None:
            return True
        token = bearer_token(request.headers.items())
        return token is not None and self._tokens.accepts(token)


def _refusal(sent_id: str | None) -> Response:
    status = error_status(UnauthenticatedError(REFUSAL))
    body = convert.encode(convert.error_body(status.message))
    return _json(body, status.http_status, request_id(sent_id), {"www-authenticate": "Bearer"})


def _too_large(size: int, limit: int) -> MessageTooLargeError:
    return MessageTooLargeError(
        f"the request body of {size / MIB:.1f} MiB or more is over the limit of {limit / MIB:g} MiB "
        "(max_message_mb)"
    )


def _encode_reply(result: RerankResult, api: Api, call_id: str, sent_documents: list[Any]) -> bytes:
    return convert.encode(convert.rerank_response(result, api, call_id, sent_documents))


def _json(body: bytes, status: int, call_id: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        body, status, headers={REQUEST_ID_KEY: call_id, **(headers or {})}, media_type="application/json"
    )


def _peer(request: Request) -> str:
    """The caller's address as gRPC names a peer (ipv4:HOST:PORT, ipv6:[HOST]:PORT)."""
    if request.client is None:
        return ""
    host, port = request.client
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


async def _unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """`work`, unless the client goes away first: then it is cancelled (its queued pairs dropped, as
    for a cancelled gRPC call) and ClientDisconnect raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait((task,))  # its cleanup done before the call counts as ended
        raise ClientDisconnect
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client disconnects (the body is read by now: all that comes is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
