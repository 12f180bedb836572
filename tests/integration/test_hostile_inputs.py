"""Hostile input through the real server: whatever a client sends, it gets a valid ranking or a clear
status (never UNKNOWN, never a hang), and the server goes on SERVING with no worker lost.

Hypothesis draws the requests: any unicode, NUL and control characters, text of only zero-width or
only whitespace characters, text that spells special tokens, sizes at and one past every limit, every
truncation number including unknown ones (raw protobuf: the typed client cannot send those), and
StreamRerank message sequences with the header missing, repeated, empty or invalid. Documents after
a half-close cannot be expressed with gRPC (a call takes no message after its client half-closed), so
that case is not here. The server serves the real default model with every limit at its default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rerank.v1 import reranker_pb2 as pb
from rerank.v1 import reranker_pb2_grpc as pb_grpc
from rerank_client import ModelInfo, RerankerClient, RerankError, Truncation
from rerank_server.families.base import DEFAULT_MODEL
from rerank_server.settings import ServerSettings

from integration.conftest import StartServer
from integration.server_process import ServerProcess

pytestmark = pytest.mark.integration

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def _default(name: str) -> int:
    return int(ServerSettings.model_fields[name].default)


MAX_DOCUMENTS = _default("max_documents")
MAX_QUERY_CHARS = _default("max_query_chars")
MAX_DOCUMENT_CHARS = _default("max_document_chars")
MAX_STREAM_TOP_N = _default("max_stream_top_n")
MAX_MESSAGE_BYTES = _default("max_message_mb") * 1024 * 1024
CALL_TIMEOUT_S = 120.0  # generous on a loaded machine; a call past it is a hang
# Below this max_length, whether a pair fits is the model's to say (its special tokens): either answer.
SMALL_MAX_LENGTH = 8
KNOWN_TRUNCATIONS = frozenset(pb.Truncation.values())
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", 2 * MAX_MESSAGE_BYTES),
]

HOSTILE = settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SPECIAL_TOKENS = (
    "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "<s>", "</s>", "<pad>", "<unk>", "<mask>", "<bos>",
    "<eos>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>",
    "<think>", "</think>", "A: ", "B: ", "yes", "no",
)  # fmt: skip
CONTROL = tuple(chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)))
ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e", "\u034f", "\u061c")
WHITESPACE = tuple(c for c in map(chr, range(0x110000)) if c.isspace())
# Pieces that long texts repeat up to a limit: one token, many tokens, nothing a tokenizer keeps.
PIECES = ("x", "word ", "\x00", "\u200b", "[SEP] ", "\U0010ffff", "日本語 ", " ")

any_text = st.text(st.characters(codec="utf-8"), max_size=64)  # protobuf strings are UTF-8
texts = st.one_of(
    any_text,
    st.text(st.sampled_from(CONTROL), min_size=1, max_size=32),
    st.text(st.sampled_from(ZERO_WIDTH), min_size=1, max_size=32),
    st.text(st.sampled_from(WHITESPACE), min_size=1, max_size=32),
    st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), any_text), min_size=1, max_size=12).map("".join),
)


def repeated(piece: str, length: int) -> str:
    return (piece * (length // len(piece) + 1))[:length]


def at_limit(limit: int) -> st.SearchStrategy[str]:
    """Text of exactly `limit` characters, or one more."""
    return st.builds(repeated, st.sampled_from(PIECES), st.sampled_from([limit, limit + 1]))


def mostly(usual: st.SearchStrategy, unusual: st.SearchStrategy) -> st.SearchStrategy:
    """`usual` nine times in ten, so that most requests get past the options to the model."""
    return st.integers(0, 9).flatmap(lambda draw: unusual if draw == 0 else usual)


uint32 = st.one_of(st.sampled_from([0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
max_lengths = mostly(
    st.one_of(st.just(0), st.integers(SMALL_MAX_LENGTH, 512)), st.sampled_from([1, 2, 3, 513, 2**32 - 1])
)
truncations = mostly(st.sampled_from(sorted(KNOWN_TRUNCATIONS)), st.integers(-(2**31), 2**31 - 1))
documents = mostly(
    st.lists(mostly(texts, at_limit(MAX_DOCUMENT_CHARS)), min_size=1, max_size=6),
    st.sampled_from([[], ["d"] * (MAX_DOCUMENTS + 1)]),
)


def rerank_requests(top_n: st.SearchStrategy[int], docs: st.SearchStrategy[list[str]]) -> st.SearchStrategy:
    return st.builds(
        pb.RerankRequest,
        model=mostly(st.sampled_from(["", DEFAULT_MODEL]), texts),
        query=mostly(texts, at_limit(MAX_QUERY_CHARS)),
        documents=docs,
        top_n=top_n,
        return_documents=st.booleans(),
        raw_scores=st.booleans(),
        max_length=max_lengths,
        truncation=truncations,
        instruction=mostly(st.just(""), texts),
        cutoff_layer=mostly(st.just(0), uint32),
    )


stream_top_n = mostly(st.integers(1, 12), st.sampled_from([0, MAX_STREAM_TOP_N, MAX_STREAM_TOP_N + 1]))
small_documents = st.lists(mostly(texts, at_limit(MAX_DOCUMENT_CHARS)), max_size=4)
header_messages = rerank_requests(stream_top_n, small_documents).map(
    lambda h: pb.StreamRerankRequest(header=h)
)
chunk_messages = small_documents.map(
    lambda docs: pb.StreamRerankRequest(documents=pb.DocumentChunk(documents=docs))
)
any_message = st.one_of(header_messages, chunk_messages, st.just(pb.StreamRerankRequest()))
stream_sequences = st.one_of(
    st.lists(any_message, max_size=5),
    st.builds(lambda head, rest: [head, *rest], header_messages, st.lists(chunk_messages, max_size=4)),
    st.builds(lambda head, rest: [head, *rest], header_messages, st.lists(any_message, max_size=4)),
)


@dataclass
class Outcome:
    """What one call came back with: its status, and on OK the ranking (index, score, document)."""

    code: grpc.StatusCode
    message: str = ""
    results: list[tuple[int, float, str | None]] = field(default_factory=list)
    model: str = ""
    documents: int = 0
    scored: list[tuple[int, float]] = field(default_factory=list)  # StreamRerank's scored messages


@pytest.fixture(scope="module")
def server(start_module_server: StartServer) -> ServerProcess:
    return start_module_server()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.RerankerStub]:
    channel = grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS)
    yield pb_grpc.RerankerStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[RerankerClient]:
    with RerankerClient(server.target, retry=None, timeout=CALL_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def model(client: RerankerClient) -> ModelInfo:
    (served,) = client.list_models()
    return served


def ranked(messages: Iterable[pb.RankedDocument]) -> list[tuple[int, float, str | None]]:
    return [(m.index, m.score, m.document if m.HasField("document") else None) for m in messages]


def rerank_raw(stub: pb_grpc.RerankerStub, request: pb.RerankRequest) -> Outcome:
    try:
        response = stub.Rerank(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "")
    return Outcome(OK, "", ranked(response.results), response.model, response.usage.documents)


def stream_raw(stub: pb_grpc.RerankerStub, messages: list[pb.StreamRerankRequest]) -> Outcome:
    outcome = Outcome(OK)
    call = stub.StreamRerank(iter(messages), timeout=CALL_TIMEOUT_S)
    try:
        finals = 0
        for response in call:
            if response.HasField("final"):
                finals += 1
                final = response.final
                outcome.results = ranked(final.results)
                outcome.model, outcome.documents = final.model, final.usage.documents
            else:
                outcome.scored.extend((m.index, m.score) for m in response.scored.results)
        assert finals == 1, f"{finals} final messages in one stream"
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "", scored=outcome.scored)
    return outcome


def option_faults(request: pb.RerankRequest, model: ModelInfo, *, streaming: bool) -> set[grpc.StatusCode]:
    """The statuses a request's options and query earn it, whatever its documents; empty when valid."""
    faults = set()
    if request.model not in ("", model.name):
        faults.add(NOT_FOUND)
    max_length = request.max_length or model.max_length
    if (
        request.truncation not in KNOWN_TRUNCATIONS
        or not request.query.strip()  # README: an empty query; whitespace is nothing to rank by
        or len(request.query) > MAX_QUERY_CHARS
        or max_length > model.max_length_limit
        or (request.instruction and not model.takes_instruction)
        or (
            request.cutoff_layer
            and not model.min_cutoff_layer <= request.cutoff_layer <= model.max_cutoff_layer
        )
        or (streaming and not 1 <= request.top_n <= MAX_STREAM_TOP_N)
    ):
        faults.add(INVALID)
    return faults


