"""The real server with two CPU worker processes on a tiny local cross-encoder, through the real client."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import proto_reflection_descriptor_database as reflection_db
from reference import FlagReference
from rerank.v1 import reranker_pb2, reranker_pb2_grpc
from rerank_client import (
    AsyncRerankerClient,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    RerankerClient,
    ResourceExhaustedError,
)

from integration.conftest import StartServer
from integration.server_process import ServerProcess

pytestmark = pytest.mark.integration

TOLERANCE = 1e-5
QUERY = "what do giant pandas eat?"
WORDS = [
    "panda",
    "bamboo",
    "bear",
    "forest",
    "china",
    "eats",
    "sleeps",
    "mountain",
    "river",
    "leaf",
    "zoo",
    "cub",
    "black",
    "white",
]


def corpus(n: int, words: int = 12, seed: int = 0) -> list[str]:
    """n deterministic documents of varied length."""
    out = []
    for i in range(n):
        k = 3 + (i * 7 + seed) % words
        # The tiny models' vocabulary has no digits: spell i in words so documents differ in tokens.
        number = " ".join(WORDS[int(digit)] for digit in str(i))
        out.append(" ".join(WORDS[(i * 3 + j + seed) % len(WORDS)] for j in range(k)) + f" number {number}")
    return out


# About ten seconds of work for the tiny model (a second to tokenize): 4,000 pairs of 350 tokens.
SLOW_REQUEST = [f"{i} " + " ".join(WORDS * 14) for i in range(4000)]
DOCUMENTS = [
    "Giant pandas eat bamboo almost all day.",
    "",
    "Le panda géant mange du bambou 🐼",
    "The train leaves from platform four.",
    " ".join(WORDS * 60),  # longer than max_length: cut
]


@pytest.fixture(scope="module")
def server(start_module_server: StartServer, bert_cross_encoder_dir: Path) -> ServerProcess:
    return start_module_server(
        "--model", f"tiny-bert={bert_cross_encoder_dir}",
        "--dtype", "float32",  # scores are compared with float32 references
        "--cpu-replicas", "2",
        "--max-documents", "20000",
        "--max-queued-pairs", "25000",
        "--stream-window", "1024",
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    with RerankerClient(server.target, retry=None, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(bert_cross_encoder_dir: Path) -> FlagReference:
    return FlagReference(bert_cross_encoder_dir, "bert")


def expected_raw(
    reference: FlagReference, query: str, documents: list[str], max_length: int = 512
) -> list[float]:
    return [reference.score(reference.row(query, d, max_length)) for d in documents]


def wait_idle(server: ServerProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server.metric("rerank_queued_pairs") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let batches already in a model finish


def wait_for_metric_above(server: ServerProcess, name: str, value: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server.metric(name) <= value and time.monotonic() < deadline:
        time.sleep(0.01)


def test_raw_scores_equal_the_in_process_reference(client: RerankerClient, reference: FlagReference) -> None:
    result = client.rerank(QUERY, DOCUMENTS, raw_scores=True)
    expected = expected_raw(reference, QUERY, DOCUMENTS)
    got = {r.index: r.score for r in result.results}
    assert sorted(got) == list(range(len(DOCUMENTS)))
    for index, score in got.items():
        assert score == pytest.approx(expected[index], abs=TOLERANCE)
    assert result.model == "tiny-bert"
    assert result.usage.documents == len(DOCUMENTS)
    assert result.usage.truncated == 1
    assert result.usage.tokens == sum(len(reference.row(QUERY, d, 512).input_ids) for d in DOCUMENTS)


def test_max_length_is_applied_like_the_reference(client: RerankerClient, reference: FlagReference) -> None:
    result = client.rerank(QUERY, DOCUMENTS, raw_scores=True, max_length=16)
    expected = expected_raw(reference, QUERY, DOCUMENTS, max_length=16)
    for r in result.results:
        assert r.score == pytest.approx(expected[r.index], abs=TOLERANCE)


def test_normalized_scores_are_the_sigmoid_of_raw_scores(client: RerankerClient) -> None:
    raw = {r.index: r.score for r in client.rerank(QUERY, DOCUMENTS, raw_scores=True).results}
    normalized = client.rerank(QUERY, DOCUMENTS).results
    for r in normalized:
        assert 0.0 <= r.score <= 1.0
        assert r.score == pytest.approx(1 / (1 + math.exp(-raw[r.index])), abs=1e-6)


def test_results_are_sorted_and_cut_to_top_n(client: RerankerClient) -> None:
    documents = corpus(50)
    full = client.rerank(QUERY, documents).results
    keys = [(-r.score, r.index) for r in full]
    assert keys == sorted(keys)
    top = client.rerank(QUERY, documents, top_n=5).results
    assert [(r.index, r.score) for r in top] == [(r.index, r.score) for r in full[:5]]
    assert all(r.document is None for r in top)
    with_text = client.rerank(QUERY, documents, top_n=5, return_documents=True).results
    assert [r.document for r in with_text] == [documents[r.index] for r in top]
    assert len(client.rerank(QUERY, documents, top_n=1000).results) == len(documents)


def test_stream_of_20000_documents_matches_rerank(server: ServerProcess, client: RerankerClient) -> None:
    documents = corpus(20_000)
    unary = client.rerank(QUERY, documents, return_documents=True)
    unary_score = {r.index: r.score for r in unary.results}
    wait_idle(server)
    taken = 0

    def lazily():
        nonlocal taken
        for document in documents:
            taken += 1
            yield document

    batches: list[int] = []
    seen: set[int] = set()
    taken_at_first_scores: list[int] = []

    def on_scored(chunk) -> None:
        if not batches:
            taken_at_first_scores.append(taken)
        batches.append(len(chunk))
        seen.update(r.index for r in chunk)

    queued: list[float] = []
    streaming = threading.Event()

    def sample_queue() -> None:
        while not streaming.wait(0.02):
            queued.append(server.metric("rerank_queued_pairs"))

    sampler = threading.Thread(target=sample_queue)
    sampler.start()
    try:
        streamed = client.stream_rerank(
            QUERY, lazily(), top_n=10, return_documents=True, chunk_size=500, on_scored=on_scored
        )
    finally:
        streaming.set()
        sampler.join()
    # The server holds at most its window (1024 here) of the stream, however long the stream is.
    assert 0 < max(queued) <= 1024, f"queued pairs sampled during the stream: {queued}"
    assert len(batches) > 1  # scores came as they finished, before the final
    assert sum(batches) == 20_000 and seen == set(range(20_000))
    # The same top 10: batches differ between the two calls, so equal scores may differ in the
    # last bits and swap places; each document's score must agree, and the ranks' scores too.
    assert len(streamed.results) == 10
    for s, u in zip(streamed.results, unary.results[:10], strict=True):
        assert s.score == pytest.approx(u.score, abs=TOLERANCE)
        assert s.score == pytest.approx(unary_score[s.index], abs=TOLERANCE)
        assert s.document == documents[s.index]
    assert len({r.index for r in streamed.results} ^ {r.index for r in unary.results[:10]}) <= 2
    assert streamed.usage.documents == 20_000
    assert streamed.usage.tokens == unary.usage.tokens


def test_sixteen_concurrent_clients_all_get_correct_answers(
    server: ServerProcess, reference: FlagReference
) -> None:
    def call(i: int) -> tuple[int, list[float], list[float]]:
        documents = corpus(40, seed=i)
        query = f"{QUERY} {WORDS[i % len(WORDS)]}"
        with RerankerClient(server.target, retry=None, timeout=120) as own:
            result = own.rerank(query, documents, raw_scores=True)
        got = [s for _, s in sorted((r.index, r.score) for r in result.results)]
        return i, got, expected_raw(reference, query, documents)

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(call, range(16)))
    assert len(outcomes) == 16
    for _, got, expected in outcomes:
        assert got == pytest.approx(expected, abs=TOLERANCE)


def test_list_models_health_and_reflection(server: ServerProcess, client: RerankerClient) -> None:
    (model,) = client.list_models()
    assert (model.name, model.family, model.replicas, model.ready_replicas, model.ready) == (
        "tiny-bert", "cross-encoder", 2, 2, True,
    )  # fmt: skip
    assert model.devices == ["cpu", "cpu"] and model.dtype == "float32"
    assert (model.max_length, model.max_length_limit) == (512, 512)
    assert client.health() == "SERVING"
    assert client.health("rerank.v1.Reranker") == "SERVING"
    with grpc.insecure_channel(server.target) as channel:
        services = reflection_db.ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"rerank.v1.Reranker", "grpc.health.v1.Health"} <= set(services)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"query": "", "documents": ["a"]}, InvalidArgumentError, "query is empty"),
        ({"query": "q", "documents": []}, InvalidArgumentError, "documents is empty"),
        ({"query": "q", "documents": ["a"] * 20_001}, InvalidArgumentError, "exceed the limit of 20000"),
        (
            {"query": "q" * 20_001, "documents": ["a"]},
            InvalidArgumentError,
            "query has 20001 characters; the limit is 20000",
        ),
        (
            {"query": "q", "documents": ["a", "d" * 200_001]},
            InvalidArgumentError,
            "document 1 has 200001 characters; the limit is 200000",
        ),
        ({"query": "q", "documents": ["a"], "model": "nope"}, NotFoundError, "'nope' is not served"),
        (
            {"query": "q", "documents": ["a"], "max_length": 513},
            InvalidArgumentError,
            "exceeds the limit of 512",
        ),
        ({"query": "q", "documents": ["a"], "max_length": 2}, InvalidArgumentError, "too short"),
        (
            {"query": "q", "documents": ["short", " ".join(WORDS * 60)], "truncation": "none"},
            InvalidArgumentError,
            "document 1 needs",
        ),
        (
            {"query": "q", "documents": ["a"], "instruction": "judge"},
            InvalidArgumentError,
            "takes no instruction",
        ),
        (
            {"query": "q", "documents": ["a"], "cutoff_layer": 3},
            InvalidArgumentError,
            "cutoff_layer is for layerwise models",
        ),
    ],
    ids=[
        "empty-query",
        "no-documents",
        "too-many",
        "query-too-long",
        "document-too-long",
        "unknown-model",
        "max-length-high",
        "max-length-low",
        "no-fit",
        "instruction",
        "cutoff-layer",
    ],
)
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(
    client: RerankerClient, kwargs: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        client.rerank(**kwargs)
    assert len(client.rerank(QUERY, ["still serving"]).results) == 1


def test_a_reply_over_grpcs_default_4_mib_reaches_a_default_client(client: RerankerClient) -> None:
    documents = [f"{i} " + "w" * 150_000 for i in range(40)]  # 6 MB of documents sent back
    result = client.rerank(QUERY, documents, return_documents=True)
    assert sorted(r.document for r in result.results) == sorted(documents)


def test_an_empty_document_is_scored_like_any_other(client: RerankerClient, reference: FlagReference) -> None:
    (only,) = client.rerank(QUERY, [""], raw_scores=True).results
    assert only.score == pytest.approx(expected_raw(reference, QUERY, [""])[0], abs=TOLERANCE)


def test_bad_streams_get_invalid_argument(server: ServerProcess, client: RerankerClient) -> None:
    with pytest.raises(InvalidArgumentError, match="top_n between 1 and"):
        client.stream_rerank(QUERY, iter(["a", "b"]), top_n=0)
    with pytest.raises(InvalidArgumentError, match="no documents"):
        client.stream_rerank(QUERY, iter([]), top_n=3)
    later = iter(["a"] * 600 + ["d" * 200_001])  # past the first chunk of 512
    with pytest.raises(InvalidArgumentError, match="document 600 has 200001 characters"):
        client.stream_rerank(QUERY, later, top_n=3)
    with grpc.insecure_channel(server.target) as channel:
        stub = reranker_pb2_grpc.RerankerStub(channel)
        chunk = reranker_pb2.StreamRerankRequest(documents=reranker_pb2.DocumentChunk(documents=["a"]))
        with pytest.raises(grpc.RpcError) as no_header:
            list(stub.StreamRerank(iter([chunk]), timeout=30))
        assert no_header.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        header = reranker_pb2.StreamRerankRequest(header=reranker_pb2.RerankRequest(query="q", top_n=1))
        with pytest.raises(grpc.RpcError) as two_headers:
            list(stub.StreamRerank(iter([header, header]), timeout=30))
        assert two_headers.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "only the first" in two_headers.value.details()
    assert len(client.rerank(QUERY, ["still serving"]).results) == 1


def test_a_full_queue_fails_fast_with_resource_exhausted(
    server: ServerProcess, client: RerankerClient
) -> None:
    wait_idle(server)
    documents = corpus(20_000)
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(client.rerank, QUERY, documents, top_n=1)
        wait_for_metric_above(server, "rerank_queued_pairs", 10_000)
        started = time.monotonic()
        with pytest.raises(ResourceExhaustedError, match="queue full"):
            client.rerank(QUERY, documents, top_n=1)
        assert time.monotonic() - started < 5
        assert len(big.result(timeout=120).results) == 1


def test_an_expired_deadline_keeps_the_rest_of_the_request_out_of_the_model(
    server: ServerProcess, client: RerankerClient
) -> None:
    wait_idle(server)
    scored_before = server.metric("rerank_pairs_scored_total")
    dropped_before = _dropped(server)
    with pytest.raises(DeadlineExceededError):
        # Long enough to tokenize and queue the pairs, far too short to score them all.
        client.rerank(QUERY, SLOW_REQUEST, timeout=5.0)
    scored, dropped = _accounted(server, scored_before, dropped_before, len(SLOW_REQUEST))
    assert dropped > 0
    assert scored + dropped == len(SLOW_REQUEST)
    assert len(client.rerank(QUERY, ["still serving"]).results) == 1


def test_a_cancelled_call_keeps_the_rest_of_the_request_out_of_the_model(server: ServerProcess) -> None:
    wait_idle(server)
    scored_before = server.metric("rerank_pairs_scored_total")
    dropped_before = _dropped(server)

    async def cancel_midway() -> None:
        async with AsyncRerankerClient(server.target, retry=None) as own:
            call = asyncio.ensure_future(own.rerank(QUERY, SLOW_REQUEST))
            await asyncio.to_thread(wait_for_metric_above, server, "rerank_pairs_scored_total", scored_before)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(cancel_midway())
    scored, dropped = _accounted(server, scored_before, dropped_before, len(SLOW_REQUEST))
    assert dropped > 0
    assert scored + dropped == len(SLOW_REQUEST)


def _accounted(
    server: ServerProcess, scored_before: float, dropped_before: float, pairs: int
) -> tuple[float, float]:
    """The pairs scored and dropped since, once they account for `pairs` (batches already in a model
    finish in their own time on a loaded machine), or after 60 s."""
    deadline = time.monotonic() + 60
    while True:
        scored = server.metric("rerank_pairs_scored_total") - scored_before
        dropped = _dropped(server) - dropped_before
        if scored + dropped >= pairs or time.monotonic() > deadline:
            return scored, dropped
        time.sleep(0.05)


def _dropped(server: ServerProcess) -> float:
    return sum(server.metric("rerank_pairs_dropped_total", {"reason": r}) for r in ("cancelled", "deadline"))


def test_the_container_health_check_command(server: ServerProcess) -> None:
    import subprocess
    import sys

    from integration.server_process import free_port

    command = [sys.executable, "-m", "rerank_client.healthcheck"]
    healthy = subprocess.run([*command, server.target], capture_output=True, text=True, timeout=60)
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "SERVING")
    nobody = subprocess.run(
        [*command, f"127.0.0.1:{free_port()}", "--timeout", "1"], capture_output=True, timeout=60
    )
    assert nobody.returncode == 1


def test_the_async_client_sees_a_refused_stream_with_its_own_status(server: ServerProcess) -> None:
    """A refusal must not turn into INTERNAL while the client is still writing (grpc issue 36066)."""

    async def refused_streams() -> None:
        async with AsyncRerankerClient(server.target, retry=None) as own:
            for _ in range(20):
                with pytest.raises(InvalidArgumentError, match="top_n between 1 and"):
                    await own.stream_rerank(QUERY, corpus(200), top_n=0, chunk_size=10)
                with pytest.raises(NotFoundError):
                    await own.stream_rerank(QUERY, corpus(200), top_n=1, model="nope", chunk_size=10)
            result = await own.stream_rerank(QUERY, corpus(200), top_n=3, chunk_size=10)
            assert len(result.results) == 3

    asyncio.run(refused_streams())
