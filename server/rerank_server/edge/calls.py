"""Calls as both transports (gRPC and HTTP) see them: admitted against the same limits, bounded in
time, tracked while in flight (a drain waits for them), and observed.

A call past the limit of calls in flight is refused at once (RESOURCE_EXHAUSTED naming the limit);
every call ends by its effective deadline, the client's or max_call_s, whichever comes first. Each
call is counted and timed by method, status code and model, written as one log line, traced (with
tracing on), and named by a request id that the transport returns to the caller, whatever the
outcome. A transport gives the call its method name ("Rerank", "POST /v2/rerank"), what the caller
sent (request id, peer, trace headers), and how it ended; the status code recorded is gRPC's name
for it on either transport, so dashboards see both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypeVar

from rerank_server.edge.status import ErrorStatus, error_status
from rerank_server.errors import DeadlineExceededError, ModelNotFoundError, OverloadedError
from rerank_server.logs import LOGGED_DOCUMENTS, CallRecord, request_id
from rerank_server.metrics import Metrics
from rerank_server.tracing import CallSpan, CallTracer
from rerank_server.types import RerankResult

_P = ParamSpec("_P")
_T = TypeVar("_T")


async def off_the_loop(in_a_thread: bool, work: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run `work` in a thread when it is large (a big message to convert, a big reply to encode), so the
    event loop keeps answering health checks and small calls meanwhile; small work runs in place."""
    if in_a_thread:
        return await asyncio.to_thread(work, *args, **kwargs)
    return work(*args, **kwargs)


@dataclass(frozen=True)
class CallLimits:
    """How many calls may run at once, and for how long."""

    max_concurrent_calls: int = 1024
    max_concurrent_streams: int = 64
    stream_idle_timeout_s: float = 60.0
    max_call_s: float = 3600.0


class CallsInFlight:
    """Calls being served on either transport, so a drain can wait for them before it stops the
    servers."""

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
        """True once no call is in flight; False if some still are after `timeout` seconds."""
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


class ServedModels(Protocol):
    """What a call needs of the model registry: the served model a name means."""

    def get(self, name: str) -> _Named: ...


class _Named(Protocol):
    name: str


class Calls:
    """The calls of both transports: the shared limits and gates, the calls in flight, and the
    observation of each call."""

    def __init__(
        self,
        metrics: Metrics,
        models: ServedModels,
        limits: CallLimits | None = None,
        *,
        tracer: CallTracer | None = None,
        log_request_text: bool = False,
    ) -> None:
        self.limits = limits or CallLimits()
        self.in_flight = CallsInFlight()
        # One gate per kind for both transports: an HTTP rerank is a Rerank call.
        self.reranks = CallGate("Rerank", self.limits.max_concurrent_calls, "max_concurrent_calls")
        self.streams = CallGate("StreamRerank", self.limits.max_concurrent_streams, "max_concurrent_streams")
        self.metrics = metrics
        self._models = models
        self.tracer = tracer
        self.log_request_text = log_request_text

    def observe(
        self, method: str, *, sent_request_id: str | None, peer: str, metadata: Mapping[str, str]
    ) -> ObservedCall:
        """A call that begins now; `metadata` carries the caller's trace context (traceparent)."""
        return ObservedCall(self, method, request_id(sent_request_id), peer, metadata)

    @contextlib.asynccontextmanager
    async def deadline(self, remaining: float | None = None) -> AsyncIterator[float]:
        """Runs the call's work until its effective deadline, the client's (`remaining` seconds,
        None = none) or max_call_s, whichever comes first (yields the seconds left); past it,
        DeadlineExceededError."""
        max_call_s = self.limits.max_call_s
        capped = remaining is None or max_call_s < remaining
        timeout = max_call_s if capped or remaining is None else remaining
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

    def served_name(self, requested: str) -> str:
        """The served model a call names ("" = the default), or "" when none is served by that name:
        metrics label calls by it, so it never takes a caller's unchecked text."""
        with contextlib.suppress(ModelNotFoundError):
            return self._models.get(requested).name
        return ""


class ObservedCall:
    """One call: in flight while its `with` block runs; then counted and timed by method, code and
    model, written as its log line, and its span ended."""

    def __init__(
        self, calls: Calls, method: str, call_id: str, peer: str, metadata: Mapping[str, str]
    ) -> None:
        self._calls = calls
        self._method = method
        self.code = "OK"
        self.record = CallRecord(method, call_id, peer)
        tracer = calls.tracer
        self._span: CallSpan | None = tracer.start(method, metadata) if tracer is not None else None
        if self._span is not None:
            self.record.trace_id = self._span.trace_id

    @property
    def request_id(self) -> str:
        return self.record.request_id

    def asked(self, model: str, query: str, documents: Sequence[str]) -> None:
        """What the call asks for: its model (if served), its documents (and text, if logged)."""
        self.record.model = self._calls.served_name(model)
        self.record.documents = len(documents)
        if self._calls.log_request_text:
            self.record.keep_text(query, list(documents[:LOGGED_DOCUMENTS]))

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
        self._calls.metrics.tokenize_seconds.labels(result.model).observe(timings.tokenize_ms / 1000)

    def failed(self, error: Exception) -> ErrorStatus:
        """The status the call ends with, for the transport to send."""
        status = error_status(error)
        self.code = status.code.name
        return status

    def __enter__(self) -> ObservedCall:
        self._started = time.perf_counter()
        self._calls.in_flight.enter()
        self._calls.metrics.calls_in_flight.labels(self._method).inc()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        metrics = self._calls.metrics
        try:
            code = self.code
            if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
                code = "CANCELLED"
            seconds = time.perf_counter() - self._started
            record = self.record
            record.code, record.total_ms = code, 1000 * seconds
            metrics.call_ended(self._method, record.model, code, seconds)
            if self._span is not None:
                self._span.end(record)
            record.log()
        finally:
            metrics.calls_in_flight.labels(self._method).dec()
            self._calls.in_flight.exit()
