"""The HTTP/JSON API of the real server: the same answers as gRPC, every error status with its body,
TLS and bearer tokens, health, metrics and log lines, overload, deadlines, no replica, and the drain.

Two servers for the module: `served` (TLS, bearer tokens, two models, small limits, JSON logs) and
`busy` (mutual TLS, a simulated scorer slow enough to hold calls queued, a short max_call_s).
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from rerank_client import RerankerClient, tls_credentials
from throwaway_pki import Pki

from integration.conftest import StartServer
from integration.server_process import ServerProcess, wait_until
from integration.test_serving import QUERY, corpus

pytestmark = pytest.mark.integration

TOKEN = "tok-http-7c1d2e"
# Scores cross the two transports as float32 (gRPC) and as the same value in JSON.
TOLERANCE = 1e-6
MAX_DOCUMENTS = 20
MAX_DOCUMENT_CHARS = 2000
INSTRUCTION = "Given a question about animals, find what answers it"


@pytest.fixture(scope="module")
def served(
    start_module_server: StartServer,
    pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
    bert_cross_encoder_dir: Path,
    qwen3_dir: Path,
) -> ServerProcess:
    tokens = tmp_path_factory.mktemp("http-tokens") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    return start_module_server(
        "--model", f"tiny-bert={bert_cross_encoder_dir}", "--model", f"qwen={qwen3_dir}",
        "--dtype", "float32", "--cpu-replicas", "1",
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--auth-tokens-file", str(tokens),
        "--max-documents", str(MAX_DOCUMENTS), "--max-document-chars", str(MAX_DOCUMENT_CHARS),
        "--max-message-mb", "1", "--log-format", "json",
        credentials=tls_credentials(pki.ca),
    )  # fmt: skip


@pytest.fixture(scope="module")
def busy(start_module_server: StartServer, pki: Pki, bert_cross_encoder_dir: Path) -> ServerProcess:
    """2 ms per padded token, batches of 8: a batch of corpus(n, words=40) takes about a second, so
    calls of many such documents stay queued for seconds, without using the CPU."""
    return start_module_server(
        "--model", f"tiny-bert={bert_cross_encoder_dir}",
        "--scorer", "simulated", "--simulated-us-per-token", "2000", "--max-batch-size", "8",
        "--cpu-replicas", "1", "--max-queued-pairs", "60", "--max-queue-delay-ms", "0",
        "--max-call-s", "3", "--restart-backoff-s", "2",
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
        credentials=tls_credentials(pki.ca, pki.client_cert, pki.client_key),
    )  # fmt: skip


def http(server: ServerProcess, pki: Pki, *, token: str | None = TOKEN, cert: bool = False) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    headers = {"authorization": f"Bearer {token}"} if token else {}
    assert server.http_url is not None
    return httpx.Client(base_url=server.http_url, verify=context, headers=headers, timeout=60)


def grpc_client(server: ServerProcess, pki: Pki) -> RerankerClient:
    return RerankerClient(
        server.target, credentials=tls_credentials(pki.ca), token=TOKEN, retry=None, timeout=60
    )


def scores(results: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(r["index"], r["relevance_score"]) for r in results]


def same(http_results: list[tuple[int, float]], grpc_results: list[tuple[int, float]]) -> bool:
    return [i for i, _ in http_results] == [i for i, _ in grpc_results] and all(
        abs(a - b) <= TOLERANCE for (_, a), (_, b) in zip(http_results, grpc_results, strict=True)
    )


def error(response: httpx.Response, status: int) -> str:
    """The message of an error response, once it has the status and shape every error has."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["message"]
    return str(body["message"])