def document_faults(docs: list[str]) -> set[grpc.StatusCode]:
    if not docs or len(docs) > MAX_DOCUMENTS or any(len(d) > MAX_DOCUMENT_CHARS for d in docs):
        return {INVALID}
    return set()


def allowed(
    request: pb.RerankRequest, faults: set[grpc.StatusCode], model: ModelInfo
) -> set[grpc.StatusCode]:
    """Any one of the faults, or OK when there are none; INVALID_ARGUMENT also where only the model knows
    whether a pair fits (TRUNCATION_NONE, a tiny max_length)."""
    if faults:
        return faults
    if (
        request.truncation == pb.TRUNCATION_NONE
        or (request.max_length or model.max_length) < SMALL_MAX_LENGTH
    ):
        return {OK, INVALID}
    return {OK}


def assert_answered(outcome: Outcome, expected: set[grpc.StatusCode], server: ServerProcess) -> None:
    """One of the expected statuses, with a message unless OK (the server's log tail when not)."""
    event(outcome.code.name)  # --hypothesis-show-statistics: how many examples reached the model
    if outcome.code not in expected:
        pytest.fail(
            f"got {outcome.code.name} ({outcome.message!r}), expected {sorted(c.name for c in expected)}; "
            f"server log:\n{server.log()[-4000:]}"
        )
    if outcome.code != OK:
        assert outcome.message, f"{outcome.code.name} without a message"


