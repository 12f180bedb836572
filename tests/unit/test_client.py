"""The typed client against an in-process fake server whose score of a document is its length."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from fake_reranker import MODEL, MODELS, TIMINGS, Failure, FakeServer
from grpc_health.v1 import health_pb2
from rerank.v1 import reranker_pb2 as pb
from rerank_client import (
    AsyncRerankerClient,
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    ModelInfo,
    NotFoundError,
    RankedDocument,
    RerankerClient,
    RerankError,
    RerankResult,
    ResourceExhaustedError,
    RetryPolicy,
    Timings,
    Truncation,
    UnavailableError,
    Usage,
    from_rpc_error,
)
from rerank_client._channel import HEALTH_SERVICE, MESSAGE_LIMIT, channel_options, health_channel_options

_T = TypeVar("_T")

#: Tiny pauses so retry tests take milliseconds; no jitter so they are exact.
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.005, jitter=0.0)
DOCUMENTS = ["a", "bbbb", "cc", "dddd", "eee"]
#: gRPC sends a timeout rounded up to its wire units: the server may see a little more than was set.
SLACK = 0.2


def expected_order(documents: list[str]) -> list[int]:
    """The fake's ranking: by length descending, ties by index."""
    return sorted(range(len(documents)), key=lambda i: (-len(documents[i]), i))


def document(i: int) -> str:
    """Stream documents of varied lengths (so the ranking is not trivial)."""
    return "x" * (i * 7919 % 101) + str(i)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def background_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop on its own thread, driving AsyncRerankerClient for the shared tests."""
    event_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=event_loop.run_forever, daemon=True)
    thread.start()
    yield event_loop
    event_loop.call_soon_threadsafe(event_loop.stop)
    thread.join()
    event_loop.close()


class OnLoop:
    """AsyncRerankerClient driven from the test thread, with RerankerClient's blocking calls."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target: str, **kwargs: Any) -> None:
        self._loop = loop
        self.client = self._run(self._open(target, kwargs))

    @staticmethod
    async def _open(target: str, kwargs: dict[str, Any]) -> AsyncRerankerClient:
        return AsyncRerankerClient(target, **kwargs)  # on the loop: the channel belongs to it

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def rerank(self, *args: Any, **kwargs: Any) -> RerankResult:
        return self._run(self.client.rerank(*args, **kwargs))

    def stream_rerank(self, *args: Any, **kwargs: Any) -> RerankResult:
        return self._run(self.client.stream_rerank(*args, **kwargs))

    def list_models(self, **kwargs: Any) -> list[ModelInfo]:
        return self._run(self.client.list_models(**kwargs))

    def health(self, *args: Any, **kwargs: Any) -> str:
        return self._run(self.client.health(*args, **kwargs))

    def close(self) -> None:
        self._run(self.client.close())


Client = RerankerClient | OnLoop


@pytest.fixture(params=["sync", "async"])
def connect(
    request: pytest.FixtureRequest, server: FakeServer, background_loop: asyncio.AbstractEventLoop
) -> Iterator[Callable[..., Client]]:
    """Opens clients of either kind on the fake server (fast retries unless told otherwise)."""
    opened: list[Client] = []

    def open_client(**kwargs: Any) -> Client:
        kwargs.setdefault("retry", FAST_RETRY)
        client: Client
        if request.param == "sync":
            client = RerankerClient(server.target, **kwargs)
        else:
            client = OnLoop(background_loop, server.target, **kwargs)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


# --- results and conversions ---------------------------------------------------------------------


def test_rerank_returns_typed_results(connect: Callable[..., Client]) -> None:
    result = connect().rerank("q", DOCUMENTS)

    assert isinstance(result, RerankResult)
    assert result.results == [
        RankedDocument(index=i, score=float(len(DOCUMENTS[i])), document=None)
        for i in expected_order(DOCUMENTS)
    ]
    assert result.model == MODEL
    assert result.usage == Usage(
        documents=len(DOCUMENTS),
        tokens=sum(len("q") + len(d) for d in DOCUMENTS),
        truncated=0,
        chunked=0,
        windows=len(DOCUMENTS),
    )
    assert result.timings == Timings(
        tokenize_ms=TIMINGS.tokenize_ms,
        queue_ms=TIMINGS.queue_ms,
        inference_ms=TIMINGS.inference_ms,
        total_ms=TIMINGS.total_ms,
    )


def test_documents_come_back_only_when_asked(connect: Callable[..., Client]) -> None:
    client = connect()
    with_text = client.rerank("q", DOCUMENTS, return_documents=True)
    assert [r.document for r in with_text.results] == [DOCUMENTS[r.index] for r in with_text.results]
    # An empty document echoed back is "", not None: the optional field is set.
    assert client.rerank("q", [""], return_documents=True).results[0].document == ""
    assert all(r.document is None for r in client.rerank("q", DOCUMENTS).results)