def test_v2_answers_what_grpc_answers(served: ServerProcess, pki: Pki) -> None:
    documents = corpus(12)
    with grpc_client(served, pki) as client, http(served, pki) as session:
        expected = [(r.index, r.score) for r in client.rerank(QUERY, documents, top_n=5).results]
        response = session.post(
            "/v2/rerank", json={"model": "tiny-bert", "query": QUERY, "documents": documents, "top_n": 5}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert same(scores(body["results"]), expected)
    assert body["id"] == response.headers["x-request-id"]
    assert body["meta"]["api_version"] == {"version": "2"}
    assert body["meta"]["billed_units"] == {"search_units": 1}
    assert body["meta"]["tokens"]["input_tokens"] > 0
    assert body["model"] == "tiny-bert"


def test_v1_takes_jina_objects_and_returns_them_whole(served: ServerProcess, pki: Pki) -> None:
    texts = corpus(6)
    sent = [{"text": text, "id": f"doc-{i}"} if i % 2 else text for i, text in enumerate(texts)]
    with grpc_client(served, pki) as client, http(served, pki) as session:
        expected = client.rerank(QUERY, texts, top_n=4, return_documents=True).results
        response = session.post(
            "/v1/rerank", json={"query": QUERY, "documents": sent, "top_n": 4, "return_documents": True}
        )
        bare = session.post("/v1/rerank", json={"query": QUERY, "documents": texts}).json()
    assert response.status_code == 200, response.text
    body = response.json()
    assert same(scores(body["results"]), [(r.index, r.score) for r in expected])
    for result in body["results"]:
        index = result["index"]
        assert result["document"] == (sent[index] if index % 2 else {"text": texts[index]})
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert body["meta"]["api_version"] == {"version": "1"}
    assert len(bare["results"]) == len(texts)
    assert all("document" not in result for result in bare["results"])  # Cohere v1's default


def test_the_servers_own_options_as_extra_fields(served: ServerProcess, pki: Pki) -> None:
    long_documents = [" ".join(corpus(30)[i : i + 12]) for i in range(3)]  # longer than 48 tokens
    with grpc_client(served, pki) as client, http(served, pki) as session:
        chunked = client.rerank(QUERY, long_documents, max_length=48, truncation="chunk")
        response = session.post(
            "/v2/rerank",
            json={
                "query": QUERY,
                "documents": long_documents,
                "max_tokens_per_doc": 48,
                "truncation": "chunk",
            },
        )
        assert response.status_code == 200, response.text
        assert same(scores(response.json()["results"]), [(r.index, r.score) for r in chunked.results])
        assert chunked.usage.chunked == 3  # the windows were really used
        # Cohere v1's max_chunks_per_doc: long documents scored by their best window too.
        v1 = session.post(
            "/v1/rerank",
            json={
                "query": QUERY,
                "documents": long_documents,
                "max_chunks_per_doc": 10,
                "max_tokens_per_doc": 48,
            },
        )
        assert same(scores(v1.json()["results"]), [(r.index, r.score) for r in chunked.results])

        raw = client.rerank(QUERY, corpus(5), raw_scores=True)
        response = session.post(
            "/v2/rerank", json={"query": QUERY, "documents": corpus(5), "raw_scores": True}
        )
        assert same(scores(response.json()["results"]), [(r.index, r.score) for r in raw.results])
        assert any(not 0 <= r.score <= 1 for r in raw.results)  # raw logits, not normalized

        instructed = client.rerank(QUERY, corpus(4), model="qwen", instruction=INSTRUCTION)
        default = client.rerank(QUERY, corpus(4), model="qwen")
        response = session.post(
            "/v2/rerank",
            json={"model": "qwen", "query": QUERY, "documents": corpus(4), "instruction": INSTRUCTION},
        )
        assert same(scores(response.json()["results"]), [(r.index, r.score) for r in instructed.results])
        assert [r.score for r in instructed.results] != [r.score for r in default.results]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"query": "q", "documents": ["a"', 400, "the body is not JSON"),
        (json.dumps({"documents": ["a"]}).encode(), 400, "query is required"),
        (json.dumps({"query": "q", "documents": []}).encode(), 400, "documents is empty"),
        (
            json.dumps({"query": "q", "documents": ["a"], "top_n": 0}).encode(),
            400,
            "top_n must be an integer",
        ),
        (json.dumps({"query": " ", "documents": ["a"]}).encode(), 400, "query is empty"),
        (
            json.dumps({"query": "q", "documents": ["a"] * (MAX_DOCUMENTS + 1)}).encode(),
            400,
            f"{MAX_DOCUMENTS + 1} documents exceed the limit of {MAX_DOCUMENTS}",
        ),
        (
            json.dumps({"query": "q", "documents": ["a", "b" * (MAX_DOCUMENT_CHARS + 1)]}).encode(),
            400,
            "document 1 has 2001 characters; the limit is 2000 (max_document_chars)",
        ),
        (
            json.dumps({"query": "q", "documents": ["a"], "instruction": "x"}).encode(),
            400,
            "takes no instruction",
        ),
        (
            json.dumps({"model": "nope", "query": "q", "documents": ["a"]}).encode(),
            404,
            "'nope' is not served",
        ),
    ],
    ids=[
        "bad-json",
        "no-query",
        "no-documents",
        "bad-top-n",
        "empty-query",
        "too-many-documents",
        "long-document",
        "instruction",
        "unknown-model",
    ],
)
def test_invalid_requests_get_their_status_and_message(
    served: ServerProcess, pki: Pki, body: bytes, status: int, message: str
) -> None:
    with http(served, pki) as session:
        response = session.post("/v2/rerank", content=body, headers={"x-request-id": "bad-1"})
    assert message in error(response, status)
    assert response.headers["x-request-id"] == "bad-1"