def assert_valid_ranking(
    outcome: Outcome, docs: list[str], top_n: int, *, raw: bool, return_documents: bool, model: ModelInfo
) -> None:
    """Results sorted best first, distinct indices of the request's documents, at most top_n,
    finite scores (in [0, 1] unless raw), each document echoed exactly when asked."""
    n = len(docs)
    assert outcome.model == model.name
    assert outcome.documents == n
    assert len(outcome.results) == (min(top_n, n) if top_n else n)
    indices = [index for index, _, _ in outcome.results]
    assert len(set(indices)) == len(indices) and all(0 <= i < n for i in indices)
    scores = [score for _, score, _ in outcome.results]
    assert all(math.isfinite(s) for s in scores)
    if not raw:
        assert all(0.0 <= s <= 1.0 for s in scores)
    for (i, s, _), (j, t, _) in zip(outcome.results, outcome.results[1:], strict=False):
        assert s >= t, "results not sorted by score"
        if raw and s == t:
            assert i < j, "a tie not broken by index"
    for index, _, document in outcome.results:
        assert document == (docs[index] if return_documents else None)


def assert_top_of(outcome: Outcome, full: Outcome) -> None:
    """The top_n are the best of the full ranking (what ranked below them scores no higher)."""
    assert full.code == OK, f"the same request with top_n 0 got {full.code.name}: {full.message}"
    kept = {index for index, _, _ in outcome.results}
    lowest_kept = min(score for _, score, _ in outcome.results)
    assert all(score <= lowest_kept + 1e-3 for index, score, _ in full.results if index not in kept)


@HOSTILE
@given(request=rerank_requests(uint32, documents))
def test_any_rerank_request_gets_a_ranking_or_a_clear_status(
    request: pb.RerankRequest, stub: pb_grpc.RerankerStub, model: ModelInfo, server: ServerProcess
) -> None:
    docs = list(request.documents)
    faults = option_faults(request, model, streaming=False) | document_faults(docs)
    outcome = rerank_raw(stub, request)
    assert_answered(outcome, allowed(request, faults, model), server)
    if outcome.code != OK:
        return
    top_n = request.top_n
    assert_valid_ranking(
        outcome, docs, top_n, raw=request.raw_scores, return_documents=request.return_documents, model=model
    )
    if 0 < top_n < len(docs):
        everything = pb.RerankRequest()
        everything.CopyFrom(request)
        everything.top_n = 0
        assert_top_of(outcome, rerank_raw(stub, everything))


@HOSTILE
@given(messages=stream_sequences)
def test_any_stream_rerank_sequence_gets_a_ranking_or_a_clear_status(
    messages: list[pb.StreamRerankRequest],
    stub: pb_grpc.RerankerStub,
    model: ModelInfo,
    server: ServerProcess,
) -> None:
    kinds = [m.WhichOneof("kind") for m in messages]
    faults: set[grpc.StatusCode] = set()
    if not messages or kinds[0] != "header":
        faults.add(INVALID)  # the header is missing
        header = pb.RerankRequest(query="q", top_n=1)
    else:
        header = messages[0].header
        faults |= option_faults(header, model, streaming=True)
    if any(kind != "documents" for kind in kinds[1:]):
        faults.add(INVALID)  # a second header, or a message that is neither
    docs = [
        d for m in messages for d in (m.header.documents if m.HasField("header") else m.documents.documents)
    ]
    if not docs or any(len(d) > MAX_DOCUMENT_CHARS for d in docs):
        faults.add(INVALID)
    outcome = stream_raw(stub, messages)
    assert_answered(outcome, allowed(header, faults, model), server)
    if outcome.code != OK:
        return
    assert_valid_ranking(
        outcome,
        docs,
        header.top_n,
        raw=header.raw_scores,
        return_documents=header.return_documents,
        model=model,
    )
    scored = dict(outcome.scored)
    assert len(scored) == len(outcome.scored), "a document scored twice"
    assert sorted(scored) == list(range(len(docs))), "not every document scored"
    assert all(scored[index] == score for index, score, _ in outcome.results)
    assert_top_of(outcome, Outcome(OK, results=[(i, s, None) for i, s in scored.items()]))


