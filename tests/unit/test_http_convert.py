"""The HTTP edge's JSON <-> the server's types: Cohere v2, Cohere v1 and Jina bodies become the same
RerankQuery the gRPC edge builds, replies take the shapes those SDKs parse, and each error maps to
its HTTP status beside its gRPC code."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from rerank_server.edge.http.convert import (
    Api,
    encode,
    models_response,
    rerank_request,
    rerank_response,
)
from rerank_server.edge.status import error_status
from rerank_server.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    MessageTooLargeError,
    ModelError,
    ModelNotFoundError,
    NoReplicaError,
    OverloadedError,
    ReplicaLostError,
    UnauthenticatedError,
)
from rerank_server.types import ModelInfo, RankedDocument, RerankQuery, RerankResult, Truncation, Usage

LIMIT = 512


def limit_of(model: str) -> int:
    if model not in ("", "m"):
        raise ModelNotFoundError(f"model {model!r} is not served here; served: 'm'")
    return LIMIT


def parse(body: dict[str, Any], api: Api = Api.V2) -> RerankQuery:
    return rerank_request(json.dumps(body).encode(), api, limit_of).query


def test_a_cohere_v2_body_becomes_the_query_grpc_would_build() -> None:
    query = parse(
        {
            "model": "m",
            "query": "q",
            "documents": ["a", "b"],
            "top_n": 1,
            "max_tokens_per_doc": 100,
            "priority": 0,
        }
    )
    assert query == RerankQuery(query="q", documents=["a", "b"], model="m", top_n=1, max_length=100)


def test_fields_an_sdk_sends_that_a_route_does_not_know_are_ignored() -> None:
    # return_documents is v1's: v2 answers no documents, whatever the SDK sends.
    body = {"query": "q", "documents": ["a"], "rank_fields": ["text"], "return_documents": True, "x": {}}
    assert parse(body) == RerankQuery(query="q", documents=["a"])


def test_absent_and_null_fields_take_the_defaults() -> None:
    body = {"query": "q", "documents": ["a"], "model": None, "top_n": None, "max_tokens_per_doc": None}
    assert parse(body) == RerankQuery(query="q", documents=["a"])
    assert parse({"query": "q", "documents": ["a"], "return_documents": None}, Api.V1) == RerankQuery(
        query="q", documents=["a"]
    )


def test_max_tokens_per_doc_is_the_pair_budget_capped_at_the_models_limit() -> None:
    assert parse({"query": "q", "documents": ["a"], "max_tokens_per_doc": 4096}).max_length == LIMIT
    assert parse({"query": "q", "documents": ["a"], "max_tokens_per_doc": 64}).max_length == 64
    with pytest.raises(ModelNotFoundError):
        parse({"model": "other", "query": "q", "documents": ["a"], "max_tokens_per_doc": 64})


def test_v1_takes_objects_with_a_text_field_and_return_documents() -> None:
    body = {"query": "q", "documents": [{"text": "a", "id": 7}, "b"], "return_documents": True}
    parsed = rerank_request(json.dumps(body).encode(), Api.V1, limit_of)
    assert parsed.query == RerankQuery(query="q", documents=["a", "b"], return_documents=True)
    assert parsed.sent_documents == [{"text": "a", "id": 7}, "b"]


def test_v1_return_documents_is_off_unless_asked() -> None:
    assert not parse({"query": "q", "documents": ["a"]}, Api.V1).return_documents


def test_max_chunks_per_doc_above_one_scores_long_documents_by_their_best_window() -> None:
    base = {"query": "q", "documents": ["a"]}
    assert parse({**base, "max_chunks_per_doc": 10}, Api.V1).truncation is Truncation.CHUNK
    assert parse({**base, "max_chunks_per_doc": 1}, Api.V1).truncation is Truncation.END
    # An explicit truncation wins.
    assert (
        parse({**base, "max_chunks_per_doc": 10, "truncation": "none"}, Api.V1).truncation is Truncation.NONE
    )


def test_the_servers_own_options_are_taken_as_extra_fields() -> None:
    body = {
        "query": "q",
        "documents": ["a"],
        "instruction": "find it",
        "truncation": "CHUNK",
        "raw_scores": True,
        "cutoff_layer": 28,
    }
    for api in Api:
        assert parse(body, api) == RerankQuery(
            query="q",
            documents=["a"],
            instruction="find it",
            truncation=Truncation.CHUNK,
            raw_scores=True,
            cutoff_layer=28,
        )


def test_jinas_boolean_truncation_means_end_or_none() -> None:
    assert parse({"query": "q", "documents": ["a"], "truncation": True}, Api.V1).truncation is Truncation.END
    assert (
        parse({"query": "q", "documents": ["a"], "truncation": False}, Api.V1).truncation is Truncation.NONE
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", r"^the body is not JSON: "),
        (b"\xff\xfe{", r"^the body is not JSON: "),
        (b"[1]", r"^the body must be a JSON object$"),
        (b'{"documents": ["a"]}', r"^query is required"),
        (b'{"query": 3, "documents": ["a"]}', r"^query must be a string$"),
        (b'{"query": "q"}', r"^documents is required"),
        (b'{"query": "q", "documents": "a"}', r"^documents is required: a list"),
        (
            b'{"query": "q", "documents": ["a", {"title": "b"}]}',
            r"^documents\[1\] must be a string or an object",
        ),
        (b'{"query": "q", "documents": ["a", 3]}', r"^documents\[1\] must be"),
        (
            b'{"query": "q", "documents": ["a"], "top_n": 0}',
            r"^top_n must be an integer of at least 1 \(got 0\)$",
        ),
        (b'{"query": "q", "documents": ["a"], "top_n": -2}', r"^top_n must be an integer of at least 1"),
        (b'{"query": "q", "documents": ["a"], "top_n": "3"}', r"^top_n must be an integer"),
        (b'{"query": "q", "documents": ["a"], "top_n": true}', r"^top_n must be an integer"),
        (b'{"query": "q", "documents": ["a"], "top_n": 2.5}', r"^top_n must be an integer"),
        (b'{"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}', r"^max_tokens_per_doc must be"),
        (b'{"query": "q", "documents": ["a"], "truncation": "middle"}', r'^truncation must be "end", "none"'),
        (b'{"query": "q", "documents": ["a"], "raw_scores": "yes"}', r"^raw_scores must be true or false$"),
        (b'{"query": "q", "documents": ["a"], "model": 1}', r"^model must be a string$"),
        (b'{"query": "q", "documents": ["a"], "instruction": ["x"]}', r"^instruction must be a string$"),
        (
            b'{"query": "q", "documents": ["a"], "cutoff_layer": -1}',
            r"^cutoff_layer must be an integer of at least 0",
        ),
        (b"[" * 100_000, r"^the body is not JSON"),
    ],
)
def test_a_malformed_body_is_an_invalid_request_naming_the_field(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        rerank_request(body, Api.V2, limit_of)


def test_v1_checks_its_own_fields() -> None:
    with pytest.raises(InvalidRequestError, match=r"^return_documents must be true or false$"):
        parse({"query": "q", "documents": ["a"], "return_documents": "yes"}, Api.V1)
    with pytest.raises(InvalidRequestError, match=r"^max_chunks_per_doc must be"):
        parse({"query": "q", "documents": ["a"], "max_chunks_per_doc": 0}, Api.V1)


RESULT = RerankResult(
    results=[RankedDocument(1, 0.875, "b"), RankedDocument(0, 0.25, "a")],
    model="m",
    usage=Usage(documents=2, tokens=19),
)


def test_a_v2_reply_has_coheres_shape() -> None:
    assert rerank_response(RESULT, Api.V2, "rid", ["a", "b"]) == {
        "id": "rid",
        "results": [{"index": 1, "relevance_score": 0.875}, {"index": 0, "relevance_score": 0.25}],
        "meta": {
            "api_version": {"version": "2"},
            "billed_units": {"search_units": 1},
            "tokens": {"input_tokens": 19, "output_tokens": 0},
        },
        "model": "m",
    }


def test_a_v1_reply_has_coheres_and_jinas_shape_with_objects_returned_whole() -> None:
    sent = [{"text": "a", "id": 7}, "b"]
    assert rerank_response(RESULT, Api.V1, "rid", sent) == {
        "id": "rid",
        "results": [
            {"index": 1, "relevance_score": 0.875, "document": {"text": "b"}},
            {"index": 0, "relevance_score": 0.25, "document": {"text": "a", "id": 7}},
        ],
        "meta": {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}},
        "model": "m",
        "usage": {"total_tokens": 19, "prompt_tokens": 19},
    }


def test_a_v1_reply_without_return_documents_has_no_document() -> None:
    result = RerankResult(results=[RankedDocument(0, 0.5)], model="m")
    assert rerank_response(result, Api.V1, "rid", ["a"])["results"] == [{"index": 0, "relevance_score": 0.5}]


def test_the_model_list_says_what_coheres_does_beside_the_servers_own_fields() -> None:
    info = ModelInfo("m", "cross-encoder", 512, 8192, "float16", ["cuda:0"], 1, 1, True)
    (model,) = models_response([info])["models"]
    assert model["name"] == "m" and model["endpoints"] == ["rerank"] and model["context_length"] == 8192
    assert model["family"] == "cross-encoder" and model["ready"] is True


def test_encoded_json_is_utf8_and_never_nan() -> None:
    assert encode({"text": "café"}) == '{"text":"café"}'.encode()
    with pytest.raises(ValueError):
        encode({"relevance_score": float("nan")})


@pytest.mark.parametrize(
    ("error", "code", "http_status"),
    [
        (InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
        (UnauthenticatedError("x"), grpc.StatusCode.UNAUTHENTICATED, 401),
        (ModelNotFoundError("x"), grpc.StatusCode.NOT_FOUND, 404),
        (MessageTooLargeError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
        (OverloadedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (ModelError(), grpc.StatusCode.INTERNAL, 500),
        (RuntimeError("x"), grpc.StatusCode.INTERNAL, 500),
        (NoReplicaError("x"), grpc.StatusCode.UNAVAILABLE, 503),
        (ReplicaLostError("x"), grpc.StatusCode.UNAVAILABLE, 503),
        (DeadlineExceededError("x"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ],
)
def test_each_error_has_one_grpc_code_and_one_http_status(
    error: Exception, code: grpc.StatusCode, http_status: int
) -> None:
    status = error_status(error)
    assert (status.code, status.http_status) == (code, http_status)
