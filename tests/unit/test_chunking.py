"""TRUNCATION_CHUNK: a document too long for its row is scored as its best window.

template.py documents it: the query is kept as END keeps it, the document is split into windows of
the room beside that (cut) query, consecutive windows overlap by `chunk_overlap` tokens (at most half
a window), there are at most `max_chunks` of them, and the document's score is its best window's
(the service combines the windows' raw scores with np.maximum.at).

The expected windows are computed here from the references' own tokenization (FlagReference for a
BERT cross-encoder, GemmaReference for bge-reranker-v2-gemma): the window size is what the
reference's END row leaves beside the query, the spans come from a closed form rather than the
server's loop, and every expected window is scored by the reference one unpadded row at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from llm_reference import GemmaReference
from reference import FlagReference, ReferenceRow
from rerank_server.families import describe_model, load_row_builder, load_scorer
from rerank_server.families.base import (
    ModelSpec,
    PairTooLongError,
    Row,
    RowBuilder,
    RowOptions,
    Scorer,
    pack_rows,
)
from rerank_server.families.template import chunk_spans
from rerank_server.service.request import usage_of
from rerank_server.types import Truncation, Usage
from tiny_models import CORPUS

TOLERANCE = 1e-5
SHORT_QUERY = "what do giant pandas eat?"
LONG_QUERY = " ".join(CORPUS[:10])  # cut to 3/4 of max_length 64 by both recipes
MEDIUM_DOCUMENT = " ".join(CORPUS[:5])
LONG_DOCUMENT = " ".join(CORPUS)
DOCUMENTS = [CORPUS[0], MEDIUM_DOCUMENT, LONG_DOCUMENT]
MAX_LENGTH = 64
OVERLAP = 16
NO_CAP = 1000  # max_chunks that no document here reaches


def expected_spans(length: int, window: int, overlap: int, max_chunks: int) -> list[tuple[int, int]]:
    """The documented windows in closed form: one window per `step` tokens past the first window."""
    step = window - min(overlap, window // 2)
    count = 1 + max(0, -(-(length - window) // step))  # ceil((length - window) / step) more windows
    return [(i * step, min(i * step + window, length)) for i in range(min(count, max_chunks))]


@dataclass
class Served:
    spec: ModelSpec
    builder: RowBuilder
    scorer: Scorer

    def rows(
        self,
        query: str,
        documents: Sequence[str],
        max_length: int = MAX_LENGTH,
        truncation: Truncation = Truncation.CHUNK,
        overlap: int = OVERLAP,
        max_chunks: int = NO_CAP,
        first: int = 0,
    ) -> list[Row]:
        options = RowOptions(
            max_length,
            truncation,
            instruction=self.spec.default_instruction,
            chunk_overlap=overlap,
            max_chunks=max_chunks,
        )
        return self.builder.rows(query, list(documents), options, first)

    def document_scores(self, rows: list[Row], documents: int) -> np.ndarray:
        """Raw document scores as the service combines them: the best of each document's windows."""
        raw = np.full(documents, -np.inf, dtype=np.float32)
        np.maximum.at(raw, [row.document for row in rows], self.scorer.score(pack_rows(rows, self.spec)))
        return raw


class Recipe(ABC):
    """One family's reference row, split around the document part: head + document window + tail."""

    @abstractmethod
    def head(self, query: str, max_length: int) -> list[int]: ...

    @abstractmethod
    def tail(self) -> list[int]: ...

    @abstractmethod
    def document(self, document: str) -> list[int]:
        """The document part of a row, uncut."""

    @abstractmethod
    def end_row(self, query: str, document: str, max_length: int) -> list[int]:
        """The reference's own (END-truncated) row."""

    @abstractmethod
    def raw(self, head: list[int], window: list[int]) -> float:
        """The reference's raw score of head + window + tail, one unpadded row."""

    def window(self, query: str, max_length: int) -> int:
        """The room the reference leaves a document beside this query: its END row of a long document."""
        long_row = self.end_row(query, LONG_DOCUMENT * 2, max_length)
        return len(long_row) - len(self.head(query, max_length)) - len(self.tail())

    def windows(
        self, query: str, document: str, max_length: int, overlap: int, max_chunks: int
    ) -> list[list[int]]:
        """The document parts of the expected window rows."""
        ids = self.document(document)
        spans = expected_spans(len(ids), self.window(query, max_length), overlap, max_chunks)
        return [ids[start:end] for start, end in spans]


