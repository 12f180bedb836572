"""Every family behind one API, through the real server, its worker processes and the real client.

One server serves six tiny checkpoints built by the tests (a BERT cross-encoder, bge-reranker-gemma,
Qwen3-Reranker, mxbai-rerank-v2, minicpm-layerwise, a sentence-transformers cross-encoder) under
names of their own; each family's scores
must equal its independent reference within 1e-5, in Rerank and StreamRerank alike.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from layerwise_reference import LayerwiseReference
from llm_reference import GemmaReference, MxbaiReference, Qwen3Reference
from reference import FlagReference
from rerank_client import (
    InvalidArgumentError,
    NotFoundError,
    RerankerClient,
    RerankError,
    ResourceExhaustedError,
)
from tiny_models import CORPUS

from integration.conftest import StartServer
from integration.server_process import ServerProcess

pytestmark = pytest.mark.integration

TOLERANCE = 1e-5
QUERY = "what do giant pandas eat?"
LONG_QUERY = " ".join(CORPUS[:10])
LONG_DOCUMENT = " ".join(CORPUS * 2)
DOCUMENTS = [
    "Pandas eat bamboo for most of the day and sleep in between meals.",
    "",
    "Le panda géant mange du bambou 🐼",
    "The train to London leaves from platform four every hour.",
    LONG_DOCUMENT,
]
LLMS = ("gemma", "qwen3", "mxbai")


@pytest.fixture(scope="module")
def server(
    start_module_server: StartServer,
    bert_cross_encoder_dir: Path,
    gemma_dir: Path,
    qwen3_dir: Path,
    mxbai_dir: Path,
    layerwise_dir: Path,
    st_cross_encoder_dir: Path,
) -> ServerProcess:
    return start_module_server(
        "--model", f"bert={bert_cross_encoder_dir}",
        "--model", f"gemma={gemma_dir}",
        "--model", f"qwen3={qwen3_dir}",
        "--model", f"mxbai={mxbai_dir}",
        "--model", f"layerwise={layerwise_dir}",
        "--model", f"st={st_cross_encoder_dir}",
        "--dtype", "float32",  # scores are compared with float32 references
        "--max-chunks", "4",
        "--chunk-overlap", "8",
        "--restart-backoff-s", "0.5",
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    with RerankerClient(server.target, retry=None, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def references(
    gemma_dir: Path, qwen3_dir: Path, mxbai_dir: Path, layerwise_dir: Path, bert_cross_encoder_dir: Path
) -> dict[str, Any]:
    return {
        "gemma": GemmaReference(gemma_dir),
        "qwen3": Qwen3Reference(qwen3_dir),
        "mxbai": MxbaiReference(mxbai_dir),
        "layerwise": LayerwiseReference(layerwise_dir),
        "bert": FlagReference(bert_cross_encoder_dir, "bert"),
    }


def scores_by_index(results: list) -> dict[int, float]:
    return {r.index: r.score for r in results}


@pytest.mark.parametrize("name", LLMS)
@pytest.mark.parametrize(("query", "max_length"), [(QUERY, 0), (QUERY, 64), (LONG_QUERY, 96)])
def test_llm_rerankers_score_as_their_references(
    client: RerankerClient, references: dict[str, Any], name: str, query: str, max_length: int
) -> None:
    reference = references[name]
    length = max_length or 512 if name == "gemma" else max_length or 1024
    if name == "mxbai":
        length = min(length, reference.max_positions - reference.predefined)
    result = client.rerank(query, DOCUMENTS, model=name, raw_scores=True, max_length=max_length)
    assert result.model == name
    expected = [reference.raw(query, document, length) for document in DOCUMENTS]
    got = scores_by_index(result.results)
    assert [got[i] for i in range(len(DOCUMENTS))] == pytest.approx(expected, abs=TOLERANCE)
    if min(abs(a - b) for i, a in enumerate(expected) for b in expected[i + 1 :]) > 1e-4:
        assert [r.index for r in result.results] == sorted(range(len(expected)), key=lambda i: -expected[i])
    normalized = client.rerank(query, DOCUMENTS, model=name, max_length=max_length).results
    want = [reference.normalized(query, document, length) for document in DOCUMENTS]
    assert [scores_by_index(normalized)[i] for i in range(len(DOCUMENTS))] == pytest.approx(
        want, abs=TOLERANCE
    )


@pytest.mark.parametrize(("query", "max_length"), [(QUERY, 0), (QUERY, 48), (LONG_QUERY, 64)])
def test_the_layerwise_model_scores_as_its_reference(
    client: RerankerClient, references: dict[str, Any], query: str, max_length: int
) -> None:
    result = client.rerank(query, DOCUMENTS, model="layerwise", raw_scores=True, max_length=max_length)
    expected = [references["layerwise"].layer_scores(query, d, max_length or 512)[6] for d in DOCUMENTS]
    got = scores_by_index(result.results)
    assert [got[i] for i in range(len(DOCUMENTS))] == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("query", [QUERY, LONG_QUERY])
def test_sentence_transformers_cross_encoders_score_as_crossencoder_predict(
    client: RerankerClient, st_cross_encoder_dir: Path, query: str
) -> None:
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(st_cross_encoder_dir), device="cpu")
    pairs = [(query, document) for document in DOCUMENTS]
    raw = model.predict(pairs, activation_fn=torch.nn.Identity()).tolist()
    result = client.rerank(query, DOCUMENTS, model="st", raw_scores=True)
    got = scores_by_index(result.results)
    assert [got[i] for i in range(len(DOCUMENTS))] == pytest.approx(raw, abs=TOLERANCE)
    assert result.usage.truncated >= 1  # the long document is cut at the checkpoint's max_length (64)
    normalized = scores_by_index(client.rerank(query, DOCUMENTS, model="st").results)
    want = model.predict(pairs).tolist()  # sigmoid, CrossEncoder's default for one logit
    assert [normalized[i] for i in range(len(DOCUMENTS))] == pytest.approx(want, abs=TOLERANCE)


@pytest.mark.parametrize("name", ["qwen3", "mxbai"])
def test_the_instruction_reaches_the_model(
    client: RerankerClient, references: dict[str, Any], name: str
) -> None:
    instruction = "Find the passage that says what the animal eats"
    result = client.rerank(QUERY, DOCUMENTS[:4], model=name, raw_scores=True, instruction=instruction)
    length = 1024 if name == "qwen3" else references[name].max_positions - references[name].predefined
    expected = [references[name].raw(QUERY, d, length, instruction=instruction) for d in DOCUMENTS[:4]]
    got = scores_by_index(result.results)
    assert [got[i] for i in range(4)] == pytest.approx(expected, abs=TOLERANCE)


def test_every_cutoff_layer_returns_that_layers_score(
    client: RerankerClient, references: dict[str, Any]
) -> None:
    (info,) = [m for m in client.list_models() if m.name == "layerwise"]
    assert (info.min_cutoff_layer, info.max_cutoff_layer) == (2, 6)
    expected = [references["layerwise"].layer_scores(QUERY, d, 512) for d in DOCUMENTS]
    for cutoff in (0, 2, 3, 4, 5, 6):
        result = client.rerank(QUERY, DOCUMENTS, model="layerwise", raw_scores=True, cutoff_layer=cutoff)
        layer = cutoff or 6
        got = scores_by_index(result.results)
        assert [got[i] for i in range(len(DOCUMENTS))] == pytest.approx(
            [scores[layer] for scores in expected], abs=TOLERANCE
        )
    streamed = client.stream_rerank(
        QUERY, iter(DOCUMENTS), model="layerwise", top_n=2, cutoff_layer=3, raw_scores=True
    )
    assert [r.score for r in streamed.results] == pytest.approx(
        sorted((s[3] for s in expected), reverse=True)[:2], abs=TOLERANCE
    )


@pytest.mark.parametrize("name", ["bert", "gemma"])
def test_chunking_scores_a_long_document_by_its_best_window(client: RerankerClient, name: str) -> None:
    documents = [DOCUMENTS[0], LONG_DOCUMENT, " ".join(reversed(CORPUS))]
    end = client.rerank(QUERY, documents, model=name, raw_scores=True, max_length=48)
    chunk = client.rerank(QUERY, documents, model=name, raw_scores=True, max_length=48, truncation="chunk")
    assert (chunk.usage.documents, chunk.usage.chunked) == (3, 2)
    assert chunk.usage.windows == 1 + 4 + 4  # --max-chunks 4 caps both long documents
    assert chunk.usage.truncated == 2  # what the cap leaves out is reported cut
    end_scores, chunk_scores = scores_by_index(end.results), scores_by_index(chunk.results)
    assert chunk_scores[0] == pytest.approx(end_scores[0], abs=TOLERANCE)  # fits: one window, as END
    for i in (1, 2):
        assert chunk_scores[i] >= end_scores[i] - TOLERANCE  # the first window is END's row
    streamed = client.stream_rerank(
        QUERY, iter(documents), model=name, raw_scores=True, max_length=48, truncation="chunk", top_n=3
    )
    assert scores_by_index(streamed.results) == pytest.approx(chunk_scores, abs=TOLERANCE)
    assert (streamed.usage.chunked, streamed.usage.windows) == (2, 9)


def test_models_are_listed_and_routed_by_name(server: ServerProcess, client: RerankerClient) -> None:
    models = {m.name: m for m in client.list_models()}
    assert list(models) == ["bert", "gemma", "qwen3", "mxbai", "layerwise", "st"]
    assert {name: m.family for name, m in models.items()} == {
        "bert": "cross-encoder",
        "gemma": "bge-reranker-gemma",
        "qwen3": "qwen3-reranker",
        "mxbai": "mxbai-rerank-v2",
        "layerwise": "minicpm-layerwise",
        "st": "sentence-transformers-cross-encoder",
    }
    assert all(m.ready and m.replicas == 1 for m in models.values())
    assert [name for name, m in models.items() if m.takes_instruction] == ["qwen3", "mxbai"]
    assert models["qwen3"].default_instruction.startswith("Given a web search query")
    assert client.rerank(QUERY, ["a"]).model == "bert"  # the first model is the default
    assert client.health() == "SERVING"
    with pytest.raises(NotFoundError, match=r"'nope' is not served here; served: 'bert', 'gemma'"):
        client.rerank(QUERY, ["a"], model="nope")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"model": "gemma", "instruction": "x"}, InvalidArgumentError, "takes no instruction"),
        ({"model": "qwen3", "cutoff_layer": 3}, InvalidArgumentError, "cutoff_layer is for layerwise"),
        ({"model": "layerwise", "cutoff_layer": 7}, InvalidArgumentError, r"outside \[2, 6\]"),
        ({"model": "layerwise", "cutoff_layer": 1}, InvalidArgumentError, r"outside \[2, 6\]"),
        ({"model": "qwen3", "max_length": 10}, InvalidArgumentError, "too short"),
        (
            {"model": "qwen3", "max_length": 49, "truncation": "chunk"},
            InvalidArgumentError,
            "no room for document windows",
        ),
        ({"model": "mxbai", "max_length": 4096}, InvalidArgumentError, "exceeds the limit"),
    ],
)
def test_bad_options_get_a_clear_status_and_the_server_keeps_serving(
    client: RerankerClient, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        client.rerank(LONG_QUERY, ["a"], **kwargs)
    assert len(client.rerank(QUERY, ["still serving"], model=kwargs["model"]).results) == 1


def replica_pid(server: ServerProcess, label: str) -> int:
    found = re.findall(rf"replica {re.escape(label)} ready \(pid (\d+)\)", server.log())
    assert found, server.log()
    return int(found[-1])


def test_one_models_crash_leaves_the_others_serving(server: ServerProcess, client: RerankerClient) -> None:
    pid = replica_pid(server, "m1/0")  # gemma, the second model
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    health: set[tuple[str, str]] = set()  # (the whole server, the Reranker service) as seen meanwhile
    while replica_pid(server, "m1/0") == pid and time.monotonic() < deadline:
        # Every other model answers while gemma's only replica is down and restarting.
        for name in ("bert", "qwen3", "layerwise"):
            assert len(client.rerank(QUERY, DOCUMENTS[:2], model=name).results) == 2
        health.add((client.health(), client.health("rerank.v1.Reranker")))
        time.sleep(0.05)
    assert replica_pid(server, "m1/0") != pid, "gemma's replica was not replaced"
    # The server is not whole, yet takes calls: balancing clients and readiness probes keep it.
    assert ("NOT_SERVING", "SERVING") in health
    assert {reranker for _, reranker in health} == {"SERVING"}
    deadline = time.monotonic() + 30
    while client.health() != "SERVING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(client.rerank(QUERY, DOCUMENTS, model="gemma").results) == len(DOCUMENTS)


def test_one_models_overload_leaves_the_others_serving(
    start_server: StartServer, bert_cross_encoder_dir: Path, gemma_dir: Path
) -> None:
    server = start_server(
        "--model", f"bert={bert_cross_encoder_dir}",
        "--model", f"gemma={gemma_dir}",
        "--max-queued-pairs", "4000",
    )  # fmt: skip
    big = [f"{i} " + " ".join(CORPUS) for i in range(4000)]  # seconds of work for the tiny model
    errors: list[BaseException] = []

    def fill() -> None:
        with RerankerClient(server.target, retry=None, timeout=120) as own:
            try:
                own.rerank(QUERY, big, model="bert")
            except RerankError as exc:  # pragma: no cover - reported below
                errors.append(exc)

    filler = threading.Thread(target=fill)
    filler.start()
    try:
        deadline = time.monotonic() + 30
        while server.metric("rerank_queued_pairs", {"model": "bert"}) < 2000 and time.monotonic() < deadline:
            time.sleep(0.01)
        with RerankerClient(server.target, retry=None, timeout=60) as client:
            with pytest.raises(ResourceExhaustedError, match="queue full"):
                client.rerank(QUERY, big[:100], model="bert")
            assert len(client.rerank(QUERY, big[:100], model="gemma").results) == 100
    finally:
        filler.join(120)
    assert errors == []