def test_list_models_is_typed(connect: Callable[..., Client]) -> None:
    models = connect().list_models()
    assert models == [
        ModelInfo(
            name=m.name,
            family=m.family,
            max_length=m.max_length,
            max_length_limit=m.max_length_limit,
            dtype=m.dtype,
            devices=list(m.devices),
            replicas=m.replicas,
            ready_replicas=m.ready_replicas,
            ready=m.ready,
            takes_instruction=m.takes_instruction,
            default_instruction=m.default_instruction,
            min_cutoff_layer=m.min_cutoff_layer,
            max_cutoff_layer=m.max_cutoff_layer,
        )
        for m in MODELS
    ]
    assert all(isinstance(m.devices, list) for m in models)
    by_name = {m.name: m for m in models}
    assert by_name[MODEL].takes_instruction is True
    assert by_name[MODEL].default_instruction == MODELS[0].default_instruction != ""
    assert (by_name["layerwise"].min_cutoff_layer, by_name["layerwise"].max_cutoff_layer) == (8, 40)
    # Unset in the message: the dataclass defaults, not None.
    other = by_name["other"]
    assert (other.takes_instruction, other.default_instruction) == (False, "")
    assert (other.min_cutoff_layer, other.max_cutoff_layer) == (0, 0)


# --- what reaches the server ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("truncation", "wire"),
    [
        (Truncation.END, pb.TRUNCATION_UNSPECIFIED),  # the server's documented default, as before
        ("end", pb.TRUNCATION_UNSPECIFIED),
        (Truncation.NONE, pb.TRUNCATION_NONE),
        ("none", pb.TRUNCATION_NONE),
        (Truncation.CHUNK, pb.TRUNCATION_CHUNK),
        ("chunk", pb.TRUNCATION_CHUNK),
    ],
)
def test_rerank_options_reach_the_server(
    connect: Callable[..., Client], server: FakeServer, truncation: Truncation | str, wire: int
) -> None:
    result = connect().rerank(
        "q",
        DOCUMENTS,
        top_n=2,
        model="m2",
        raw_scores=True,
        max_length=4,
        truncation=truncation,
        instruction="Find the longest",
        cutoff_layer=28,
    )

    sent = server.reranker.requests[-1]
    assert (sent.query, list(sent.documents), sent.model) == ("q", DOCUMENTS, "m2")
    assert (sent.top_n, sent.raw_scores, sent.max_length, sent.truncation) == (2, True, 4, wire)
    assert (sent.instruction, sent.cutoff_layer) == ("Find the longest", 28)
    assert sent.return_documents is False
    assert [r.index for r in result.results] == expected_order(DOCUMENTS)[:2]
    assert result.model == "m2"
    too_long = sum(len("q") + len(d) > 4 for d in DOCUMENTS)
    assert too_long > 0
    if wire == pb.TRUNCATION_CHUNK:
        assert (result.usage.truncated, result.usage.chunked) == (0, too_long)
    else:
        assert (result.usage.truncated, result.usage.chunked) == (too_long, 0)


def test_chunked_usage_comes_back_typed(connect: Callable[..., Client]) -> None:
    documents = ["a" * 9, "b", "c" * 3]  # pairs of 10, 2 and 4 characters: 3, 1 and 1 windows of 4
    usage = connect().rerank("q", documents, max_length=4, truncation=Truncation.CHUNK).usage
    assert usage == Usage(documents=3, tokens=16, truncated=0, chunked=1, windows=5)
    assert all(type(n) is int for n in (usage.chunked, usage.windows))


def test_rerank_defaults_reach_the_server(connect: Callable[..., Client], server: FakeServer) -> None:
    connect().rerank("q", DOCUMENTS)
    sent = server.reranker.requests[-1]
    assert (sent.top_n, sent.model, sent.max_length) == (0, "", 0)
    assert (sent.raw_scores, sent.return_documents, sent.truncation) == (
        False,
        False,
        pb.TRUNCATION_UNSPECIFIED,
    )
    assert (sent.instruction, sent.cutoff_layer) == ("", 0)


