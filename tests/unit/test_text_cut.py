"""Documents are tokenized only as far as rows use them, and the rows are those of the whole text.

text_cut.py tokenizes a character prefix of each document and keeps only the tokens the rest of the
text cannot change; template.py asks for as many as a row can use (document_need). Every test here
compares against the same family's row builder with the cut switched off (`WholeText`, each
document tokenized whole, as rows were built before): token ids of every column, truncated flags,
windows, and the refusal message of TRUNCATION_NONE must be the same, on the real all-MiniLM-L6-v2
tokenizer (WordPiece) and on the tiny checkpoints of every family (WordPiece, Unigram, byte-level
BPE, SentencePiece-style BPE with byte fallback over the whole text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rerank_server.families import describe_model, load_row_builder
from rerank_server.families.base import PairTooLongError, Row, RowOptions
from rerank_server.families.template import PairTemplate
from rerank_server.families.text_cut import CHARS_PER_TOKEN, TextCut
from rerank_server.types import Truncation
from tiny_models import CORPUS
from tokenizers import Encoding, Tokenizer

FAMILY_DIRS = {
    "minilm": "minilm_dir",  # bi-encoder, the real all-MiniLM-L6-v2 tokenizer
    "bert": "bert_cross_encoder_dir",  # cross-encoder, WordPiece with a tiny vocabulary (many [UNK])
    "xlmr": "xlmr_cross_encoder_dir",  # cross-encoder, Unigram over Metaspace words
    "st": "st_cross_encoder_dir",  # sentence-transformers cross-encoder: longest_first
    "gemma": "gemma_dir",  # BPE with byte fallback, words split at spaces
    "qwen3": "qwen3_dir",  # byte-level BPE, added tokens that are not special (<think>)
    "mxbai": "mxbai_dir",  # byte-level BPE
    "layerwise": "layerwise_dir",  # Llama-style BPE over the whole text as one word
}
DOCUMENT_CHARS = 200_000  # max_document_chars' default
QUERY = "what do giant pandas eat?"

# Text that is hard to cut: whitespace-free runs and long words, CJK, emoji (with joiners, flags and
# skin tones), combining marks, characters byte-level BPE splits into several tokens, spellings of
# special and added tokens, whitespace runs that give no token at all, and words of the vocabularies.
FRAGMENTS = (
    *CORPUS[0].split(),
    *CORPUS[5].split(),
    "x",
    "ab",
    "supercalifragilistic",
    "日本語の文章です",
    "中文",
    "한국어",
    "😀",
    "👩‍👩‍👧",
    "🇫🇷",
    "👍🏽",
    "e\u0301",
    "\u0301\u0302",
    "Å",
    "ﬁ",
    "\u200b",
    "[SEP]",
    "[CLS]",
    "[UNK]",
    "</s>",
    "<s>",
    "<bos>",
    "<|im_end|>",
    "<|endoftext|>",
    "<think>",
    "</think>",
    "<0x41>",
    "▁",
    " ",
    "   ",
    "\n",
    "\t",
    "\r\n",
    "0123456789",
    "!?.,;",
    "'s",
    "'ll",
)
fragment = st.one_of(st.sampled_from(FRAGMENTS), st.text(min_size=1, max_size=6))
repeats = st.one_of(st.just(1), st.integers(2, 40), st.integers(200, 1500))
piece = st.builds(lambda text, times: text * times, fragment, repeats)
separator = st.sampled_from(["", " ", "\n"])


def texts(max_chars: int) -> st.SearchStrategy[str]:
    """Text of up to max_chars characters made of the fragments above, often repeated many times."""
    joined = st.builds(
        lambda sep, parts: sep.join(parts), separator, st.lists(piece, min_size=1, max_size=30)
    )
    return joined.map(lambda text: text[:max_chars])


class WholeText:
    """The cut switched off: every document tokenized whole, as rows were built before it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def leading_ids(self, texts: Sequence[str], count: int) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]


