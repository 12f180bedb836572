"""The servicer's admission and timing of calls, with a fake service and a fake gRPC context: calls
past the limit in flight, the maximum call duration, a stream client that sends no header or reads
nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from rerank.v1 import reranker_pb2 as pb
from rerank_server.edge.calls import CallGate, CallLimits, Calls
from rerank_server.edge.servicer import RerankerServicer
from rerank_server.errors import OverloadedError
from rerank_server.metrics import Metrics
from rerank_server.types import RankedDocument, RerankQuery, RerankResult


class Aborted(Exception):
    """What the fake context's abort raises, as gRPC's does."""


class FakeContext:
    def __init__(self, remaining: float | None = None, *, reads: bool = True) -> None:
        self.remaining = remaining
        self.reads = reads
        self.written: list[pb.StreamRerankResponse] = []
        self.status: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def set_trailing_metadata(self, metadata: object) -> None:
        pass

    async def send_initial_metadata(self, metadata: object) -> None:
        pass

    async def write(self, message: pb.StreamRerankResponse) -> None:
        if not self.reads:  # flow control: the client reads nothing, so the write never completes
            await asyncio.Event().wait()
        self.written.append(message)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        if not self.reads:  # the status waits behind the responses the client does not read
            await asyncio.Event().wait()
        raise Aborted


class SlowService:
    """Each call runs until released; a stream sends scores without end."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []
        self.release = asyncio.Event()
        self.stream_closed = False
        self.models = SimpleNamespace(get=lambda name: SimpleNamespace(name="m"))  # one model, "m"

    async def rerank(self, request: RerankQuery, timeout: float | None) -> RerankResult:
        self.timeouts.append(timeout)
        await self.release.wait()
        return RerankResult(results=[RankedDocument(0, 1.0)], model="m")

    def check_stream(self, header: RerankQuery) -> None:
        pass

    async def stream_rerank(
        self, header: RerankQuery, more: AsyncIterator[list[str]], timeout: float | None, idle: float
    ) -> AsyncGenerator[list[RankedDocument], None]:
        self.timeouts.append(timeout)
        try:
            for index in range(10**6):
                yield [RankedDocument(index, 0.5)]
        finally:
            self.stream_closed = True


def servicer(service: SlowService, **limits: Any) -> RerankerServicer:
    return RerankerServicer(cast(Any, service), Calls(Metrics(), service.models, CallLimits(**limits)))


def request() -> pb.RerankRequest:
    return pb.RerankRequest(query="q", documents=["a"])


async def messages(
    *items: pb.StreamRerankRequest, then_wait: bool = True
) -> AsyncIterator[pb.StreamRerankRequest]:
    for item in items:
        yield item
    if then_wait:
        await asyncio.Event().wait()


def test_a_gate_refuses_past_its_limit_at_once_naming_the_setting() -> None:
    gate = CallGate("Rerank", 2, "max_concurrent_calls")
    with gate.admit(), gate.admit():
        with (
            pytest.raises(
                OverloadedError, match=r"^2 Rerank calls in flight, the limit \(max_concurrent_calls\)"
            ),
            gate.admit(),
        ):
            pass
        assert gate.count == 2
    assert gate.count == 0
    with gate.admit():
        assert gate.count == 1


async def test_rerank_calls_past_the_limit_get_resource_exhausted() -> None:
    service = SlowService()
    edge = servicer(service, max_concurrent_calls=2)
    contexts = [FakeContext() for _ in range(3)]
    running = [asyncio.ensure_future(edge.Rerank(request(), cast(Any, c))) for c in contexts[:2]]
    await asyncio.sleep(0.01)
    with pytest.raises(Aborted):
        await edge.Rerank(request(), cast(Any, contexts[2]))
    assert contexts[2].status is not None
    assert contexts[2].status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrent_calls" in contexts[2].status[1]
    service.release.set()
    for call in running:
        assert len((await call).results) == 1
    assert len((await edge.Rerank(request(), cast(Any, FakeContext()))).results) == 1  # room again


@pytest.mark.parametrize(
    ("client_deadline", "timeout", "message"),
    [(None, 0.1, "ran for 0.1 s, the longest any call may (max_call_s)"), (0.05, 0.05, "deadline passed")],
    ids=["max-call-s", "client-deadline"],
)
async def test_a_call_ends_by_the_earlier_of_its_deadline_and_max_call_s(
    client_deadline: float | None, timeout: float, message: str
) -> None:
    service = SlowService()
    context = FakeContext(remaining=client_deadline)
    with pytest.raises(Aborted):
        await asyncio.wait_for(servicer(service, max_call_s=0.1).Rerank(request(), cast(Any, context)), 5)
    assert service.timeouts == [timeout]  # the queue drops its pairs at the same deadline
    assert context.status is not None
    assert context.status[0] == grpc.StatusCode.DEADLINE_EXCEEDED and message in context.status[1]


async def test_a_stream_whose_client_reads_nothing_is_ended_and_closed() -> None:
    service = SlowService()
    context = FakeContext(reads=False)
    header = pb.StreamRerankRequest(header=pb.RerankRequest(query="q", documents=["a"], top_n=1))
    edge = servicer(service, stream_idle_timeout_s=0.1)
    await asyncio.wait_for(
        edge.StreamRerank(messages(header), cast(Any, context)), 5
    )  # returns: the status waits
    assert context.status == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the client read nothing for 0.1 s (stream_idle_timeout_s)",
    )
    assert service.stream_closed  # its queued pairs are dropped at once
    assert edge.calls.in_flight.count == 0


async def test_a_stream_that_sends_no_header_is_ended() -> None:
    context = FakeContext()
    edge = servicer(SlowService(), stream_idle_timeout_s=0.1)
    with pytest.raises(Aborted):
        await asyncio.wait_for(edge.StreamRerank(messages(), cast(Any, context)), 5)
    assert context.status == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the client sent no header for 0.1 s (stream_idle_timeout_s)",
    )


async def test_streams_past_the_limit_are_refused_once_their_header_is_read() -> None:
    service = SlowService()
    edge = servicer(service, max_concurrent_streams=1)
    header = pb.StreamRerankRequest(header=pb.RerankRequest(query="q", documents=["a"], top_n=1))
    first = FakeContext(reads=False)
    running = asyncio.ensure_future(edge.StreamRerank(messages(header), cast(Any, first)))
    await asyncio.sleep(0.01)
    second = FakeContext()
    with pytest.raises(Aborted):
        await edge.StreamRerank(messages(header), cast(Any, second))
    assert second.status is not None
    assert second.status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 StreamRerank calls in flight, the limit (max_concurrent_streams)" in second.status[1]
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert service.stream_closed
