"""The HTTP/JSON API through the clients people already use: the official Cohere SDK (v1 and v2),
LangChain's and LlamaIndex's Cohere rerankers, and a Jina-shaped request, each pointed at a real
server by its base URL, each ranking and scoring as the gRPC client does on the same request; and
a server with TLS and bearer tokens refusing the SDK without its token and serving it with it."""

from __future__ import annotations

import signal
import socket
import ssl
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cohere
import grpc
import httpx
import pytest
from cohere.core.request_options import RequestOptions
from cohere.errors import UnauthorizedError
from langchain_cohere import CohereRerank as LangChainCohereRerank
from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from llama_index.postprocessor.cohere_rerank import CohereRerank as LlamaIndexCohereRerank
from rerank_client import RerankerClient, RerankResult, tls_credentials
from throwaway_pki import Pki

from integration.conftest import StartServer
from integration.server_process import ServerProcess

pytestmark = pytest.mark.integration

MODEL = "rerank-v3.5"  # a Cohere model name: the SDKs' callers keep theirs, the server serves it
QUERY = "what do giant pandas eat?"
DOCUMENTS = [
    "Paris is the capital of France.",
    "Pandas eat bamboo almost all day.",
    "Bamboo grows fast in the mountains.",
    "The giant panda is a bear native to China.",
    "Stock markets fell sharply on Monday.",
    "Red pandas also eat bamboo, fruit and eggs.",
]
TOP_N = 3
TOKEN = "tok-http-9c1e44b7"
SCORE_TOLERANCE = 1e-6  # float32 on both sides: the same scores, not merely the same order
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
NAGLE_MARGIN_MS = 20  # half of Linux's 40 ms minimum delayed ACK


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDKs may reach only the server: a library fetching data (tiktoken encodings, nltk
    corpora, a hub) fails the test at once, where offline it would hang or fail obscurely."""
    resolve, connect = socket.getaddrinfo, socket.socket.connect

    def guarded_resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in LOOPBACK:
            raise AssertionError(f"a library tried to reach {host}")
        return resolve(host, *args, **kwargs)

    def guarded_connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            raise AssertionError(f"a library tried to connect to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_resolve)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


@pytest.fixture(scope="module")
def server(start_module_server: StartServer, bert_cross_encoder_dir: Path) -> ServerProcess:
    return start_module_server("--model", f"{MODEL}={bert_cross_encoder_dir}", "--dtype", "float32")


def grpc_answer(
    server: ServerProcess,
    top_n: int,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    raw_scores: bool = False,
) -> RerankResult:
    """What the gRPC client gets for the same call: the reference every HTTP answer must equal."""
    with RerankerClient(server.target, credentials=credentials, token=token, timeout=60) as client:
        return client.rerank(QUERY, DOCUMENTS, model=MODEL, top_n=top_n, raw_scores=raw_scores)


def ranking(result: RerankResult) -> tuple[list[int], list[float]]:
    return [r.index for r in result.results], [r.score for r in result.results]


def assert_same_ranking(indices: list[int], scores: list[float], expected: RerankResult) -> None:
    expected_indices, expected_scores = ranking(expected)
    assert indices == expected_indices
    assert scores == pytest.approx(expected_scores, abs=SCORE_TOLERANCE)


def test_cohere_v2_client_ranks_as_the_grpc_client(server: ServerProcess) -> None:
    expected = grpc_answer(server, top_n=0)
    with cohere.ClientV2(api_key="unused", base_url=server.http_url, timeout=60) as client:
        every = client.rerank(model=MODEL, query=QUERY, documents=DOCUMENTS)
        top = client.rerank(model=MODEL, query=QUERY, documents=DOCUMENTS, top_n=TOP_N)
    assert_same_ranking(
        [r.index for r in every.results], [r.relevance_score for r in every.results], expected
    )
    assert [r.index for r in top.results] == [r.index for r in every.results][:TOP_N]
    assert every.meta is not None and every.meta.tokens is not None
    assert every.meta.tokens.input_tokens == expected.usage.tokens  # the same rows were scored


def test_the_servers_own_options_go_as_extra_body_fields(server: ServerProcess) -> None:
    expected = grpc_answer(server, top_n=0, raw_scores=True)  # logits, not the sigmoids
    extra: RequestOptions = {"additional_body_parameters": {"raw_scores": True}}
    with cohere.ClientV2(api_key="unused", base_url=server.http_url, timeout=60) as client:
        reply = client.rerank(model=MODEL, query=QUERY, documents=DOCUMENTS, request_options=extra)
    assert_same_ranking(
        [r.index for r in reply.results], [r.relevance_score for r in reply.results], expected
    )


def test_cohere_v1_client_ranks_as_the_grpc_client_and_returns_the_documents(server: ServerProcess) -> None:
    expected = grpc_answer(server, top_n=TOP_N)
    with cohere.Client(api_key="unused", base_url=server.http_url, timeout=60) as client:
        reply = client.rerank(
            model=MODEL, query=QUERY, documents=DOCUMENTS, top_n=TOP_N, return_documents=True
        )
    assert_same_ranking(
        [r.index for r in reply.results], [r.relevance_score for r in reply.results], expected
    )
    assert [r.document.text if r.document else None for r in reply.results] == [
        DOCUMENTS[r.index] for r in expected.results
    ]


def test_langchain_cohere_rerank_keeps_the_top_documents(server: ServerProcess) -> None:
    expected = grpc_answer(server, top_n=TOP_N)
    reranker = LangChainCohereRerank(
        model=MODEL, top_n=TOP_N, base_url=server.http_url, cohere_api_key="unused"
    )
    documents = [Document(page_content=text, metadata={"source": i}) for i, text in enumerate(DOCUMENTS)]
    kept = reranker.compress_documents(documents, QUERY)
    assert_same_ranking(
        [d.metadata["source"] for d in kept], [d.metadata["relevance_score"] for d in kept], expected
    )
    assert [d.page_content for d in kept] == [DOCUMENTS[r.index] for r in expected.results]


def test_llamaindex_cohere_rerank_keeps_the_top_nodes(server: ServerProcess) -> None:
    expected = grpc_answer(server, top_n=TOP_N)
    reranker = LlamaIndexCohereRerank(model=MODEL, top_n=TOP_N, api_key="unused", base_url=server.http_url)
    nodes = [
        NodeWithScore(node=TextNode(text=text, id_=f"node-{i}"), score=0.0)
        for i, text in enumerate(DOCUMENTS)
    ]
    kept = reranker.postprocess_nodes(nodes, QueryBundle(QUERY))
    assert_same_ranking(
        [int(n.node.node_id.removeprefix("node-")) for n in kept], [n.score or 0.0 for n in kept], expected
    )
    assert [n.node.get_content() for n in kept] == [DOCUMENTS[r.index] for r in expected.results]


def test_a_jina_shaped_request_gets_its_documents_back(server: ServerProcess) -> None:
    expected = grpc_answer(server, top_n=2)
    body = {
        "model": MODEL,
        "query": QUERY,
        "documents": [{"text": text} for text in DOCUMENTS],
        "top_n": 2,
        "return_documents": True,
    }
    response = httpx.post(f"{server.http_url}/v1/rerank", json=body, timeout=60)
    assert response.status_code == 200, response.text
    reply = response.json()
    results = reply["results"]
    assert_same_ranking([r["index"] for r in results], [r["relevance_score"] for r in results], expected)
    assert [r["document"]["text"] for r in results] == [DOCUMENTS[r.index] for r in expected.results]
    assert reply["usage"]["total_tokens"] == expected.usage.tokens


def median_ms(call: Callable[[], object], times: int = 15) -> float:
    call()  # the connection made, the route warm
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        spent.append(1000 * (time.perf_counter() - started))
    return statistics.median(spent)


def test_http_calls_are_not_held_back_by_nagle(server: ServerProcess) -> None:
    """A small call over a kept-alive connection costs about what the same gRPC call does: no short
    write waits for the peer's delayed ACK (Nagle's algorithm on a socket: some 40 ms a call)."""
    documents = DOCUMENTS[:2]
    body = {"model": MODEL, "query": QUERY, "documents": documents}
    with (
        RerankerClient(server.target, timeout=60) as grpc_client,
        httpx.Client(base_url=server.http_url, timeout=60) as http_client,
    ):
        grpc_ms = median_ms(lambda: grpc_client.rerank(QUERY, documents, model=MODEL))
        http_ms = median_ms(lambda: http_client.post("/v2/rerank", json=body).raise_for_status())
    assert http_ms < grpc_ms + NAGLE_MARGIN_MS, (grpc_ms, http_ms)


# --- TLS and bearer tokens -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured_server(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, bert_cross_encoder_dir: Path
) -> Iterator[ServerProcess]:
    """TLS on both ports (the one certificate) and bearer tokens; health checked over TLS."""
    folder = tmp_path_factory.mktemp("secured")
    (folder / "tokens").write_text(f"{TOKEN}\n")
    args = [
        "--model", f"{MODEL}={bert_cross_encoder_dir}", "--dtype", "float32",
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--auth-tokens-file", str(folder / "tokens"),
    ]  # fmt: skip
    with ServerProcess(args, folder / "server.log") as server:
        server.wait_serving(credentials=tls_credentials(pki.ca))
        yield server
        assert server.stop(signal.SIGTERM) == 0, server.log()
        assert server.orphans == [], f"workers outlived the server:\n{server.log()}"
        assert server.leftover_shared_memory() == [], "shared memory left in /dev/shm"


def trusting(pki: Pki) -> httpx.Client:
    """An httpx client that trusts the throwaway CA, as the SDKs take one (`httpx_client=`)."""
    return httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=60)


@pytest.mark.parametrize("api_key", ["tok-wrong-5d20aa13", TOKEN[:-1]], ids=["wrong token", "a prefix"])
def test_the_sdk_without_an_accepted_token_gets_unauthorized(
    secured_server: ServerProcess, pki: Pki, api_key: str
) -> None:
    for sdk in (cohere.ClientV2, cohere.Client):
        with (
            sdk(api_key=api_key, base_url=secured_server.http_url, httpx_client=trusting(pki)) as client,
            pytest.raises(UnauthorizedError) as refused,
        ):
            client.rerank(model=MODEL, query=QUERY, documents=DOCUMENTS)
        assert refused.value.status_code == 401 and refused.value.body["message"], sdk


def test_a_call_without_a_token_gets_unauthorized(secured_server: ServerProcess, pki: Pki) -> None:
    """The SDKs always send their api_key (an empty one is not a valid header); plain HTTP may not."""
    body = {"model": MODEL, "query": QUERY, "documents": DOCUMENTS}
    with trusting(pki) as client:
        response = client.post(f"{secured_server.http_url}/v2/rerank", json=body)
    assert response.status_code == 401 and response.json()["message"]


def test_the_sdk_with_the_token_as_its_api_key_is_served(secured_server: ServerProcess, pki: Pki) -> None:
    expected = grpc_answer(secured_server, TOP_N, credentials=tls_credentials(pki.ca), token=TOKEN)
    with cohere.ClientV2(
        api_key=TOKEN, base_url=secured_server.http_url, httpx_client=trusting(pki)
    ) as client:
        reply = client.rerank(model=MODEL, query=QUERY, documents=DOCUMENTS, top_n=TOP_N)
    assert_same_ranking(
        [r.index for r in reply.results], [r.relevance_score for r in reply.results], expected
    )