def test_stream_header_carries_the_options(connect: Callable[..., Client], server: FakeServer) -> None:
    documents = [document(i) for i in range(5)]
    connect().stream_rerank(
        "q",
        iter(documents),
        top_n=3,
        model="m2",
        return_documents=True,
        raw_scores=True,
        max_length=64,
        truncation="chunk",
        instruction="Find the longest",
        cutoff_layer=12,
        chunk_size=2,
    )
    header = server.reranker.requests[-1]
    assert (header.query, header.model, header.top_n, header.max_length) == ("q", "m2", 3, 64)
    assert (header.return_documents, header.raw_scores) == (True, True)
    assert (header.truncation, header.instruction, header.cutoff_layer) == (
        pb.TRUNCATION_CHUNK,
        "Find the longest",
        12,
    )
    assert list(header.documents) == documents[:2]  # the first chunk rides in the header


def test_truncation_is_a_str_enum() -> None:
    assert [t.value for t in Truncation] == ["end", "none", "chunk"]
    assert Truncation("chunk") is Truncation.CHUNK
    assert Truncation.CHUNK == "chunk"


@pytest.mark.parametrize("truncation", ["middle", "END", "", 2, True])
def test_an_unknown_truncation_is_refused_before_any_call(
    connect: Callable[..., Client], server: FakeServer, truncation: Any
) -> None:
    client = connect()
    taken: list[str] = []

    def documents() -> Iterator[str]:
        for d in DOCUMENTS:
            taken.append(d)
            yield d

    with pytest.raises(ValueError, match="truncation must be one of 'end', 'none', 'chunk'"):
        client.rerank("q", DOCUMENTS, truncation=truncation)
    with pytest.raises(ValueError, match="truncation must be one of"):
        client.stream_rerank("q", documents(), top_n=1, truncation=truncation)
    assert taken == []  # the stream's documents were not read either
    assert server.reranker.attempts == {}


def test_the_old_truncate_flag_is_gone(connect: Callable[..., Client]) -> None:
    """Renamed, not aliased: a caller still passing truncate= fails loudly instead of being ignored."""
    with pytest.raises(TypeError, match="truncate"):
        connect().rerank("q", DOCUMENTS, truncate=False)  # type: ignore[call-arg]


def test_metadata_and_timeouts_reach_the_server(connect: Callable[..., Client], server: FakeServer) -> None:
    metadata = [("authorization", "Bearer token-1"), ("x-tenant", "acme")]
    client = connect(metadata=metadata, timeout=30.0)

    client.rerank("q", DOCUMENTS)
    client.rerank("q", DOCUMENTS, timeout=2.0)
    client.stream_rerank("q", DOCUMENTS, top_n=1)
    client.list_models()
    client.health()

    fake = server.reranker
    assert fake.attempts == {"Rerank": 2, "StreamRerank": 1, "ListModels": 1, "Check": 1}
    for seen in fake.metadata:
        assert {key: seen[key] for key, _ in metadata} == dict(metadata)
    default, per_call, *others = fake.time_remaining
    assert default is not None and 20 < default <= 30 + SLACK
    assert per_call is not None and 0 < per_call <= 2 + SLACK
    assert all(r is not None and 20 < r <= 30 + SLACK for r in others)


def test_no_timeout_means_no_deadline(connect: Callable[..., Client], server: FakeServer) -> None:
    connect().rerank("q", DOCUMENTS)
    (remaining,) = server.reranker.time_remaining
    assert remaining is not None and remaining > 10**6


def test_documents_must_not_be_a_bare_string(connect: Callable[..., Client], server: FakeServer) -> None:
    client = connect()
    with pytest.raises(TypeError):
        client.rerank("q", "abc")
    with pytest.raises(TypeError):
        client.stream_rerank("q", "abc", top_n=1)
    with pytest.raises(ValueError, match="chunk_size"):
        client.stream_rerank("q", DOCUMENTS, top_n=1, chunk_size=0)
    assert not server.reranker.attempts


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, CancelledError),
        (grpc.StatusCode.INTERNAL, InternalError),
        (grpc.StatusCode.PERMISSION_DENIED, RerankError),
        (grpc.StatusCode.UNIMPLEMENTED, RerankError),
    ],
)
def test_errors_are_typed(
    connect: Callable[..., Client],
    server: FakeServer,
    code: grpc.StatusCode,
    error_class: type[RerankError],
) -> None:
    server.reranker.fail("Rerank", Failure(code, f"went wrong: {code.name.lower()}"))
    with pytest.raises(RerankError) as caught:
        connect(retry=None).rerank("q", DOCUMENTS)

    error = caught.value
    assert type(error) is error_class
    assert error.code == code
    assert error.message == f"went wrong: {code.name.lower()}"
    assert str(error) == f"{code.name}: {error.message}"
    assert isinstance(error.__cause__, grpc.RpcError)


def test_an_rpc_error_without_status_is_unknown() -> None:
    error = from_rpc_error(grpc.RpcError())
    assert type(error) is RerankError
    assert (error.code, error.message, str(error)) == (grpc.StatusCode.UNKNOWN, "", "UNKNOWN")


