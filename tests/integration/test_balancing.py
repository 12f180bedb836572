"""One client balancing over two real servers: each serves a share, and one drains with no call failing."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rerank_client import AsyncRerankerClient, RerankerClient, RerankError

from integration.conftest import StartServer
from integration.server_process import ServerProcess, wait_until

pytestmark = pytest.mark.integration

DOCUMENTS = [f"bamboo forest panda number {i}" for i in range(8)]
THREADS = 4


def replicas(start: StartServer, model: Path) -> tuple[ServerProcess, ServerProcess, str]:
    """Two cheap servers, and the target naming both. Their scores are stand-ins (the tests count
    calls, not scores) that take a few milliseconds a batch, as a device would without using the
    CPU, so calls are in flight when one drains."""
    args = ["--model", str(model), "--cpu-replicas", "1", "--scorer", "simulated"]
    args += ["--simulated-us-per-token", "50", "--grace-period-s", "20"]
    started = [start(*args) for _ in range(2)]
    return started[0], started[1], "ipv4:" + ",".join(server.target for server in started)


def served(server: ServerProcess) -> float:
    """Rerank calls this server finished successfully (over every model label)."""
    return server.metric("rerank_requests_total", {"method": "Rerank", "code": "OK"})


def reached(server: ServerProcess) -> float:
    """Rerank calls that reached this server, whatever their outcome (a refusal too)."""
    return server.metric("rerank_requests_total", {"method": "Rerank"})


def test_calls_are_shared_and_a_draining_replica_gets_none(
    start_server: StartServer, bert_cross_encoder_dir: Path
) -> None:
    first, second, target = replicas(start_server, bert_cross_encoder_dir)
    outcomes: list[str] = []
    stop, release, streaming = threading.Event(), threading.Event(), threading.Event()

    def held_documents() -> Iterator[str]:
        """A stream that lasts until `release`: the server it runs on drains until then."""
        yield from DOCUMENTS
        release.wait(60)
        yield "the last document"

    with (
        RerankerClient(target, timeout=60) as client,
        RerankerClient(first.target, timeout=60) as first_only,
        ThreadPoolExecutor(THREADS + 1) as pool,
    ):
        for _ in range(6):  # round_robin sends calls to a server once connected: connect both
            client.rerank("q", DOCUMENTS)

        def load() -> None:
            while not stop.is_set():
                try:
                    client.rerank("q", DOCUMENTS, top_n=2)
                    outcomes.append("ok")
                except RerankError as error:  # the default retry policy gave up
                    outcomes.append(f"failed: {error}")

        # Started before the load: under a load that keeps its server busy with Rerank calls, a
        # stream's batches wait (interactive calls go first).
        streamed = pool.submit(
            first_only.stream_rerank,
            "q",
            held_documents(),
            top_n=3,
            chunk_size=len(DOCUMENTS),
            on_scored=lambda _: streaming.set(),
        )
        assert streaming.wait(30), "the stream did not start"
        before = served(first), served(second)
        workers = [pool.submit(load) for _ in range(THREADS)]
        try:
            wait_until(lambda: len(outcomes) >= 200, 60, "200 calls")
            shares = served(first) - before[0], served(second) - before[1]
            first.process.send_signal(signal.SIGTERM)  # under load: calls are in flight on it
            wait_until(lambda: "draining" in first.log(), 10, "the drain")
            time.sleep(1.0)  # NOT_SERVING reaches the client over Health/Watch in milliseconds
            refused, mark = reached(first), len(outcomes)
            wait_until(lambda: len(outcomes) >= mark + 50, 60, "50 calls while it drains")
            assert reached(first) == refused  # none went to the draining server
            release.set()
            assert streamed.result(60).usage.documents == len(DOCUMENTS) + 1  # it finished there
            assert first.process.wait(40) == 0, first.log()

            mark, since = len(outcomes), served(second)
            wait_until(lambda: len(outcomes) >= mark + 50, 60, "50 calls after it stopped")
        finally:
            stop.set()
            release.set()
        for worker in workers:
            worker.result(timeout=60)
        taken = served(second) - since
        assert client.health() == "SERVING"  # the server left answers
    assert [outcome for outcome in outcomes if outcome != "ok"] == []
    # Round robin alternates: each server took close to half of the first 200 calls.
    assert min(shares) >= 0.3 * sum(shares), shares
    # Every call that finished after the drain went to the server left (bar those under way).
    assert taken >= len(outcomes) - mark - THREADS


async def test_the_async_client_balances_too(start_server: StartServer, bert_cross_encoder_dir: Path) -> None:
    first, second, target = replicas(start_server, bert_cross_encoder_dir)
    async with AsyncRerankerClient(target, timeout=60) as client:
        for _ in range(6):
            await client.rerank("q", DOCUMENTS)
        before = served(first), served(second)
        for _ in range(5):
            await asyncio.gather(*(client.rerank("q", DOCUMENTS) for _ in range(8)))
        shares = served(first) - before[0], served(second) - before[1]
    assert sum(shares) == 40
    assert min(shares) >= 12, shares
