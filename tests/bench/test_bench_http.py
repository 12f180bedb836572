"""The benchmark's HTTP driver: the request the Cohere SDK sends, the reply it checks, and the report
that sets HTTP beside gRPC."""

from __future__ import annotations

import dataclasses
import json

import cohere
import httpx
import pytest
from rerank_bench.figures import Outcome, Phase
from rerank_bench.http_load import RERANK_PATH, HttpSender, reply_tokens, rerank_body
from rerank_bench.report import merge, render
from rerank_bench.scenarios import compare_protocols

QUERY = "what do giant pandas eat?"
DOCUMENTS = ["Pandas eat bamboo.", "Paris is in France.", "Bamboo grows fast."]


def reply(indices: list[int], tokens: int = 42) -> dict[str, object]:
    results = [{"index": i, "relevance_score": 0.5 - 0.1 * rank} for rank, i in enumerate(indices)]
    return {"id": "x", "results": results, "meta": {"tokens": {"input_tokens": tokens}}}


def test_the_body_is_what_the_cohere_sdk_sends() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json=reply([0, 2, 1]))

    client = cohere.ClientV2(
        api_key="unused",
        base_url="http://rerank.test",
        httpx_client=httpx.Client(transport=httpx.MockTransport(answer)),
    )
    client.rerank(model="m", query=QUERY, documents=DOCUMENTS)
    (request,) = sent
    assert request.method == "POST" and request.url.path == RERANK_PATH
    assert json.loads(request.content) == rerank_body(QUERY, DOCUMENTS, "m")


def test_a_reply_ranking_each_document_once_gives_its_tokens() -> None:
    assert reply_tokens(reply([2, 0, 1], tokens=57), 3) == 57
    assert reply_tokens({"results": reply([1, 0])["results"]}, 2) == 0  # no meta: no token count


@pytest.mark.parametrize(
    "bad",
    [
        {},
        reply([0, 1]),  # a document missing
        reply([0, 1, 1]),  # one twice
        {"results": [{"index": 0}, {"index": 1}, {"index": 2}]},  # no scores
    ],
    ids=["no results", "missing", "twice", "no scores"],
)
def test_any_other_reply_is_an_error(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        reply_tokens(bad, 3)


def test_the_sender_posts_over_one_connection_and_raises_on_an_error_status() -> None:
    statuses = iter([200, 429])
    seen: list[dict[str, object]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(next(statuses), json=reply([1, 0, 2], tokens=31))

    sender = HttpSender("http://rerank.test", "m", 5.0, transport=httpx.MockTransport(answer))
    assert sender.send(QUERY, DOCUMENTS) == (31, None)
    with pytest.raises(httpx.HTTPStatusError):
        sender.send(QUERY, DOCUMENTS)
    sender.close()
    assert seen == [rerank_body(QUERY, DOCUMENTS, "m")] * 2


def phase(setup: str, load: str, pairs_per_s: float, p50: float, front_end_cpu: float) -> Phase:
    return Phase(
        setup=setup,
        workload="tiny",
        load=load,
        clients=1,
        seconds=10.0,
        requests=100,
        pairs=300,
        pairs_per_s=pairs_per_s,
        latency_ms={"p50": p50, "p95": p50 * 2, "p99": p50 * 3},
        errors={},
        cpu_seconds={"front-end": front_end_cpu, "workers": 5.0, "benchmark": 1.0, "other": 0.0},
    )


def test_the_report_sets_each_http_phase_beside_its_grpc_phase() -> None:
    phases = [
        phase("server, gRPC", "1 client", 300.0, 10.0, 0.6),
        phase("server, HTTP", "1 client", 240.0, 12.5, 0.9),
        phase("server, gRPC", "8 clients", 500.0, 40.0, 1.0),  # no HTTP phase: no row
    ]
    rows = compare_protocols(phases)
    assert len(rows) == 1
    row = rows[0]
    assert (row["setup"], row["workload"], row["load"]) == ("server", "tiny", "1 client")
    assert (row["pairs/s gRPC"], row["pairs/s HTTP"], row["HTTP / gRPC pairs/s"]) == (300.0, 240.0, 0.8)
    assert (row["p50 ms gRPC"], row["p50 ms HTTP"], row["p99 ms HTTP"]) == (10.0, 12.5, 37.5)
    # 0.6 CPU s over 300 pairs/s x 10 s = 3000 pairs; 0.9 over 2400
    assert (row["front-end CPU s/1000 pairs gRPC"], row["front-end CPU s/1000 pairs HTTP"]) == (0.2, 0.375)

    outcome = Outcome("http", "2026-11-28T00:00:00+00:00", {"duration": 10.0})
    outcome.phases = phases
    outcome.notes = {"http_against_grpc": rows, "workload_tiny": {"documents_per_request": 3}}
    text = render(merge(None, {"date": "2026-11-28"}, [dataclasses.asdict(outcome)]))
    assert "| setup | workload | load | pairs/s gRPC | pairs/s HTTP |" in text
    assert "| server | tiny | 1 client | 300 | 240 | 10 | 12.5 |" in text
    assert "| workload_tiny: documents_per_request | 3 |" in text  # the other notes stay figures