@HOSTILE
@given(
    query=texts,
    docs=st.lists(texts, min_size=1, max_size=8),
    top_n=st.integers(0, 10),
    truncation=st.sampled_from(Truncation),
    raw=st.booleans(),
    return_documents=st.booleans(),
    stream=st.booleans(),
)
def test_the_typed_client_gets_a_ranking_or_a_typed_error_for_any_text(
    query: str,
    docs: list[str],
    top_n: int,
    truncation: Truncation,
    raw: bool,
    return_documents: bool,
    stream: bool,
    client: RerankerClient,
    model: ModelInfo,
    server: ServerProcess,
) -> None:
    options: dict[str, Any] = {
        "raw_scores": raw,
        "return_documents": return_documents,
        "truncation": truncation,
    }
    if stream:
        top_n = max(1, top_n)
    try:
        if stream:
            result = client.stream_rerank(query, iter(docs), top_n=top_n, chunk_size=3, **options)
        else:
            result = client.rerank(query, docs, top_n=top_n, **options)
    except RerankError as error:
        outcome = Outcome(error.code, error.message)
    else:
        outcome = Outcome(
            OK,
            results=[(r.index, r.score, r.document) for r in result.results],
            model=result.model,
            documents=result.usage.documents,
        )
    expected = {INVALID} if not query.strip() else {OK}
    if truncation is Truncation.NONE:
        expected.add(INVALID)
    assert_answered(outcome, expected, server)
    if outcome.code == OK:
        assert_valid_ranking(outcome, docs, top_n, raw=raw, return_documents=return_documents, model=model)


@pytest.mark.parametrize("header_count", [0, 2], ids=["no-header", "header-twice"])
def test_a_stream_without_exactly_one_header_first_is_invalid(
    stub: pb_grpc.RerankerStub, header_count: int
) -> None:
    header = pb.StreamRerankRequest(header=pb.RerankRequest(query="q", documents=["a"], top_n=1))
    chunk = pb.StreamRerankRequest(documents=pb.DocumentChunk(documents=["b", "c"]))
    outcome = stream_raw(stub, [header] * header_count + [chunk])
    assert outcome.code == INVALID
    assert "header" in outcome.message


def test_an_empty_stream_is_invalid(stub: pb_grpc.RerankerStub) -> None:
    outcome = stream_raw(stub, [])
    assert outcome.code == INVALID


def test_a_message_past_the_size_limit_is_refused_with_resource_exhausted(stub: pb_grpc.RerankerStub) -> None:
    document = "x" * MAX_DOCUMENT_CHARS
    count = MAX_MESSAGE_BYTES // MAX_DOCUMENT_CHARS + 1
    request = pb.RerankRequest(query="q", documents=[document] * count)
    assert request.ByteSize() > MAX_MESSAGE_BYTES
    outcome = rerank_raw(stub, request)
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_stream_abandoned_midway_leaves_the_server_serving(
    server: ServerProcess, client: RerankerClient
) -> None:
    class Abandon(Exception):
        pass

    def give_up(_: object) -> None:
        raise Abandon

    endless = (f"passage {i} about pandas" for i in range(10**9))
    with pytest.raises(Abandon):
        client.stream_rerank("what do pandas eat?", endless, top_n=3, chunk_size=64, on_scored=give_up)
    assert len(client.rerank("what do pandas eat?", ["bamboo", "paris"]).results) == 2


def test_after_all_of_it_the_server_is_serving_and_lost_no_worker(
    server: ServerProcess, client: RerankerClient
) -> None:
    assert client.health() == "SERVING"
    (served,) = client.list_models()
    assert served.ready_replicas == served.replicas
    assert server.metric("rerank_worker_restarts_total") == 0
    assert server.metric("rerank_requests_total", {"code": "UNKNOWN"}) == 0
    assert server.metric("rerank_requests_total", {"code": "INTERNAL"}) == 0
