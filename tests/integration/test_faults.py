"""Faults inside workers, through the real server: a hung worker, and a model that raises."""

from __future__ import annotations

import contextlib
import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from rerank_client import InternalError, RerankerClient, RerankResult

from integration.conftest import StartServer
from integration.server_process import _alive, wait_until
from integration.test_serving import QUERY, TOLERANCE, corpus

pytestmark = pytest.mark.integration

UNEMBEDDED_WORD = "zebra"  # the tokenizer knows it; the model has no embedding for it


@pytest.fixture(scope="module")
def failing_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_bert_cross_encoder_with_unembedded_word

    return build_bert_cross_encoder_with_unembedded_word(
        tmp_path_factory.mktemp("unembedded"), UNEMBEDDED_WORD
    )


def scores(result: RerankResult) -> dict[int, float]:
    return {ranked.index: ranked.score for ranked in result.results}


def assert_same_scores(got: RerankResult, expected: dict[int, float]) -> None:
    found = scores(got)
    assert found.keys() == expected.keys()
    assert all(abs(found[i] - expected[i]) < TOLERANCE for i in found), (found, expected)


@contextlib.contextmanager
def stopped(pid: int):
    """SIGSTOP a worker; SIGCONT it on the way out if it still lives."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGCONT)


def test_a_hung_worker_is_killed_and_replaced_and_its_batch_runs_elsewhere(
    start_server: StartServer, bert_cross_encoder_dir: Path
) -> None:
    # float32: scores compared across calls within 1e-5. A 2 s floor: the tiny model's batches take
    # milliseconds, so only the stopped worker's batch runs past it.
    server = start_server(
        "--model", str(bert_cross_encoder_dir), "--dtype", "float32", "--cpu-replicas", "2",
        "--restart-backoff-s", "0.2", "--batch-timeout-floor-s", "2",
    )  # fmt: skip
    wait_until(lambda: server.metric("rerank_replicas_ready") == 2, 120, "both replicas")
    documents = corpus(300)
    hung, healthy = server.worker_pids()
    with RerankerClient(server.target, retry=None) as client:
        expected = scores(client.rerank(QUERY, documents))
        with stopped(hung):
            # Two idle replicas share the request: part of it goes to the stopped worker.
            assert_same_scores(client.rerank(QUERY, documents, timeout=60), expected)
        assert server.metric("rerank_worker_restarts_total", {"reason": "hung"}) == 1
        assert server.metric("rerank_batches_lost_total") >= 1
        wait_until(lambda: not Path(f"/proc/{hung}").exists(), 30, "the killed worker to be reaped")
        wait_until(
            lambda: server.metric("rerank_replicas_ready") == 2 and len(server.worker_pids()) == 2,
            120,
            "a replacement worker",
        )
        assert healthy in server.worker_pids()
        assert client.health() == "SERVING"
        assert_same_scores(client.rerank(QUERY, documents, timeout=60), expected)
    assert server.metric("rerank_worker_restarts_total") == 1  # the hung one only
    assert "hung on batch" in server.log()


def test_a_model_exception_fails_only_its_request_with_a_generic_internal_error(
    start_server: StartServer, failing_model_dir: Path
) -> None:
    server = start_server(
        "--model", str(failing_model_dir), "--dtype", "float32", "--cpu-replicas", "1",
        "--batch-timeout-floor-s", "300",
    )  # fmt: skip
    [worker] = server.worker_pids()
    healthy = corpus(3)
    # Longer than every healthy document, so that, queued first, it leads a batch they all fit.
    failing = [f"{UNEMBEDDED_WORD} {max(healthy, key=len)}"]
    with RerankerClient(server.target, retry=None, timeout=120) as client, ThreadPoolExecutor(4) as pool:
        expected = scores(client.rerank(QUERY, healthy))

        def send(documents: list[str]) -> Future[RerankResult]:
            return pool.submit(client.rerank, QUERY, documents)

        def metric(name: str) -> float:
            return server.metric(name)

        batches = metric("rerank_batches_total")
        with stopped(worker):
            # Two calls fill the stopped worker's two batch slots; the next two wait in the queue, the
            # failing one first, and then share one batch.
            blockers = [send(healthy[:1]), send(healthy[:1])]
            wait_until(
                lambda: metric("rerank_batches_total") == batches + 2, 30, "the worker's slots to fill"
            )
            failing_call = send(failing)
            wait_until(lambda: metric("rerank_queued_pairs") == 1, 30, "the failing call to queue")
            healthy_call = send(healthy)
            wait_until(lambda: metric("rerank_queued_pairs") == 1 + len(healthy), 30, "both calls to queue")
        with pytest.raises(InternalError) as failed:
            failing_call.result(timeout=120)
        assert_same_scores(healthy_call.result(timeout=120), expected)
        for blocker in blockers:
            assert len(blocker.result(timeout=120).results) == 1
        assert client.health() == "SERVING"
    assert failed.value.message == "the model failed on this request"
    # Once shared with the healthy call's pairs, once alone: the healthy call ran apart and succeeded.
    assert metric("rerank_batches_failed_total") == 2
    assert server.worker_pids() == [worker]  # the worker serves on
    assert server.metric("rerank_worker_restarts_total") == 0
    assert "IndexError" in server.log()  # the detail stays in the server's log