class CountingTokenizer:
    """A tokenizer that records how many characters it was given to tokenize."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.model = tokenizer.model
        self._tokenizer = tokenizer
        self.calls: list[list[int]] = []  # per call, the characters of each text

    def encode_batch_fast(self, texts: list[str], add_special_tokens: bool) -> list[Encoding]:
        self.calls.append([len(text) for text in texts])
        return self._tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)


@dataclass
class Pair:
    """A family's row builder with the cut, and the same builder with it switched off."""

    cut: PairTemplate
    whole: PairTemplate

    def options(
        self, max_length: int, truncation: Truncation, overlap: int = 0, max_chunks: int = 1
    ) -> RowOptions:
        return RowOptions(
            max_length,
            truncation,
            instruction=self.cut.spec.default_instruction,
            chunk_overlap=overlap,
            max_chunks=max_chunks,
        )

    def assert_same_rows(self, query: str, documents: list[str], options: RowOptions, first: int = 0) -> None:
        """Both builders give the same rows, or refuse with the same message."""
        try:
            expected = self.whole.rows(query, documents, options, first)
        except PairTooLongError as error:
            with pytest.raises(PairTooLongError) as refused:
                self.cut.rows(query, documents, options, first)
            assert str(refused.value) == str(error)
            return
        assert_rows_equal(self.cut.rows(query, documents, options, first), expected)


def assert_rows_equal(actual: list[Row], expected: list[Row]) -> None:
    assert [(row.document, row.truncated, dict(row.values)) for row in actual] == [
        (row.document, row.truncated, dict(row.values)) for row in expected
    ]
    for got, want in zip(actual, expected, strict=True):
        assert set(got.tokens) == set(want.tokens)
        for column in want.tokens:
            assert got.tokens[column].tolist() == want.tokens[column].tolist(), column


@pytest.fixture(scope="module", params=list(FAMILY_DIRS))
def pair(request: pytest.FixtureRequest) -> Pair:
    path: Path = request.getfixturevalue(FAMILY_DIRS[request.param])
    spec = describe_model(str(path))
    cut, whole = load_row_builder(spec), load_row_builder(spec)
    assert isinstance(cut, PairTemplate) and isinstance(whole, PairTemplate)
    whole.text_cut = WholeText(whole.tokenizer)  # type: ignore[assignment]
    return Pair(cut, whole)


# --- any text, every family, every truncation -----------------------------------------------------

# Each example tokenizes a few thousand characters: quick, but slower than hypothesis expects.
EXAMPLES = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@EXAMPLES
@given(data=st.data())
def test_rows_of_the_cut_text_are_those_of_the_whole_text(pair: Pair, data: st.DataObject) -> None:
    spec = pair.cut.spec
    low = spec.min_max_length
    max_length = data.draw(st.integers(low, min(low + 64, spec.max_length_limit)), label="max_length")
    truncation = data.draw(st.sampled_from(list(Truncation)), label="truncation")
    overlap = data.draw(st.integers(0, 32), label="overlap")
    max_chunks = data.draw(st.integers(1, 4), label="max_chunks")
    query = data.draw(texts(800), label="query")
    documents = data.draw(st.lists(texts(8000), min_size=1, max_size=3), label="documents")
    options = pair.options(max_length, truncation, overlap, max_chunks)
    pair.assert_same_rows(query, documents, options, first=data.draw(st.integers(0, 5)))


@EXAMPLES
@given(text=texts(6000), data=st.data())
def test_leading_ids_are_the_first_ids_of_the_whole_text(pair: Pair, text: str, data: st.DataObject) -> None:
    whole = pair.cut.tokenizer.encode(text, add_special_tokens=False).ids
    count = data.draw(st.integers(0, len(whole) + 2), label="count")
    assert pair.cut.text_cut.leading_ids([text], count) == [whole[:count]]


# --- the cases named in the issue, always run -----------------------------------------------------

HARD_DOCUMENTS = {
    # a long whitespace-free run right where a prefix ends: WordPiece makes it one [UNK] whole, pieces cut
    "long word at the cut": "a " * 600 + "x" * 5000 + " tail",
    "many long words": " ".join(["y" * 150] * 400),
    "whitespace first": " " * 150_000 + " ".join(CORPUS),
    "CJK": "日本語の文章です。中文和한국어" * 800,
    "emoji": "👩‍👩‍👧🇫🇷👍🏽😀 " * 1500,
    "combining marks": "e\u0301\u0302 a\u0308" * 2000,
    "special token spellings": "[SEP]</s><|im_end|><think>x</think><bos>[UNK] " * 600,
    "prose": " ".join(CORPUS * 40),
}


