"""The gRPC servicer: a thin adapter between protobuf and the data plane."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from rerank.v1 import reranker_pb2 as pb
from rerank.v1 import reranker_pb2_grpc as pb_grpc

from rerank_server.edge import convert
from rerank_server.edge.status import status_of
from rerank_server.errors import InvalidRequestError
from rerank_server.metrics import Metrics
from rerank_server.service.rerank import RerankService


class CallsInFlight:
    """RPCs being served, so a drain can wait for them before it stops the gRPC server."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def exit(self) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no RPC is in flight; False if some still are after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class RerankerServicer(pb_grpc.RerankerServicer):
    def __init__(self, service: RerankService, metrics: Metrics) -> None:
        self._service = service
        self._metrics = metrics
        self.calls = CallsInFlight()

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        with self._observe("Rerank") as outcome:
            try:
                result = await self._service.rerank(convert.rerank_query(request), context.time_remaining())
                return convert.rerank_response(result)
            except Exception as exc:
                await outcome.abort(context, exc)

    async def StreamRerank(
        self, request_iterator: AsyncIterator[pb.StreamRerankRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamRerankResponse]:
        with self._observe("StreamRerank") as outcome:
            try:
                first = await anext(request_iterator, None)
                if first is None or first.WhichOneof("kind") != "header":
                    raise InvalidRequestError("the first StreamRerank message must be a header")
                header = convert.rerank_query(first.header)
                self._service.check_stream(header)
                await context.send_initial_metadata(())  # accepted: the client may send the rest
                events = self._service.stream_rerank(
                    header, _document_chunks(request_iterator), context.time_remaining()
                )
                async for event in events:
                    yield convert.stream_response(event)
            except Exception as exc:
                await outcome.abort(context, exc)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return convert.list_models_response(self._service.list_models())

    def _observe(self, method: str) -> _Outcome:
        return _Outcome(self._metrics, method, self.calls)


class _Outcome:
    """Ends an RPC with the status its error maps to; counts the RPC by status code and times it."""

    def __init__(self, metrics: Metrics, method: str, calls: CallsInFlight) -> None:
        self._metrics = metrics
        self._method = method
        self._calls = calls
        self._code = grpc.StatusCode.OK

    async def abort(self, context: grpc.aio.ServicerContext, error: Exception) -> NoReturn:
        self._code, message = status_of(error)
        await context.abort(self._code, message)
        raise AssertionError("unreachable: context.abort raises")

    def __enter__(self) -> _Outcome:
        self._started = time.perf_counter()
        self._calls.enter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        code = self._code
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        self._metrics.requests.labels(self._method, code.name).inc()
        self._metrics.request_seconds.labels(self._method).observe(time.perf_counter() - self._started)
        self._calls.exit()


async def _document_chunks(
    request_iterator: AsyncIterator[pb.StreamRerankRequest],
) -> AsyncIterator[list[str]]:
    async for message in request_iterator:
        if message.WhichOneof("kind") != "documents":
            raise InvalidRequestError("only the first StreamRerank message may be a header")
        yield list(message.documents.documents)