def test_list_models_and_health_errors_are_typed(connect: Callable[..., Client], server: FakeServer) -> None:
    server.reranker.fail("ListModels", Failure(grpc.StatusCode.INTERNAL, "models broke"))
    server.reranker.fail("Check", Failure(grpc.StatusCode.PERMISSION_DENIED, "not you"))
    client = connect()
    with pytest.raises(InternalError, match="models broke"):
        client.list_models()
    with pytest.raises(RerankError, match="not you") as caught:
        client.health()
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


# --- health ------------------------------------------------------------------------------------


def test_health_reports_every_status(connect: Callable[..., Client], server: FakeServer) -> None:
    client = connect()
    assert client.health() == "SERVING"
    statuses = health_pb2.HealthCheckResponse.ServingStatus
    for number in statuses.values():
        server.health.set("rerank.v1.Reranker", number)
        assert client.health("rerank.v1.Reranker") == statuses.Name(number)
    # The standard servicer answers NOT_FOUND for a service it does not know.
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"


# --- retries -----------------------------------------------------------------------------------

UNARY_CALLS: dict[str, Callable[[Client], object]] = {
    "Rerank": lambda client: client.rerank("q", DOCUMENTS),
    "ListModels": lambda client: client.list_models(),
    "Check": lambda client: client.health(),
}


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
@pytest.mark.parametrize("method", sorted(UNARY_CALLS))
def test_transient_errors_are_retried(
    connect: Callable[..., Client], server: FakeServer, method: str, code: grpc.StatusCode
) -> None:
    server.reranker.fail(method, Failure(code, "busy"), times=2)
    UNARY_CALLS[method](connect())
    assert server.reranker.attempts[method] == 3


@pytest.mark.parametrize("method", sorted(UNARY_CALLS))
def test_retries_stop_at_max_attempts(
    connect: Callable[..., Client], server: FakeServer, method: str
) -> None:
    server.reranker.fail(method, Failure(grpc.StatusCode.UNAVAILABLE, "down"), times=10)
    with pytest.raises(UnavailableError, match="down"):
        UNARY_CALLS[method](connect())
    assert server.reranker.attempts[method] == FAST_RETRY.max_attempts


def test_other_errors_are_not_retried(connect: Callable[..., Client], server: FakeServer) -> None:
    server.reranker.fail("Rerank", Failure(grpc.StatusCode.INVALID_ARGUMENT, "bad"), times=3)
    with pytest.raises(InvalidArgumentError):
        connect().rerank("q", DOCUMENTS)
    assert server.reranker.attempts["Rerank"] == 1


def test_retry_none_turns_retries_off(connect: Callable[..., Client], server: FakeServer) -> None:
    server.reranker.fail("Rerank", Failure(grpc.StatusCode.UNAVAILABLE, "down"), times=3)
    with pytest.raises(UnavailableError):
        connect(retry=None).rerank("q", DOCUMENTS)
    assert server.reranker.attempts["Rerank"] == 1


def test_attempts_share_the_call_timeout(connect: Callable[..., Client], server: FakeServer) -> None:
    server.reranker.fail("Rerank", Failure(grpc.StatusCode.UNAVAILABLE, "down"), times=2)
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=0.2, jitter=0.0)
    # Under a second, gRPC sends timeouts to the millisecond (longer ones are rounded coarser).
    connect(retry=retry).rerank("q", DOCUMENTS, timeout=0.9)

    first, second, third = server.reranker.time_remaining
    assert first is not None and second is not None and third is not None
    assert 0.5 < first <= 0.9 + SLACK
    # Each attempt gets what is left, not a fresh 0.9 s: the 200 ms pause is gone (the margin
    # absorbs latencies that differ between attempts on a loaded machine).
    assert second <= first - 0.1
    assert third <= second - 0.1


