"""The gRPC servicer: a thin adapter between protobuf and the data plane.

It also admits and times calls, which only the transport sees: a call past the limit of calls in
flight is refused at once (RESOURCE_EXHAUSTED naming the limit); every call ends by its effective
deadline, the client's or max_call_s, whichever comes first; a stream whose client reads nothing
for the idle timeout is ended (the session itself watches the client's sending).

Each call is observed here too: counted and timed by method, status code and model, written as one
log line, traced (with tracing on), and named by a request id that goes back to the caller as
`x-request-id` metadata, whatever its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
from rerank.v1 import reranker_pb2 as pb
from rerank.v1 import reranker_pb2_grpc as pb_grpc

from rerank_server.edge import convert
from rerank_server.edge.status import status_of
from rerank_server.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
)
from rerank_server.logs import LOGGED_DOCUMENTS, REQUEST_ID_KEY, CallRecord, request_id
from rerank_server.metrics import Metrics
from rerank_server.service.rerank import RerankService
from rerank_server.tracing import CallSpan, CallTracer
from rerank_server.types import RerankResult

_Message = TypeVar("_Message")
_Own = TypeVar("_Own")


@dataclass(frozen=True)
class CallLimits:
    """How many calls may run at once, and for how long."""

    max_concurrent_calls: int = 1024
    max_concurrent_streams: int = 64
    stream_idle_timeout_s: float = 60.0
    max_call_s: float = 3600.0


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


class CallGate:
    """Calls of one kind in flight; past `limit` a new one is refused at once, not queued."""

    def __init__(self, kind: str, limit: int, setting: str) -> None:
        self.kind = kind
        self.limit = limit
        self.setting = setting
        self.count = 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        if self.count >= self.limit:
            raise OverloadedError(
                f"{self.count} {self.kind} calls in flight, the limit ({self.setting}); retry later"
            )
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


class RerankerServicer(pb_grpc.RerankerServicer):
    def __init__(
        self,
        service: RerankService,
        metrics: Metrics,
        limits: CallLimits | None = None,
        *,
        tracer: CallTracer | None = None,
        log_request_text: bool = False,
    ) -> None:
        self._service = service
        self._metrics = metrics
        self._limits = limits or CallLimits()
        self._tracer = tracer
        self._log_request_text = log_request_text
        self.calls = CallsInFlight()
        self._reranks = CallGate("Rerank", self._limits.max_concurrent_calls, "max_concurrent_calls")
        self._streams = CallGate(
            "StreamRerank", self._limits.max_concurrent_streams, "max_concurrent_streams"
        )

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        with self._call("Rerank", context) as call:
            try:
                call.asked(request)
                with self._reranks.admit():
                    async with self._deadline(context) as timeout:
                        query = await _off_the_loop(convert.rerank_query, request, len(request.documents))
                        result = await self._service.rerank(query, timeout)
                call.answered(result)
                return convert.rerank_response(result)
            except Exception as exc:
                await call.abort(context, exc)
        return pb.RerankResponse()  # never sent: gRPC ends an aborted call with its status

    async def StreamRerank(  # type: ignore[override]  # a coroutine: gRPC takes either form
        self, request_iterator: AsyncIterator[pb.StreamRerankRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Responses go out through context.write, not yield, so each write can be bounded by the
        idle timeout."""
        with self._call("StreamRerank", context) as call:
            try:
                async with self._deadline(context) as timeout:
                    # The header first, then any refusal: refusing while the client still writes
                    # its first message races in gRPC core (grpc issue 36066).
                    first = await self._header(request_iterator)
                    call.asked(first)
                    with self._streams.admit():
                        await self._stream(first, request_iterator, context, timeout, call)
            except Exception as exc:
                await call.abort(context, exc)

    async def _header(self, request_iterator: AsyncIterator[pb.StreamRerankRequest]) -> pb.RerankRequest:
        idle = self._limits.stream_idle_timeout_s
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
        call: _Call,
    ) -> None:
        header = await _off_the_loop(convert.rerank_query, first, len(first.documents))
        self._service.check_stream(header)
        # Accepted: the client may send the rest.
        await context.send_initial_metadata(((REQUEST_ID_KEY, call.record.request_id),))
        idle = self._limits.stream_idle_timeout_s
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

    @contextlib.asynccontextmanager
    async def _deadline(self, context: grpc.aio.ServicerContext) -> AsyncIterator[float]:
        """Runs the call's work until its effective deadline, the client's or max_call_s, whichever
        comes first (yields the seconds left); past it, DeadlineExceededError."""
        remaining = context.time_remaining()
        capped = remaining is None or self._limits.max_call_s < remaining
        timeout = self._limits.max_call_s if capped else remaining
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                yield timeout
        except TimeoutError:
            if not scope.expired():
                raise
            if capped:
                raise DeadlineExceededError(
                    f"the call ran for {timeout:g} s, the longest any call may (max_call_s)"
                ) from None
            raise DeadlineExceededError("the call's deadline passed") from None

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return convert.list_models_response(self._service.list_models())

    def _call(self, method: str, context: grpc.aio.ServicerContext) -> _Call:
        return _Call(
            method,
            context,
            self._metrics,
            self.calls,
            self._limits.stream_idle_timeout_s,
            served_name=self._served_name,
            tracer=self._tracer,
            log_request_text=self._log_request_text,
        )

    def _served_name(self, requested: str) -> str:
        """The served model a call names ("" = the default), or "" when none is served by that name:
        metrics label calls by it, so it never takes a caller's unchecked text."""
        with contextlib.suppress(ModelNotFoundError):
            return self._service.models.get(requested).name
        return ""