class BertRecipe(Recipe):
    def __init__(self, reference: FlagReference) -> None:
        self.reference = reference
        self.tokenizer = reference.tokenizer

    def head(self, query: str, max_length: int) -> list[int]:
        query_ids = self.reference.tokens(query, max_length * 3 // 4)
        return [self.tokenizer.cls_token_id, *query_ids, self.tokenizer.sep_token_id]

    def tail(self) -> list[int]:
        return [self.tokenizer.sep_token_id]

    def document(self, document: str) -> list[int]:
        return self.reference.tokens(document)

    def end_row(self, query: str, document: str, max_length: int) -> list[int]:
        return self.reference.row(query, document, max_length).input_ids

    def token_types(self, head: list[int], window: list[int]) -> list[int]:
        return [0] * len(head) + [1] * (len(window) + len(self.tail()))

    def raw(self, head: list[int], window: list[int]) -> float:
        ids = [*head, *window, *self.tail()]
        return self.reference.score(ReferenceRow(ids, self.token_types(head, window), False, len(ids)))


class GemmaRecipe(Recipe):
    def __init__(self, reference: GemmaReference) -> None:
        self.reference = reference

    def head(self, query: str, max_length: int) -> list[int]:
        query_ids = self.reference.text(f"A: {query}", max_length * 3 // 4)
        return [self.reference.tokenizer.bos_token_id, *query_ids, *self.reference.sep_ids]

    def tail(self) -> list[int]:
        return [*self.reference.sep_ids, *self.reference.prompt_ids]

    def document(self, document: str) -> list[int]:
        return self.reference.text(f"B: {document}")

    def end_row(self, query: str, document: str, max_length: int) -> list[int]:
        return self.reference.input_ids(query, document, max_length)

    def raw(self, head: list[int], window: list[int]) -> float:
        logits = self.reference.last_logits([*head, *window, *self.tail()])
        return float(logits[self.reference.yes_id])


def serve(path: Path) -> Served:
    spec = describe_model(str(path))
    return Served(spec, load_row_builder(spec), load_scorer(spec, "cpu", "float32"))


@pytest.fixture(scope="module")
def families(bert_cross_encoder_dir: Path, gemma_dir: Path) -> dict[str, tuple[Served, Recipe]]:
    return {
        "bert": (serve(bert_cross_encoder_dir), BertRecipe(FlagReference(bert_cross_encoder_dir, "bert"))),
        "gemma": (serve(gemma_dir), GemmaRecipe(GemmaReference(gemma_dir))),
    }


def ids(row: Row) -> list[int]:
    return row.tokens["input_ids"].tolist()


def document_part(row: Row, head: list[int], tail: list[int]) -> list[int]:
    tokens = ids(row)
    assert tokens[: len(head)] == head
    assert tokens[len(tokens) - len(tail) :] == tail
    return tokens[len(head) : len(tokens) - len(tail)]


def one_token_words(recipe: Recipe, count: int) -> str:
    """A text whose document part is exactly `count` tokens (one per repeated word)."""
    for words in range(1, 4 * count):
        text = " ".join(["panda"] * words)
        if len(recipe.document(text)) == count:
            return text
    raise AssertionError(f"no repetition of 'panda' makes a {count}-token document part")


# --- chunk_spans -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "window", "overlap", "max_chunks", "spans"),
    [
        (10, 4, 0, 10, [(0, 4), (4, 8), (8, 10)]),  # no overlap: back to back, a short last window
        (10, 4, 1, 10, [(0, 4), (3, 7), (6, 10)]),  # stride 3; the last window ends exactly at 10
        (7, 4, 1, 10, [(0, 4), (3, 7)]),  # no extra window once one reaches the end
        (10, 4, 3, 10, [(0, 4), (2, 6), (4, 8), (6, 10)]),  # overlap 3 > half of 4: capped at 2
        (12, 5, 4, 10, [(0, 5), (3, 8), (6, 11), (9, 12)]),  # odd window: overlap capped at 5 // 2
        (3, 1, 5, 10, [(0, 1), (1, 2), (2, 3)]),  # a one-token window cannot overlap
        (8, 8, 2, 10, [(0, 8)]),  # the document exactly fits: one window
        (5, 8, 2, 10, [(0, 5)]),  # shorter than a window
        (9, 8, 2, 10, [(0, 8), (6, 9)]),  # one token over: a second, short window
        (100, 10, 0, 3, [(0, 10), (10, 20), (20, 30)]),  # the cap: the tail goes unscored
        (100, 10, 4, 1, [(0, 10)]),  # max_chunks 1 is END's cut
    ],
)
def test_chunk_spans_hand_computed(
    length: int, window: int, overlap: int, max_chunks: int, spans: list[tuple[int, int]]
) -> None:
    assert chunk_spans(length, window, overlap, max_chunks) == spans
    assert expected_spans(length, window, overlap, max_chunks) == spans  # the tests' own closed form


@pytest.mark.parametrize("window", [1, 2, 3, 7, 8, 55])
@pytest.mark.parametrize("overlap", [0, 1, 3, 4, 27, 64])
def test_chunk_spans_cover_the_document_with_the_documented_overlap(window: int, overlap: int) -> None:
    for length in range(window + 1, 4 * window + 3):
        spans = chunk_spans(length, window, overlap, NO_CAP)
        assert spans == expected_spans(length, window, overlap, NO_CAP)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(end - start == window for start, end in spans[:-1])
        assert 0 < spans[-1][1] - spans[-1][0] <= window
        overlaps = {previous_end - start for (_, previous_end), (start, _) in pairwise(spans)}
        assert overlaps == {min(overlap, window // 2)}
        assert spans[-2][1] < length  # no window is wasted: only the last one reaches the end
        capped = chunk_spans(length, window, overlap, 2)
        assert capped == spans[:2]


# --- rows ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "gemma"])
@pytest.mark.parametrize("query", [SHORT_QUERY, LONG_QUERY], ids=["short-query", "long-query"])
@pytest.mark.parametrize("overlap", [0, OVERLAP, 10_000], ids=["no-overlap", "overlap", "over-half"])
def test_chunk_rows_are_the_reference_windows(
    families: dict[str, tuple[Served, Recipe]], name: str, query: str, overlap: int
) -> None:
    served, recipe = families[name]
    head, tail = recipe.head(query, MAX_LENGTH), recipe.tail()
    window = recipe.window(query, MAX_LENGTH)
    effective_overlap = min(overlap, window // 2)
    rows = served.rows(query, DOCUMENTS, overlap=overlap, first=7)
    end_rows = served.rows(query, DOCUMENTS, truncation=Truncation.END, first=7)
    query_cut = len(head) < len(recipe.head(query, 10**6))
    assert query_cut == (query == LONG_QUERY)

    expected = [
        (7 + index, [*head, *part, *tail])
        for index, document in enumerate(DOCUMENTS)
        for part in recipe.windows(query, document, MAX_LENGTH, overlap, NO_CAP)
    ]
    assert [(row.document, ids(row)) for row in rows] == expected
    long_rows = [row for row in rows if row.document == 9]
    assert len(long_rows) > 3  # the long document really is split into several windows

    for index, (document, end_row) in enumerate(zip(DOCUMENTS, end_rows, strict=True)):
        windows = [row for row in rows if row.document == 7 + index]
        document_ids = recipe.document(document)
        # The first window is END's row, which is the reference's own row.
        assert ids(windows[0]) == ids(end_row) == recipe.end_row(query, document, MAX_LENGTH)
        # Every window fits what an END row may hold.
        assert all(row.length <= served.spec.row_length(MAX_LENGTH) for row in windows)
        assert all(row.length == len(head) + window + len(tail) for row in windows[:-1])
        parts = [document_part(row, head, tail) for row in windows]
        assert all(len(part) == window for part in parts[:-1])
        # Consecutive windows share exactly the (capped) overlap, and together hold the whole document.
        for previous, following in pairwise(parts):
            assert previous[len(previous) - effective_overlap :] == following[:effective_overlap]
        assert [
            *parts[0],
            *(token for part in parts[1:] for token in part[effective_overlap:]),
        ] == document_ids
        # Nothing of the document is lost, so only a cut query marks these windows truncated.
        assert all(row.truncated == query_cut for row in windows)
        assert end_row.truncated == (query_cut or len(document_ids) > window)
        if isinstance(recipe, BertRecipe):  # the document window is token type 1, as in END's row
            assert all(
                row.tokens["token_type_ids"].tolist() == recipe.token_types(head, part)
                for row, part in zip(windows, parts, strict=True)
            )


@pytest.mark.parametrize("name", ["bert", "gemma"])
def test_a_document_that_fits_is_one_row_equal_to_end(
    families: dict[str, tuple[Served, Recipe]], name: str
) -> None:
    served, recipe = families[name]
    head, tail = recipe.head(SHORT_QUERY, MAX_LENGTH), recipe.tail()
    window = recipe.window(SHORT_QUERY, MAX_LENGTH)
    exact = one_token_words(recipe, window)  # fills the room to the last token
    over = one_token_words(recipe, window + 1)  # one token more
    for document in (CORPUS[0], exact):
        (row,) = served.rows(SHORT_QUERY, [document])
        (end_row,) = served.rows(SHORT_QUERY, [document], truncation=Truncation.END)
        assert ids(row) == ids(end_row) == recipe.end_row(SHORT_QUERY, document, MAX_LENGTH)
        assert not row.truncated and not end_row.truncated
        for truncation in (Truncation.NONE, Truncation.CHUNK):  # it fits: NONE takes it too
            assert ids(served.rows(SHORT_QUERY, [document], truncation=truncation)[0]) == ids(row)
    assert len(ids(served.rows(SHORT_QUERY, [exact])[0])) == len(head) + window + len(tail)
    first, second = served.rows(SHORT_QUERY, [over])
    over_ids = recipe.document(over)
    step = window - min(OVERLAP, window // 2)
    assert document_part(first, head, tail) == over_ids[:window]
    assert document_part(second, head, tail) == over_ids[step:]
    assert not first.truncated and not second.truncated


# --- scores ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "gemma"])
@pytest.mark.parametrize("query", [SHORT_QUERY, LONG_QUERY], ids=["short-query", "long-query"])
def test_chunked_document_scores_as_its_best_reference_window(
    families: dict[str, tuple[Served, Recipe]], name: str, query: str
) -> None:
    served, recipe = families[name]
    head = recipe.head(query, MAX_LENGTH)
    rows = served.rows(query, DOCUMENTS)
    scores = served.document_scores(rows, len(DOCUMENTS))  # one padded batch of every window
    window_scores = [
        [recipe.raw(head, part) for part in recipe.windows(query, document, MAX_LENGTH, OVERLAP, NO_CAP)]
        for document in DOCUMENTS
    ]
    assert np.ptp(window_scores[-1]) > 1e-3, "the tiny model must tell the windows apart"
    np.testing.assert_allclose(scores, [max(s) for s in window_scores], rtol=0, atol=TOLERANCE)
    # END scores the first window alone.
    end_rows = served.rows(query, DOCUMENTS, truncation=Truncation.END)
    np.testing.assert_allclose(
        served.document_scores(end_rows, len(DOCUMENTS)),
        [s[0] for s in window_scores],
        rtol=0,
        atol=TOLERANCE,
    )


def find_late_best_window(recipe: Recipe, max_length: int, overlap: int) -> tuple[str, str, list[float]]:
    """The first (query, document) built from CORPUS whose best reference window is not its first."""
    queries = [SHORT_QUERY, *CORPUS[20:27]]
    for start in range(0, len(CORPUS) - 4, 3):
        document = " ".join(CORPUS[start : start + 4])
        for query in queries:
            head = recipe.head(query, max_length)
            parts = recipe.windows(query, document, max_length, overlap, NO_CAP)
            if len(parts) < 2:
                continue
            scores = [recipe.raw(head, part) for part in parts]
            if int(np.argmax(scores)) > 0 and max(scores) - scores[0] > 0.05:
                return query, document, scores
    raise AssertionError("no document here has its best window past the first")


@pytest.mark.parametrize("name", ["bert", "gemma"])
def test_a_document_whose_best_part_is_past_the_first_window(
    families: dict[str, tuple[Served, Recipe]], name: str
) -> None:
    served, recipe = families[name]
    max_length = 40
    query, document, window_scores = find_late_best_window(recipe, max_length, OVERLAP)
    best = int(np.argmax(window_scores))
    assert best > 0
    rows = served.rows(query, [CORPUS[0], document], max_length=max_length)
    assert sum(row.document == 1 for row in rows) == len(window_scores)
    chunk = served.document_scores(rows, 2)[1]
    end_rows = served.rows(query, [CORPUS[0], document], max_length=max_length, truncation=Truncation.END)
    end = served.document_scores(end_rows, 2)[1]
    assert chunk == pytest.approx(window_scores[best], abs=TOLERANCE)
    assert end == pytest.approx(window_scores[0], abs=TOLERANCE)
    assert chunk - end > 0.05  # the later window lifts the document above its END score
    normalized = served.builder.normalize(np.array([chunk, end], dtype=np.float32))
    assert normalized[0] > normalized[1]


# --- the cap and usage -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "gemma"])
def test_max_chunks_caps_a_very_long_document(families: dict[str, tuple[Served, Recipe]], name: str) -> None:
    served, recipe = families[name]
    head, tail = recipe.head(SHORT_QUERY, MAX_LENGTH), recipe.tail()
    very_long = " ".join(CORPUS * 3)
    assert len(recipe.windows(SHORT_QUERY, very_long, MAX_LENGTH, OVERLAP, NO_CAP)) > 3
    rows = served.rows(SHORT_QUERY, [very_long], max_chunks=3, first=4)
    assert len(rows) == 3
    assert all(row.document == 4 and row.truncated for row in rows)
    expected = recipe.windows(SHORT_QUERY, very_long, MAX_LENGTH, OVERLAP, 3)
    assert [document_part(row, head, tail) for row in rows] == expected
    window_scores = [recipe.raw(head, part) for part in expected]
    np.testing.assert_allclose(served.document_scores(rows, 5)[4], max(window_scores), rtol=0, atol=TOLERANCE)


def test_usage_counts_chunked_documents_and_windows(families: dict[str, tuple[Served, Recipe]]) -> None:
    served, recipe = families["bert"]
    window = recipe.window(SHORT_QUERY, MAX_LENGTH)
    documents = [CORPUS[0], MEDIUM_DOCUMENT, LONG_DOCUMENT, CORPUS[1]]
    lengths = [len(recipe.document(document)) for document in documents]
    assert lengths[0] <= window < lengths[1] <= window + window - OVERLAP  # two windows cover it
    assert lengths[2] > window + 2 * (window - OVERLAP)  # more than three windows needed
    assert lengths[3] <= window

    rows = served.rows(SHORT_QUERY, documents, max_chunks=3)
    assert [row.document for row in rows] == [0, 1, 1, 2, 2, 2, 3]
    assert usage_of(rows, len(documents)) == Usage(
        documents=4,
        tokens=sum(row.length for row in rows),
        truncated=1,  # only the capped document lost tokens; the medium one is covered by its windows
        chunked=2,
        windows=7,
    )
    end_rows = served.rows(SHORT_QUERY, documents, truncation=Truncation.END)
    assert usage_of(end_rows, len(documents)) == Usage(
        documents=4, tokens=sum(row.length for row in end_rows), truncated=2, chunked=0, windows=4
    )
    # A query cut to fit marks every document truncated, chunked or not.
    cut = served.rows(LONG_QUERY, documents, max_chunks=3)
    usage = usage_of(cut, len(documents))
    assert (usage.documents, usage.truncated, usage.windows) == (4, 4, len(cut))
    assert usage.chunked == sum(
        len(recipe.windows(LONG_QUERY, document, MAX_LENGTH, OVERLAP, 3)) > 1 for document in documents
    )


# --- no room ---------------------------------------------------------------------------------------


def test_chunk_refuses_a_query_that_leaves_no_room(qwen3_dir: Path) -> None:
    """Qwen3 keeps as much of the body (instruction and query) as the template leaves: a long query
    fills it, so END scores the query alone, NONE refuses the query and CHUNK has no room for windows."""
    spec = describe_model(str(qwen3_dir))
    served = Served(spec, load_row_builder(spec), scorer=None)  # type: ignore[arg-type]
    max_length = spec.min_max_length + 8
    documents = [CORPUS[0], LONG_DOCUMENT]
    (end_row, _) = served.rows(LONG_QUERY, documents, max_length, Truncation.END)
    assert end_row.truncated and end_row.length == max_length
    with pytest.raises(
        PairTooLongError, match=f"leaves no room for document windows at max_length {max_length}"
    ):
        served.rows(LONG_QUERY, documents, max_length, Truncation.CHUNK)
    with pytest.raises(PairTooLongError, match="the query needs"):
        served.rows(LONG_QUERY, documents, max_length, Truncation.NONE)
    # With room beside a short query, the same model chunks.
    rows = served.rows("pandas?", [LONG_DOCUMENT], 256, Truncation.CHUNK, max_chunks=NO_CAP)
    assert len(rows) > 1 and all(row.length <= 256 for row in rows)


def test_a_query_is_tokenized_once_for_every_part_of_a_stream(bert_cross_encoder_dir: Path) -> None:
    builder = load_row_builder(describe_model(str(bert_cross_encoder_dir)))
    tokenizer = builder.tokenizer
    encoded: list[str] = []

    class Counting:
        def encode(self, text: str, **kwargs: object) -> object:
            encoded.append(text)
            return tokenizer.encode(text, **kwargs)

        def __getattr__(self, name: str) -> object:
            return getattr(tokenizer, name)

    builder.tokenizer = Counting()  # type: ignore[attr-defined]
    options = RowOptions(max_length=64)
    first = builder.rows("pandas and bamboo", ["one part", "of a stream"], options, 0)
    second = builder.rows("pandas and bamboo", ["the next", "part"], options, 2)
    assert encoded == ["pandas and bamboo"]  # the second part reused its ids
    assert first[0].tokens["input_ids"][:5].tolist() == second[0].tokens["input_ids"][:5].tolist()
    builder.rows("another query", ["x"], options, 0)
    assert encoded == ["pandas and bamboo", "another query"]