def test_no_retry_when_its_pause_would_pass_the_deadline(
    connect: Callable[..., Client], server: FakeServer
) -> None:
    server.reranker.fail("Rerank", Failure(grpc.StatusCode.UNAVAILABLE, "down"), times=3)
    client = connect(retry=RetryPolicy(initial_backoff=30.0, max_backoff=30.0))
    started = time.monotonic()
    with pytest.raises(UnavailableError):
        client.rerank("q", DOCUMENTS, timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert server.reranker.attempts["Rerank"] == 1


def test_backoff_grows_to_its_cap_with_bounded_jitter() -> None:
    exact = RetryPolicy(initial_backoff=0.05, max_backoff=0.3, multiplier=2.0, jitter=0.0)
    assert [exact.backoff(n) for n in range(1, 6)] == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])
    assert exact.backoff(100_000) == pytest.approx(0.3)  # no overflow

    jittered = RetryPolicy(initial_backoff=0.2, max_backoff=1.0, jitter=0.5)
    delays = [jittered.backoff(1) for _ in range(200)]
    assert all(0.1 <= d <= 0.2 for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize(
    "settings",
    [{"max_attempts": 0}, {"initial_backoff": -1.0}, {"multiplier": 0.5}, {"jitter": 1.5}],
)
def test_retry_policy_rejects_nonsense(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**settings)


# --- streams -----------------------------------------------------------------------------------


def test_stream_rerank_reads_documents_lazily_and_reports_scores_as_they_come(server: FakeServer) -> None:
    total, chunk_size, top_n = 100_000, 512, 5
    taken = 0
    first_scores = threading.Event()
    taken_at_first_scores: list[int] = []
    batches: list[list[RankedDocument]] = []

    def documents() -> Iterator[str]:
        nonlocal taken
        for i in range(total):
            # Past the third chunk, wait for scores: a client that drained the generator before
            # reporting scores (or before sending) would stall here, and fail.
            if i == 3 * chunk_size and not first_scores.wait(timeout=10):
                raise AssertionError("no scores were reported while the documents were still being read")
            taken += 1
            yield document(i)

    def on_scored(batch: list[RankedDocument]) -> None:
        if not first_scores.is_set():
            taken_at_first_scores.append(taken)
            first_scores.set()
        batches.append(batch)

    with RerankerClient(server.target) as client:
        result = client.stream_rerank(
            "q", documents(), top_n=top_n, chunk_size=chunk_size, on_scored=on_scored
        )

    assert taken_at_first_scores[0] <= 3 * chunk_size < total
    assert taken == total
    check_stream_result(result, batches, total, chunk_size, top_n)


def check_stream_result(
    result: RerankResult, batches: list[list[RankedDocument]], total: int, chunk_size: int, top_n: int
) -> None:
    """The fake scores each request message as it arrives: one batch per chunk, then the final."""
    assert [len(b) for b in batches] == [chunk_size] * (total // chunk_size) + [total % chunk_size]
    scored = sorted((d for batch in batches for d in batch), key=lambda d: d.index)
    assert [d.index for d in scored] == list(range(total))
    assert all(d.score == len(document(d.index)) and d.document is None for d in scored)
    best = sorted(range(total), key=lambda i: (-len(document(i)), i))[:top_n]
    assert [r.index for r in result.results] == best
    assert result.usage.documents == total


async def test_async_stream_rerank_reads_an_async_iterable_lazily(server: FakeServer) -> None:
    total, chunk_size, top_n = 100_000, 512, 5
    taken = 0
    first_scores = asyncio.Event()
    taken_at_first_scores: list[int] = []
    batches: list[list[RankedDocument]] = []

    async def documents() -> AsyncIterator[str]:
        nonlocal taken
        for i in range(total):
            if i == 3 * chunk_size:
                await asyncio.wait_for(first_scores.wait(), timeout=10)
            taken += 1
            yield document(i)

    async def on_scored(batch: list[RankedDocument]) -> None:  # a coroutine function is awaited
        await asyncio.sleep(0)
        if not first_scores.is_set():
            taken_at_first_scores.append(taken)
            first_scores.set()
        batches.append(batch)

    async with AsyncRerankerClient(server.target) as client:
        result = await client.stream_rerank(
            "q", documents(), top_n=top_n, chunk_size=chunk_size, on_scored=on_scored
        )

    assert taken_at_first_scores[0] <= 3 * chunk_size < total
    assert taken == total
    check_stream_result(result, batches, total, chunk_size, top_n)


def test_stream_rerank_returns_the_final_result(connect: Callable[..., Client]) -> None:
    documents = [document(i) for i in range(50)]
    batches: list[list[RankedDocument]] = []
    result = connect().stream_rerank(
        "q", iter(documents), top_n=4, chunk_size=8, return_documents=True, on_scored=batches.append
    )
    order = expected_order(documents)[:4]
    assert result.results == [RankedDocument(i, float(len(documents[i])), documents[i]) for i in order]
    assert result.model == MODEL
    assert result.usage.tokens == sum(len("q") + len(d) for d in documents)
    assert sum(len(b) for b in batches) == len(documents)


def test_stream_errors_are_typed(connect: Callable[..., Client], server: FakeServer) -> None:
    client = connect()
    server.reranker.fail("StreamRerank", Failure(grpc.StatusCode.INVALID_ARGUMENT, "top_n too big"))
    with pytest.raises(InvalidArgumentError, match="top_n too big") as caught:
        client.stream_rerank("q", DOCUMENTS, top_n=1)
    assert isinstance(caught.value.__cause__, grpc.RpcError)

    server.reranker.fail("StreamRerank", Failure(grpc.StatusCode.INTERNAL, "replica died", after_messages=1))
    with pytest.raises(InternalError, match="replica died"):
        client.stream_rerank("q", DOCUMENTS, top_n=1)


def test_stream_without_final_is_an_error(connect: Callable[..., Client], server: FakeServer) -> None:
    server.reranker.stream_final = False
    with pytest.raises(InternalError, match="final") as caught:
        connect().stream_rerank("q", DOCUMENTS, top_n=1)
    assert caught.value.code == grpc.StatusCode.INTERNAL


def test_stream_is_retried_before_it_is_under_way(connect: Callable[..., Client], server: FakeServer) -> None:
    server.reranker.fail("StreamRerank", Failure(grpc.StatusCode.UNAVAILABLE, "starting"), times=2)
    documents = [document(i) for i in range(10)]
    # A generator can be read once: the retries must resend the first chunk the client kept.
    result = connect().stream_rerank("q", (d for d in documents), top_n=3)
    assert server.reranker.attempts["StreamRerank"] == 3
    # The failed attempts ended before reading; the last got the whole first chunk again.
    assert [list(header.documents) for header in server.reranker.requests] == [documents]
    assert [r.index for r in result.results] == expected_order(documents)[:3]


def test_a_refused_stream_of_many_chunks_is_retried(
    connect: Callable[..., Client], server: FakeServer
) -> None:
    """A refusal of the header (no replica ready yet, say) comes before any document past the first
    chunk is taken: the client waits for the server to accept the header, so it may retry."""
    server.reranker.fail("StreamRerank", Failure(grpc.StatusCode.UNAVAILABLE, "starting"), times=2)
    documents = [document(i) for i in range(35)]
    result = connect().stream_rerank("q", (d for d in documents), top_n=3, chunk_size=10)
    assert server.reranker.attempts["StreamRerank"] == 3
    assert result.usage.documents == 35  # every chunk reached the attempt that succeeded
    assert [r.index for r in result.results] == expected_order(documents)[:3]


def test_stream_is_not_retried_once_a_response_arrived(
    connect: Callable[..., Client], server: FakeServer
) -> None:
    server.reranker.fail(
        "StreamRerank", Failure(grpc.StatusCode.UNAVAILABLE, "lost", after_messages=1), times=3
    )
    batches: list[list[RankedDocument]] = []
    with pytest.raises(UnavailableError, match="lost"):
        connect().stream_rerank("q", DOCUMENTS, top_n=1, on_scored=batches.append)
    assert server.reranker.attempts["StreamRerank"] == 1
    assert len(batches) == 1


def test_stream_is_not_retried_once_documents_past_the_first_chunk_were_taken(
    connect: Callable[..., Client], server: FakeServer
) -> None:
    server.reranker.stream_echo = False  # no response: only the taking makes the stream under way
    server.reranker.fail(
        "StreamRerank", Failure(grpc.StatusCode.UNAVAILABLE, "lost", after_messages=2), times=3
    )
    with pytest.raises(UnavailableError):
        connect().stream_rerank("q", (document(i) for i in range(30)), top_n=1, chunk_size=10)
    assert server.reranker.attempts["StreamRerank"] == 1


def test_an_error_of_the_documents_iterable_reaches_the_caller(
    connect: Callable[..., Client], server: FakeServer
) -> None:
    def documents() -> Iterator[str]:
        for i in range(25):
            yield document(i)
        raise LookupError("the source broke")

    with pytest.raises(LookupError, match="the source broke"):
        connect().stream_rerank("q", documents(), top_n=1, chunk_size=10)
    # Not retried (the cancelled call may even end before the server counts it).
    assert server.reranker.attempts["StreamRerank"] <= 1


def test_an_error_of_on_scored_reaches_the_caller(connect: Callable[..., Client]) -> None:
    def on_scored(batch: list[RankedDocument]) -> None:
        raise KeyError("callback broke")

    with pytest.raises(KeyError, match="callback broke"):
        connect().stream_rerank("q", DOCUMENTS, top_n=1, on_scored=on_scored)


# --- channels ----------------------------------------------------------------------------------


def test_context_manager_closes_the_channel(server: FakeServer) -> None:
    with RerankerClient(server.target) as client:
        assert client.health() == "SERVING"
    with pytest.raises(ValueError, match="closed channel"):
        client.rerank("q", DOCUMENTS)


async def test_async_context_manager_closes_the_channel(server: FakeServer) -> None:
    async with AsyncRerankerClient(server.target) as client:
        assert await client.health() == "SERVING"
    with pytest.raises(grpc.aio.UsageError, match="closed"):
        await client.rerank("q", DOCUMENTS)


def test_a_borrowed_channel_stays_open(server: FakeServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        with RerankerClient.from_channel(channel, metadata=[("x-tenant", "acme")], retry=None) as client:
            client.rerank("q", DOCUMENTS)
        assert RerankerClient.from_channel(channel).health() == "SERVING"
    assert server.reranker.metadata[0]["x-tenant"] == "acme"


async def test_a_borrowed_async_channel_stays_open(server: FakeServer) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        async with AsyncRerankerClient.from_channel(channel, timeout=5.0) as client:
            await client.rerank("q", DOCUMENTS)
        assert await AsyncRerankerClient.from_channel(channel).health() == "SERVING"
    (remaining, _) = server.reranker.time_remaining
    assert remaining is not None and remaining <= 5 + SLACK


# --- dependencies ------------------------------------------------------------------------------

CLIENT_ONLY = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = {"torch", "numpy", "transformers", "pydantic", "pydantic_settings", "grpc_health"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the client must not need it")
            return None

    sys.meta_path.insert(0, Block())
    assert not BLOCKED & set(sys.modules), "imported before the block"
    try:
        import grpc_health
    except ImportError:
        pass
    else:
        raise AssertionError("the block does not work")

    from rerank_client import RerankerClient

    with RerankerClient(sys.argv[1]) as client:
        result = client.rerank("q", ["a", "ccc", "bb"], return_documents=True)
        streamed = client.stream_rerank("q", iter(["dd", "e"]), top_n=1)
        print(json.dumps({
            "documents": [r.document for r in result.results],
            "streamed": [r.index for r in streamed.results],
            "health": client.health(),
            "models": [m.name for m in client.list_models()],
            "blocked_loaded": sorted(BLOCKED & {m.partition(".")[0] for m in sys.modules}),
        }))
    """
)


def test_the_client_needs_only_grpcio_and_protobuf(server: FakeServer) -> None:
    run = subprocess.run(
        [sys.executable, "-c", CLIENT_ONLY, server.target], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {
        "documents": ["ccc", "bb", "a"],
        "streamed": [0],
        "health": "SERVING",
        "models": [m.name for m in MODELS],
        "blocked_loaded": [],
    }


def test_channels_take_messages_as_large_as_the_server_sends_unless_told_otherwise() -> None:
    assert MESSAGE_LIMIT == 64 * 1024 * 1024  # the server's --max-message-mb default
    defaults = dict(channel_options(()))
    assert defaults["grpc.max_receive_message_length"] == MESSAGE_LIMIT
    assert defaults["grpc.max_send_message_length"] == MESSAGE_LIMIT
    mine = dict(channel_options([("grpc.max_receive_message_length", 1024), ("grpc.enable_retries", 0)]))
    assert mine["grpc.max_receive_message_length"] == 1024
    assert mine["grpc.enable_retries"] == 0
    assert len(channel_options([("grpc.max_receive_message_length", 1024)])) == 3  # no duplicate keys


# --- balancing across replicas -----------------------------------------------------------------


def test_channels_balance_over_healthy_servers_and_health_asks_one_server_unbalanced() -> None:
    config = json.loads(dict(channel_options(()))["grpc.service_config"])
    assert config == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "rerank.v1.Reranker"},
    }
    mine = [("grpc.service_config", "{}"), ("grpc.ssl_target_name_override", "rerank.example")]
    assert dict(channel_options(mine))["grpc.service_config"] == "{}"  # the caller's options win
    health_options = dict(health_channel_options(mine))
    assert health_options["grpc.ssl_target_name_override"] == "rerank.example"
    assert json.loads(health_options["grpc.service_config"]) == {"loadBalancingConfig": [{"pick_first": {}}]}


@pytest.fixture
def replicas() -> Iterator[list[FakeServer]]:
    """Two fake servers SERVING, as two replicas behind one target."""
    fakes = [FakeServer().start() for _ in range(2)]
    for fake in fakes:
        fake.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    yield fakes
    for fake in fakes:
        fake.stop()


@pytest.fixture(params=["sync", "async"])
def connect_replicas(
    request: pytest.FixtureRequest, replicas: list[FakeServer], background_loop: asyncio.AbstractEventLoop
) -> Iterator[Callable[..., Client]]:
    """Opens clients of either kind on both replicas, as one "ipv4:" target of two addresses."""
    target = "ipv4:" + ",".join(f"127.0.0.1:{fake.port}" for fake in replicas)
    opened: list[Client] = []

    def open_client(**kwargs: Any) -> Client:
        kwargs.setdefault("retry", FAST_RETRY)
        client: Client
        if request.param == "sync":
            client = RerankerClient(target, **kwargs)
        else:
            client = OnLoop(background_loop, target, **kwargs)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


def calls_per_replica(replicas: list[FakeServer], method: str = "Rerank") -> list[int]:
    return [fake.reranker.attempts[method] for fake in replicas]


def both_connected(client: Client, replicas: list[FakeServer]) -> None:
    """Call until each replica took a call (round_robin uses a replica once it is connected), then
    forget those calls."""
    deadline = time.monotonic() + 30
    while 0 in calls_per_replica(replicas):
        assert time.monotonic() < deadline, "a replica never took a call"
        client.rerank("q", DOCUMENTS)
    for fake in replicas:
        fake.reranker.attempts.clear()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within 30 s"
        time.sleep(0.02)


def test_calls_take_turns_across_replicas(
    connect_replicas: Callable[..., Client], replicas: list[FakeServer]
) -> None:
    client = connect_replicas()
    both_connected(client, replicas)
    for _ in range(10):
        client.rerank("q", DOCUMENTS)
    client.stream_rerank("q", DOCUMENTS, top_n=1)
    client.stream_rerank("q", DOCUMENTS, top_n=1)
    assert calls_per_replica(replicas) == [5, 5]
    assert calls_per_replica(replicas, "StreamRerank") == [1, 1]


def test_a_replica_not_serving_gets_no_calls_until_it_serves_again(
    connect_replicas: Callable[..., Client], replicas: list[FakeServer]
) -> None:
    client = connect_replicas()
    both_connected(client, replicas)
    draining, other = replicas

    def calls_reach(fake: FakeServer) -> Callable[[], bool]:
        def reached() -> bool:
            fake.reranker.attempts.clear()
            for _ in range(4):
                client.rerank("q", DOCUMENTS)
            return fake.reranker.attempts["Rerank"] > 0

        return reached

    draining.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    # gRPC learns it over Health/Watch, promptly but not at once.
    wait_for(lambda: not calls_reach(draining)(), "the NOT_SERVING replica left out")
    other.reranker.attempts.clear()
    for _ in range(20):
        client.rerank("q", DOCUMENTS)
    assert calls_per_replica(replicas) == [0, 20]

    draining.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    wait_for(calls_reach(draining), "the replica SERVING again taken back")


def test_a_retry_lands_on_the_other_replica(
    connect_replicas: Callable[..., Client], replicas: list[FakeServer]
) -> None:
    client = connect_replicas()
    both_connected(client, replicas)
    for fake in replicas:
        fake.reranker.fail("Rerank", Failure(grpc.StatusCode.UNAVAILABLE, "busy"))
    # Each replica refuses once: the first attempt fails on one, the retry on the other (had it
    # gone to the same replica, it would have succeeded there), the third succeeds.
    client.rerank("q", DOCUMENTS)
    assert sorted(calls_per_replica(replicas)) == [1, 2]


def test_a_server_not_serving_fails_calls_fast_but_health_still_answers(
    connect: Callable[..., Client], server: FakeServer
) -> None:
    client = connect()
    assert client.health() == "SERVING"
    server.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    wait_for(lambda: server.reranker.attempts["Rerank"] == 0 and _refused(client), "calls refused")
    server.reranker.attempts.clear()
    with pytest.raises(UnavailableError):
        client.rerank("q", DOCUMENTS)
    assert server.reranker.attempts["Rerank"] == 0  # never sent: gRPC knows the server is not SERVING
    assert (client.health(), client.health(HEALTH_SERVICE), client.health("liveness")) == (
        "NOT_SERVING",
        "NOT_SERVING",
        "SERVING",
    )
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
    server.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    wait_for(lambda: not _refused(client), "calls served again")


def _refused(client: Client) -> bool:
    try:
        client.rerank("q", DOCUMENTS)
    except UnavailableError:
        return True
    return False


def test_a_caller_service_config_replaces_the_balancing(replicas: list[FakeServer]) -> None:
    target = "ipv4:" + ",".join(f"127.0.0.1:{fake.port}" for fake in replicas)
    first_only = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})
    with RerankerClient(target, options=[("grpc.service_config", first_only)]) as client:
        for _ in range(6):
            client.rerank("q", DOCUMENTS)
    assert calls_per_replica(replicas) == [6, 0]


def test_health_after_close_fails_as_other_calls_do(server: FakeServer) -> None:
    client = RerankerClient(server.target)
    client.close()
    with pytest.raises(ValueError, match="closed channel"):
        client.health()
