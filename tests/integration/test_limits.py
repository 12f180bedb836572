"""Bounded load on the real server, through the real client: limits on calls and streams in flight,
idle and vanishing stream clients, overload at three times capacity, fair tokenizing, reply size.

The servers score with `--scorer simulated` (a sleep per padded token, no CPU) or `null`, so their
capacity is known and the loaded test machine's CPU does not decide the outcome.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from rerank.v1 import reranker_pb2 as pb
from rerank.v1 import reranker_pb2_grpc as pb_grpc
from rerank_bench.machine import proc_memory_mib, reset_peak_rss
from rerank_client import (
    AsyncRerankerClient,
    InvalidArgumentError,
    RerankerClient,
    ResourceExhaustedError,
)

from integration.conftest import StartServer
from integration.server_process import ServerProcess, wait_until
from integration.test_serving import QUERY, WORDS, corpus

pytestmark = pytest.mark.integration

IDLE_S = 1.5
WINDOW = 1024
# A client channel that lets little unread data pile up, so a client that stops reading blocks the
# server's writes soon (gRPC would otherwise buffer megabytes for it).
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


@pytest.fixture(scope="module")
def limited(start_module_server: StartServer, bert_cross_encoder_dir: Path) -> ServerProcess:
    """0.25 ms per padded token: a pair of about 24 tokens takes 6 ms, 200 of them over a second."""
    return start_module_server(
        "--model", f"tiny-bert={bert_cross_encoder_dir}",
        "--scorer", "simulated", "--simulated-us-per-token", "250",
        "--cpu-replicas", "1",
        "--max-concurrent-calls", "3",
        "--max-concurrent-streams", "1",
        "--max-queue-delay-ms", "0",
        "--stream-idle-timeout-s", str(IDLE_S),
        "--stream-window", str(WINDOW),
        "--max-message-mb", "1",
    )  # fmt: skip


def dropped(server: ServerProcess) -> float:
    return server.metric("rerank_pairs_dropped_total", {"reason": "cancelled"})


def ended(server: ServerProcess, code: str) -> float:
    return server.metric("rerank_requests_total", {"method": "StreamRerank", "code": code})


def header(documents: list[str], top_n: int = 3) -> pb.StreamRerankRequest:
    return pb.StreamRerankRequest(header=pb.RerankRequest(query=QUERY, documents=documents, top_n=top_n))


def chunk(documents: list[str]) -> pb.StreamRerankRequest:
    return pb.StreamRerankRequest(documents=pb.DocumentChunk(documents=documents))


def test_calls_past_the_limit_in_flight_get_resource_exhausted_naming_it(limited: ServerProcess) -> None:
    documents = corpus(200)  # about 1.2 s of simulated work each
    with RerankerClient(limited.target, retry=None, timeout=60) as client, ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(client.rerank, QUERY, documents, top_n=1) for _ in range(3)]
        wait_until(lambda: limited.metric("rerank_queued_pairs") >= 400, 30, "three calls under way")
        started = time.monotonic()
        with pytest.raises(
            ResourceExhaustedError, match=r"3 Rerank calls in flight, the limit \(max_concurrent_calls\)"
        ):
            client.rerank(QUERY, ["one more"])
        assert time.monotonic() - started < 5  # refused at once, not queued
        assert all(len(call.result(timeout=60).results) == 1 for call in calls)
        assert len(client.rerank(QUERY, ["room again"]).results) == 1


def test_streams_past_the_limit_are_refused_and_an_idle_one_is_ended(limited: ServerProcess) -> None:
    release = threading.Event()

    def silent_after_header() -> Iterator[pb.StreamRerankRequest]:
        yield header(["panda bamboo"])
        release.wait(60)

    with grpc.insecure_channel(limited.target) as channel:
        stub = pb_grpc.RerankerStub(channel)
        idle = stub.StreamRerank(silent_after_header(), timeout=60)
        try:
            idle.initial_metadata()  # accepted: it holds the one stream allowed
            opened = time.monotonic()
            with (
                RerankerClient(limited.target, retry=None, timeout=30) as client,
                pytest.raises(
                    ResourceExhaustedError,
                    match=r"1 StreamRerank calls in flight, the limit \(max_concurrent_streams\)",
                ),
            ):
                client.stream_rerank(QUERY, iter(corpus(10)), top_n=1)
            with pytest.raises(grpc.RpcError) as ended_idle:
                for response in idle:
                    assert response.WhichOneof("kind") == "scored"  # its one document, then nothing
            waited = time.monotonic() - opened
        finally:
            release.set()
    assert ended_idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"sent nothing for {IDLE_S:g} s" in ended_idle.value.details()
    assert "stream_idle_timeout_s" in ended_idle.value.details()
    assert IDLE_S - 0.5 < waited < IDLE_S + 10
    with RerankerClient(limited.target, retry=None, timeout=30) as client:  # the slot is free again
        assert len(client.stream_rerank(QUERY, iter(corpus(10)), top_n=2).results) == 2


def test_a_client_that_stops_reading_is_ended_and_its_pending_pairs_dropped(limited: ServerProcess) -> None:
    taken = 0
    release = threading.Event()

    def documents() -> Iterator[pb.StreamRerankRequest]:
        nonlocal taken
        yield header(corpus(64))
        for start in range(64, 1_000_000, 64):
            taken = start
            yield chunk(corpus(64, seed=start))
        release.wait(60)

    dropped_before, ended_before = dropped(limited), ended(limited, "DEADLINE_EXCEEDED")
    reset_peak_rss(limited.process.pid)
    rss_before = proc_memory_mib(limited.process.pid)["VmRSS"]
    with grpc.insecure_channel(limited.target, options=SMALL_WINDOW) as channel:
        call = pb_grpc.RerankerStub(channel).StreamRerank(documents(), timeout=120)
        try:
            call.initial_metadata()  # then it reads nothing
            wait_until(lambda: ended(limited, "DEADLINE_EXCEEDED") > ended_before, 60, "the stream to end")
            with pytest.raises(grpc.RpcError) as stopped:
                for _ in call:  # what was sent before the end, then its status
                    pass
        finally:
            release.set()
    assert stopped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"read nothing for {IDLE_S:g} s" in stopped.value.details()
    assert dropped(limited) > dropped_before  # its queued pairs never reached the model
    # The server stopped reading at its window: the client could send only what gRPC's flow control
    # windows hold (a few MB), not its million documents.
    assert taken < 200_000
    assert proc_memory_mib(limited.process.pid)["VmHWM"] - rss_before < 100
    with RerankerClient(limited.target, retry=None, timeout=30) as client:
        assert client.health() == "SERVING"
        assert len(client.rerank(QUERY, ["still serving"]).results) == 1


def test_a_vanished_stream_client_has_its_pairs_dropped(limited: ServerProcess) -> None:
    dropped_before = dropped(limited)

    async def vanish() -> None:
        async with AsyncRerankerClient(limited.target, retry=None) as client:
            scored = asyncio.Event()
            stream = asyncio.ensure_future(
                client.stream_rerank(QUERY, corpus(5000), top_n=3, on_scored=lambda _: scored.set())
            )
            await asyncio.wait_for(scored.wait(), 30)
            stream.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stream

    asyncio.run(vanish())
    wait_until(lambda: dropped(limited) > dropped_before, 30, "its pairs to be dropped")
    wait_until(lambda: limited.metric("rerank_queued_pairs") == 0, 30, "an empty queue")
    with RerankerClient(limited.target, retry=None, timeout=30) as client:
        assert client.health() == "SERVING"
        assert len(client.rerank(QUERY, ["still serving"]).results) == 1


def test_a_reply_past_the_message_limit_is_refused_before_any_work(limited: ServerProcess) -> None:
    # 1.0 MB of documents: the request fits the server's 1 MiB, a reply with them all would not.
    documents = [f"{i:05d} " + "w" * 94 for i in range(10_000)]
    scored_before = limited.metric("rerank_pairs_scored_total")
    with RerankerClient(limited.target, retry=None, timeout=60) as client:
        began = time.monotonic()
        with pytest.raises(InvalidArgumentError, match=r"over the limit of 1 MiB \(max_message_mb\)"):
            client.rerank(QUERY, documents, return_documents=True)
        with pytest.raises(InvalidArgumentError, match="max_message_mb"):
            client.rerank(QUERY, documents, top_n=9_000, return_documents=True)
        assert time.monotonic() - began < 10  # 10,000 pairs would take a minute to score
        assert limited.metric("rerank_pairs_scored_total") == scored_before  # refused up front
        few = client.rerank(QUERY, documents[:20], top_n=3, return_documents=True).results
    assert [r.document for r in few] == [documents[r.index] for r in few]


US_PER_TOKEN = 200  # the overload test's simulated device
MAX_QUEUE_DELAY_S = 0.05


@pytest.fixture(scope="module")
def overloadable(start_module_server: StartServer, bert_cross_encoder_dir: Path) -> ServerProcess:
    """One simulated device; a batch holds about one request of 10 short pairs (about 50 ms)."""
    return start_module_server(
        "--model", f"tiny-bert={bert_cross_encoder_dir}",
        "--scorer", "simulated", "--simulated-us-per-token", str(US_PER_TOKEN),
        "--cpu-replicas", "1",
        "--max-batch-tokens", "256",
        "--max-queue-delay-ms", str(1000 * MAX_QUEUE_DELAY_S),
    )  # fmt: skip


def test_overload_at_three_times_capacity(overloadable: ServerProcess) -> None:
    documents = corpus(10)
    server = overloadable

    async def unloaded() -> tuple[list[float], int]:
        """Latencies of calls one at a time (which also let the server time its device), and the
        tokens of one call."""
        async with AsyncRerankerClient(server.target, retry=None) as client:
            latencies = []
            for _ in range(20):
                began = time.perf_counter()
                result = await client.rerank(QUERY, documents)
                latencies.append(time.perf_counter() - began)
            return latencies, result.usage.tokens

    async def open_loop(rate: float, seconds: float) -> list[tuple[bool, float]]:
        """Calls at `rate` a second whatever the answers: (accepted, latency) of each."""
        async with AsyncRerankerClient(server.target, retry=None, timeout=60) as client:

            async def call() -> tuple[bool, float]:
                began = time.perf_counter()
                try:
                    await client.rerank(QUERY, documents)
                except ResourceExhaustedError:
                    return False, time.perf_counter() - began
                return True, time.perf_counter() - began

            calls = []
            started = time.perf_counter()
            for n in range(int(rate * seconds)):
                await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
                calls.append(asyncio.ensure_future(call()))
            return await asyncio.gather(*calls)

    latencies, tokens = asyncio.run(unloaded())
    alone = statistics.median(latencies)
    capacity = 1e6 / (tokens * US_PER_TOKEN)  # calls a second the device can score
    reset_peak_rss(server.process.pid)
    rss_before = proc_memory_mib(server.process.pid)["VmRSS"]
    outcomes = asyncio.run(open_loop(3 * capacity, 5.0))
    rss_peak = proc_memory_mib(server.process.pid)["VmHWM"]

    accepted = sorted(latency for ok, latency in outcomes if ok)
    refused = sorted(latency for ok, latency in outcomes if not ok)
    assert len(refused) > len(outcomes) / 2, (len(accepted), len(refused))  # the excess, not queued
    assert len(accepted) > capacity  # and the device kept busy with the rest
    p99_refused = refused[int(0.99 * len(refused))]
    assert p99_refused < 0.1, f"refusals took up to {p99_refused * 1000:.0f} ms"
    # An accepted call waits at most about the queue's delay limit and the batch in the device
    # (one call's time) beyond its own time; 4x leaves room for a loaded machine.
    assert statistics.median(accepted) < 4 * alone, (statistics.median(accepted), alone)
    assert rss_peak - rss_before < 50  # MiB


@pytest.fixture(scope="module")
def one_tokenizer(start_module_server: StartServer, bert_cross_encoder_dir: Path) -> ServerProcess:
    return start_module_server(
        "--model", f"tiny-bert={bert_cross_encoder_dir}",
        "--scorer", "null",
        "--cpu-replicas", "1",
        "--tokenizer-threads", "1",
    )  # fmt: skip


def test_a_small_request_is_not_tokenized_behind_a_large_one(one_tokenizer: ServerProcess) -> None:
    large = [f"{i} " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(150)) for i in range(10_000)]
    with (
        RerankerClient(one_tokenizer.target, retry=None, timeout=120) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        big = pool.submit(client.rerank, QUERY, large, top_n=1)
        time.sleep(0.5)  # the large request is being tokenized
        began = time.perf_counter()
        small = client.rerank(QUERY, ["panda bamboo", "river forest", "white bear"])
        small_s = time.perf_counter() - began
        big_done = big.result(timeout=120)
        big_s = time.perf_counter() - began
    assert len(small.results) == 3
    tokenize_s = big_done.timings.tokenize_ms / 1000
    assert tokenize_s > 1.0  # long enough to have mattered
    assert small_s < tokenize_s / 4, (small_s, tokenize_s)
    assert big_s > 2 * small_s