class _Call:
    """One RPC: ends it with the status its error maps to; returns its request id as metadata; counts
    and times it by method, code and model; writes its log line and ends its span."""

    def __init__(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        metrics: Metrics,
        calls: CallsInFlight,
        status_wait_s: float,
        *,
        served_name: Callable[[str], str],
        tracer: CallTracer | None,
        log_request_text: bool,
    ) -> None:
        self._method = method
        self._metrics = metrics
        self._calls = calls
        self._status_wait_s = status_wait_s
        self._served_name = served_name
        self._log_request_text = log_request_text
        self._code = grpc.StatusCode.OK
        sent = context.invocation_metadata() or ()
        metadata = {key: value for key, value in sent if isinstance(value, str)}
        self.record = CallRecord(method, request_id(metadata.get(REQUEST_ID_KEY)), context.peer())
        # Trailing metadata goes with the status, whatever it is.
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.record.request_id),))
        self._span: CallSpan | None = tracer.start(method, metadata) if tracer is not None else None
        if self._span is not None:
            self.record.trace_id = self._span.trace_id

    def asked(self, request: pb.RerankRequest) -> None:
        """What the call asks for: its model (if served), its documents (and text, if logged)."""
        self.record.model = self._served_name(request.model)
        self.record.documents = len(request.documents)
        if self._log_request_text:
            self.record.keep_text(request.query, list(request.documents[:LOGGED_DOCUMENTS]))

    def answered(self, result: RerankResult) -> None:
        record = self.record
        record.model = result.model
        record.documents, record.tokens = result.usage.documents, result.usage.tokens
        timings = result.timings
        record.tokenize_ms, record.queue_ms, record.inference_ms = (
            timings.tokenize_ms,
            timings.queue_ms,
            timings.inference_ms,
        )
        self._metrics.tokenize_seconds.labels(result.model).observe(timings.tokenize_ms / 1000)

    async def abort(self, context: grpc.aio.ServicerContext, error: Exception) -> None:
        """Send the status (context.abort raises). Behind responses a client does not read, the
        status waits too: past `status_wait_s` the handler ends anyway, and gRPC sends the status
        once the client reads, or drops the call when the client goes."""
        self._code, message = status_of(error)
        try:
            await asyncio.wait_for(context.abort(self._code, message), self._status_wait_s)
        except TimeoutError:
            return
        raise AssertionError("unreachable: context.abort raises")

    def __enter__(self) -> _Call:
        self._started = time.perf_counter()
        self._calls.enter()
        self._metrics.calls_in_flight.labels(self._method).inc()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        try:
            code = self._code
            if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            seconds = time.perf_counter() - self._started
            record = self.record
            record.code, record.total_ms = code.name, 1000 * seconds
            self._metrics.call_ended(self._method, record.model, code.name, seconds)
            if self._span is not None:
                self._span.end(record)
            record.log()
        finally:
            self._metrics.calls_in_flight.labels(self._method).dec()
            self._calls.exit()


# A message of more documents than this is converted in a thread, so the event loop keeps answering
# (health checks, small calls) while a message of up to max_message_mb becomes Python strings.
DOCUMENTS_ON_THE_LOOP = 64


async def _off_the_loop(
    convert_message: Callable[[_Message], _Own], message: _Message, documents: int
) -> _Own:
    if documents <= DOCUMENTS_ON_THE_LOOP:
        return convert_message(message)
    return await asyncio.to_thread(convert_message, message)


async def _document_chunks(
    request_iterator: AsyncIterator[pb.StreamRerankRequest], record: CallRecord
) -> AsyncIterator[list[str]]:
    async for message in request_iterator:
        if message.WhichOneof("kind") != "documents":
            raise InvalidRequestError("only the first StreamRerank message may be a header")
        texts = message.documents.documents
        record.documents += len(texts)
        yield await _off_the_loop(convert.documents, texts, len(texts))