@pytest.mark.parametrize("truncation", list(Truncation))
def test_hard_documents_give_the_rows_of_the_whole_text(pair: Pair, truncation: Truncation) -> None:
    documents = list(HARD_DOCUMENTS.values())
    for max_length in (pair.cut.spec.min_max_length + 8, pair.cut.spec.default_max_length):
        options = pair.options(max_length, truncation, overlap=16, max_chunks=3)
        if truncation is Truncation.NONE:  # refused at the first document too long: try each alone
            for position, document in enumerate(documents):
                pair.assert_same_rows(QUERY, [document], options, first=position)
        else:
            pair.assert_same_rows(QUERY, documents, options)


def test_a_query_longer_than_the_budget_is_cut_as_beside_the_whole_document(pair: Pair) -> None:
    """longest_first (sentence-transformers cross-encoders) keeps a query's tokens by the document's
    length: the cut document must stay longer than the query too."""
    max_length = pair.cut.spec.min_max_length + 16
    query = " ".join(CORPUS[:12])
    assert len(pair.cut.tokenizer.encode(query, add_special_tokens=False).ids) > max_length
    documents = [" ".join(CORPUS[:n]) for n in (8, 12, 16, 30)] + [" ".join(CORPUS * 20)]
    for truncation in (Truncation.END, Truncation.CHUNK):
        pair.assert_same_rows(query, documents, pair.options(max_length, truncation, overlap=8, max_chunks=3))


# --- the cost is bounded ---------------------------------------------------------------------------


@pytest.mark.parametrize(("truncation", "max_chunks"), [(Truncation.END, 1), (Truncation.CHUNK, 10)])
def test_a_maximal_document_is_tokenized_only_as_far_as_rows_use_it(
    minilm_dir: Path, truncation: Truncation, max_chunks: int
) -> None:
    spec = describe_model(str(minilm_dir))
    builder = load_row_builder(spec)
    assert isinstance(builder, PairTemplate)
    counting = CountingTokenizer(builder.tokenizer)
    builder.text_cut = TextCut(counting)  # type: ignore[arg-type]
    document = " ".join(CORPUS * 400)[:DOCUMENT_CHARS]
    assert len(document) == DOCUMENT_CHARS
    options = RowOptions(spec.default_max_length, truncation, chunk_overlap=64, max_chunks=max_chunks)
    need = builder.document_need(options, query_length=8)
    rows = builder.rows(QUERY, [document], options, 0)
    assert len(rows) == max_chunks and all(row.truncated for row in rows)
    # One prefix of about (need + margin) tokens' worth of characters, not 200,000 characters.
    assert counting.calls == [[(need + 1 + builder.text_cut.margin) * CHARS_PER_TOKEN]]
    assert counting.calls[0][0] < DOCUMENT_CHARS // 10


def test_a_prefix_that_gives_too_few_tokens_doubles_until_it_does(minilm_dir: Path) -> None:
    builder = load_row_builder(describe_model(str(minilm_dir)))
    assert isinstance(builder, PairTemplate)
    counting = CountingTokenizer(builder.tokenizer)
    cut = TextCut(counting)  # type: ignore[arg-type]
    text = " " * 20_000 + " ".join(CORPUS * 40)  # whitespace gives no token at all
    first = (64 + cut.margin) * CHARS_PER_TOKEN
    assert cut.leading_ids([text, "short"], 64) == [
        builder.tokenizer.encode(text, add_special_tokens=False).ids[:64],
        builder.tokenizer.encode("short", add_special_tokens=False).ids,
    ]
    # The short text is done at once; the long one doubles until past its whitespace.
    assert counting.calls[0] == [first, len("short")]
    assert [call[0] for call in counting.calls[1:]] == [first * 2**k for k in range(1, len(counting.calls))]
    assert first * 2 ** (len(counting.calls) - 2) < 20_000 < first * 2 ** (len(counting.calls) - 1)