def test_unknown_routes_and_methods_are_404_and_405(served: ServerProcess, pki: Pki) -> None:
    with http(served, pki) as session:
        assert "the routes are POST /v1/rerank" in error(session.post("/v3/rerank", json={}), 404)
        assert "GET /v2/rerank" in error(session.get("/v2/rerank"), 405)


def test_a_body_over_the_message_limit_is_413_before_parsing(served: ServerProcess, pki: Pki) -> None:
    big = json.dumps({"query": "q", "documents": ["panda " * 300] * 700}).encode()  # about 1.2 MiB
    assert len(big) > 1024 * 1024
    before = served.metric(
        "rerank_requests_total", {"method": "POST /v2/rerank", "code": "RESOURCE_EXHAUSTED"}
    )
    with http(served, pki) as session:
        declared = session.post("/v2/rerank", content=big)
        assert "over the limit of 1 MiB (max_message_mb)" in error(declared, 413)
        # Without a Content-Length (chunked): counted as it arrives.
        streamed = session.post(
            "/v2/rerank", content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)])
        )
        assert "over the limit of 1 MiB" in error(streamed, 413)
        assert session.post("/v2/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200
    after = served.metric(
        "rerank_requests_total", {"method": "POST /v2/rerank", "code": "RESOURCE_EXHAUSTED"}
    )
    assert after - before == 2


def test_without_an_accepted_token_calls_are_401_and_health_stays_open(
    served: ServerProcess, pki: Pki
) -> None:
    body = {"query": "q", "documents": ["a"]}
    for token in (None, "tok-wrong"):
        with http(served, pki, token=token) as session:
            for response in (
                session.post("/v2/rerank", json=body),
                session.post("/v1/rerank", json=body),
                session.get("/v1/models"),
            ):
                assert error(response, 401) == "missing or invalid bearer token"
                assert response.headers["www-authenticate"] == "Bearer"
            assert session.get("/health").status_code == 200
    with http(served, pki) as session:
        assert session.post("/v2/rerank", json=body).status_code == 200


def test_plaintext_on_a_tls_port_gets_no_answer(served: ServerProcess) -> None:
    assert served.http_url is not None and served.http_url.startswith("https://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(served.http_url.replace("https://", "http://") + "/health", timeout=10)


def test_models_and_health(served: ServerProcess, pki: Pki) -> None:
    with http(served, pki) as session:
        models = session.get("/v1/models")
        health = session.get("/health")
    assert models.status_code == 200
    assert [(m["name"], m["family"], m["endpoints"]) for m in models.json()["models"]] == [
        ("tiny-bert", "cross-encoder", ["rerank"]),
        ("qwen", "qwen3-reranker", ["rerank"]),
    ]
    assert (health.status_code, health.json()) == (200, {"status": "SERVING"})


def test_a_small_answer_is_not_held_back(served: ServerProcess, pki: Pki) -> None:
    """With Nagle's algorithm on, a response's body would wait behind its headers for the client's
    delayed ACK: 40 ms a call."""
    with http(served, pki) as session:
        session.get("/health")
        took = []
        for _ in range(21):
            started = time.perf_counter()
            session.get("/health")
            took.append(time.perf_counter() - started)
    assert sorted(took)[10] < 0.02


def call_line(server: ServerProcess, request_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if request_id in line and line.endswith("}"):
                record = json.loads(line)
                if record.get("logger") == "rerank_server.calls" and record["request_id"] == request_id:
                    return dict(record)
        time.sleep(0.05)
    raise TimeoutError(f"no log line for {request_id}:\n{server.log()[-3000:]}")


def test_an_http_call_is_counted_timed_and_logged_like_a_grpc_one(served: ServerProcess, pki: Pki) -> None:
    calls = {"method": "POST /v2/rerank", "model": "tiny-bert"}

    def counts() -> tuple[float, float]:
        return (
            served.metric("rerank_requests_total", {**calls, "code": "OK"}),
            served.metric("rerank_request_duration_seconds_count", calls),
        )

    before = counts()
    sent_id = f"http-{uuid.uuid4().hex}"
    with http(served, pki) as session:
        response = session.post(
            "/v2/rerank", json={"query": QUERY, "documents": corpus(3)}, headers={"x-request-id": sent_id}
        )
        generated = session.post(
            "/v1/rerank", json={"query": QUERY, "documents": ["a"]}, headers={"x-request-id": "has space"}
        )
        failed = session.post("/v1/rerank", json={"query": QUERY, "documents": []})
    assert response.headers["x-request-id"] == response.json()["id"] == sent_id
    fresh = generated.headers["x-request-id"]
    assert len(fresh) == 32 and fresh == generated.json()["id"]
    line = call_line(served, sent_id)
    assert line["method"] == "POST /v2/rerank" and line["code"] == "OK" and line["model"] == "tiny-bert"
    assert line["documents"] == 3 and line["tokens"] > 0 and line["peer"].startswith("ipv4:127.0.0.1:")
    assert call_line(served, failed.headers["x-request-id"])["code"] == "INVALID_ARGUMENT"
    assert counts() == (before[0] + 1, before[1] + 1)
    assert (
        served.metric("rerank_requests_total", {"method": "POST /v1/rerank", "code": "INVALID_ARGUMENT"}) >= 1
    )
    assert served.metric("rerank_calls_in_flight", {"method": "POST /v2/rerank"}) == 0


def post_busy(server: ServerProcess, pki: Pki, documents: list[str]) -> httpx.Response:
    with http(server, pki, token=None, cert=True) as session:
        return session.post("/v2/rerank", json={"query": QUERY, "documents": documents})


def test_mutual_tls_needs_a_client_certificate(busy: ServerProcess, pki: Pki) -> None:
    with http(busy, pki, token=None) as session, pytest.raises(httpx.HTTPError):
        session.get("/health")
    assert post_busy(busy, pki, ["a"]).status_code == 200


def test_a_full_queue_is_429_and_a_call_past_max_call_s_is_504(busy: ServerProcess, pki: Pki) -> None:
    long_documents = corpus(55, words=40)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post_busy, busy, pki, long_documents)
        # The replica takes a batch or two at once; the rest waits, a batch a second.
        wait_until(lambda: busy.metric("rerank_queued_pairs") >= 35, 30, "the big call to queue")
        full = post_busy(busy, pki, corpus(30))
        assert "(max_queued_pairs); retry later" in error(full, 429)
        assert "max_call_s" in error(slow.result(timeout=60), 504)
    assert (
        busy.metric("rerank_requests_total", {"method": "POST /v2/rerank", "code": "DEADLINE_EXCEEDED"}) == 1
    )
    assert (
        busy.metric("rerank_requests_total", {"method": "POST /v2/rerank", "code": "RESOURCE_EXHAUSTED"}) == 1
    )
    wait_until(lambda: busy.metric("rerank_queued_pairs") == 0, 30, "the queue to empty")


def test_a_client_that_goes_away_has_its_call_cancelled_and_its_pairs_dropped(
    busy: ServerProcess, pki: Pki
) -> None:
    dropped = busy.metric("rerank_pairs_dropped_total", {"reason": "cancelled"})
    with http(busy, pki, token=None, cert=True) as session, pytest.raises(httpx.ReadTimeout):
        session.post("/v2/rerank", json={"query": QUERY, "documents": corpus(30, words=40)}, timeout=1.5)
    cancelled = {"method": "POST /v2/rerank", "code": "CANCELLED"}
    wait_until(lambda: busy.metric("rerank_requests_total", cancelled) == 1, 10, "the call to end")
    assert busy.metric("rerank_pairs_dropped_total", {"reason": "cancelled"}) - dropped >= 8
    wait_until(lambda: busy.metric("rerank_queued_pairs") == 0, 10, "the queue to empty")


def test_with_no_live_replica_calls_and_health_are_503(busy: ServerProcess, pki: Pki) -> None:
    for pid in busy.worker_pids():
        os.kill(pid, signal.SIGKILL)
    with http(busy, pki, token=None, cert=True) as session:
        wait_until(lambda: session.get("/health").status_code == 503, 30, "health 503")
        assert session.get("/health").json() == {"status": "NOT_SERVING"}
        assert "no model replica" in error(
            session.post("/v2/rerank", json={"query": QUERY, "documents": ["a"]}), 503
        )
        wait_until(lambda: session.get("/health").status_code == 200, 120, "a replica back")


def test_a_drain_answers_503_to_new_calls_and_finishes_those_in_flight(busy: ServerProcess, pki: Pki) -> None:
    with ThreadPoolExecutor(1) as pool, http(busy, pki, token=None, cert=True) as session:
        in_flight = pool.submit(post_busy, busy, pki, corpus(8, words=40))
        wait_until(
            lambda: busy.metric("rerank_calls_in_flight", {"method": "POST /v2/rerank"}) == 1, 30, "the call"
        )
        busy.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining" in busy.log(), 10, "draining")
        assert session.get("/health").status_code == 503
        assert "draining" in error(session.post("/v2/rerank", json={"query": QUERY, "documents": ["a"]}), 503)
        answer = in_flight.result(timeout=60)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["results"]) == 8
    assert busy.process.wait(60) == 0
