"""The gRPC servicer: a thin adapter between protobuf and the data plane.

Calls are admitted, bounded in time and observed as `edge.calls` says for both transports; here
only what gRPC adds: the client's deadline, the request id as `x-request-id` metadata (trailing, and
initial on an accepted stream), and a stream whose client reads nothing for the idle timeout is
ended (the session itself watches the client's sending).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from rerank.v1 import reranker_pb2 as pb
from rerank.v1 import reranker_pb2_grpc as pb_grpc

from rerank_server.edge import convert
from rerank_server.edge.calls import Calls, ObservedCall, off_the_loop
from rerank_server.errors import DeadlineExceededError, InvalidRequestError
from rerank_server.logs import REQUEST_ID_KEY, CallRecord
from rerank_server.service.rerank import RerankService
from rerank_server.types import RerankResult


class RerankerServicer(pb_grpc.RerankerServicer):
    def __init__(self, service: RerankService, calls: Calls) -> None:
        self._service = service
        self.calls = calls

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        with self._call("Rerank", context) as call:
            try:
                call.asked(request.model, request.query, request.documents)
                with self.calls.reranks.admit():
                    async with self.calls.deadline(context.time_remaining()) as timeout:
                        large = len(request.documents) > DOCUMENTS_ON_THE_LOOP
                        query = await off_the_loop(large, convert.rerank_query, request)
                        result = await self._service.rerank(query, timeout)
                call.answered(result)
                return convert.rerank_response(result)
            except Exception as exc:
                await self._abort(call, context, exc)
        return pb.RerankResponse()  # never sent: gRPC ends an aborted call with its status

    async def StreamRerank(  # type: ignore[override]  # a coroutine: gRPC takes either form
        self, request_iterator: AsyncIterator[pb.StreamRerankRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Responses go out through context.write, not yield, so each write can be bounded by the
        idle timeout."""
        with self._call("StreamRerank", context) as call:
            try:
                async with self.calls.deadline(context.time_remaining()) as timeout:
                    # The header first, then any refusal: refusing while the client still writes
                    # its first message races in gRPC core (grpc issue 36066).
                    first = await self._header(request_iterator)
                    call.asked(first.model, first.query, first.documents)
                    with self.calls.streams.admit():
                        await self._stream(first, request_iterator, context, timeout, call)
            except Exception as exc:
                await self._abort(call, context, exc)

    async def _header(self, request_iterator: AsyncIterator[pb.StreamRerankRequest]) -> pb.RerankRequest:
        idle = self.calls.limits.stream_idle_timeout_s
        try:
            first = await asyncio.wait_for(anext(request_iterator, None), idle)
        except TimeoutError:
            raise DeadlineExceededError(
                f"the client sent no header for {idle:g} s (stream_idle_timeout_s)"
            ) from None
        if first is None or first.WhichOneof("kind") != "header":
            raise InvalidRequestError("the first StreamRerank message must be a header")
        return first.header

    async def _stream(
        self,
        first: pb.RerankRequest,
        request_iterator: AsyncIterator[pb.StreamRerankRequest],
        context: grpc.aio.ServicerContext,
        timeout: float,
        call: ObservedCall,
    ) -> None:
        header = await off_the_loop(len(first.documents) > DOCUMENTS_ON_THE_LOOP, convert.rerank_query, first)
        self._service.check_stream(header)
        # Accepted: the client may send the rest.
        await context.send_initial_metadata(((REQUEST_ID_KEY, call.request_id),))
        idle = self.calls.limits.stream_idle_timeout_s
        chunks = _document_chunks(request_iterator, call.record)
        events = self._service.stream_rerank(header, chunks, timeout, idle)
        # Closed on any exit, so the stream's queued pairs are dropped at once.
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, RerankResult):
                    call.answered(event)
                try:
                    async with asyncio.timeout(idle):
                        await context.write(convert.stream_response(event))
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"the client read nothing for {idle:g} s (stream_idle_timeout_s)"
                    ) from None

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return convert.list_models_response(self._service.list_models())

    def _call(self, method: str, context: grpc.aio.ServicerContext) -> ObservedCall:
        sent = context.invocation_metadata() or ()
        metadata = {key: value for key, value in sent if isinstance(value, str)}
        call = self.calls.observe(
            method, sent_request_id=metadata.get(REQUEST_ID_KEY), peer=context.peer(), metadata=metadata
        )
        # Trailing metadata goes with the status, whatever it is.
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        return call

    async def _abort(self, call: ObservedCall, context: grpc.aio.ServicerContext, error: Exception) -> None:
        """Send the status (context.abort raises). Behind responses a client does not read, the
        status waits too: past the stream idle timeout the handler ends anyway, and gRPC sends the
        status once the client reads, or drops the call when the client goes."""
        status = call.failed(error)
        try:
            await asyncio.wait_for(
                context.abort(status.code, status.message), self.calls.limits.stream_idle_timeout_s
            )
        except TimeoutError:
            return
        raise AssertionError("unreachable: context.abort raises")


# A message of more documents than this is converted in a thread, so the event loop keeps answering
# (health checks, small calls) while a message of up to max_message_mb becomes Python strings.
DOCUMENTS_ON_THE_LOOP = 64


async def _document_chunks(
    request_iterator: AsyncIterator[pb.StreamRerankRequest], record: CallRecord
) -> AsyncIterator[list[str]]:
    async for message in request_iterator:
        if message.WhichOneof("kind") != "documents":
            raise InvalidRequestError("only the first StreamRerank message may be a header")
        texts = message.documents.documents
        record.documents += len(texts)
        yield await off_the_loop(len(texts) > DOCUMENTS_ON_THE_LOOP, convert.documents, texts)
