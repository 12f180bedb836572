"""The row recipe every family shares: cut the query, fit or cut or chunk each document, assemble.

A family says how it tokenizes the query and the documents, how many query tokens it keeps, how
many document tokens fit beside a query, and how a row is laid out; `PairTemplate.rows` applies the
request's truncation the same way for all of them:
- END cuts as the family's reference does;
- NONE refuses any pair the reference would cut (query or document);
- CHUNK keeps the query as END does and splits a document that does not fit into windows of the
  room beside the query, overlapping by `chunk_overlap` tokens (at most half a window), at most
  `max_chunks` of them; the document's score is its best window's.

Rows never use more of a document than `document_need` tokens, so documents are tokenized only as
far as that (`TextCut`), not whole: a 200,000-character document costs what its rows keep.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from rerank_server.families.base import IntArray, ModelSpec, PairTooLongError, Row, RowOptions, ScoreArray
from rerank_server.families.loading import load_tokenizer
from rerank_server.families.text_cut import TextCut
from rerank_server.types import Truncation

QUERY_CACHE_SIZE = 64  # queries whose token ids a row builder keeps (at most about 10 MB)


class PairTemplate(ABC):
    """Base of the families' row builders."""

    document_prefix = ""  # text the reference puts before each document ("B: ", "document: ")

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.tokenizer: Tokenizer = load_tokenizer(spec.source)[0]
        # A stream builds rows part by part, and clients repeat queries: each is tokenized once.
        # The cached lists are shared, so nothing may change them.
        self._cached_query_ids = functools.lru_cache(maxsize=QUERY_CACHE_SIZE)(self.query_ids)
        self.text_cut = TextCut(self.tokenizer)  # tokenizes documents only as far as rows use them

    def ids(self, text: str) -> list[int]:
        """User text as token ids, without special tokens (and never parsing any)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def query_ids(self, query: str, options: RowOptions) -> list[int]:
        """The query part of a row as the reference tokenizes it, before any cut."""
        return self.ids(query)

    @abstractmethod
    def query_limit(self, max_length: int, query_length: int, document_length: int) -> int:
        """The most query tokens the reference keeps beside a document of document_length tokens."""

    def document_need(self, options: RowOptions, query_length: int) -> int:
        """How many document tokens the rows can depend on: a document's rows depend only on its
        first `need` tokens and on whether it has more.

        No family leaves a document more room than max_length, and windows grow with the room, so
        the most tokens a row reaches is max_length, or CHUNK's max_chunks windows of max_length.
        """
        if options.truncation is not Truncation.CHUNK:
            return options.max_length
        return chunk_reach(options.max_length, options.chunk_overlap, options.max_chunks)

    def document_ids(self, documents: Sequence[str], count: int) -> list[list[int]]:
        """The document part of each row as the reference tokenizes it, up to its first `count` tokens."""
        return self.text_cut.leading_ids([self.document_prefix + document for document in documents], count)

    def document_length(self, document: str) -> int:
        """The document part's whole length in tokens (to tell a refused document's need)."""
        return len(self.ids(self.document_prefix + document))

    @abstractmethod
    def room(self, query_ids: list[int], max_length: int) -> int:
        """How many document tokens fit beside this (already cut) query."""

    @abstractmethod
    def assemble(self, query_ids: list[int], document_ids: list[int]) -> dict[str, IntArray]:
        """The row's token columns."""

    @abstractmethod
    def normalize(self, raw: ScoreArray) -> ScoreArray: ...

    def rows(
        self, query: str, documents: Sequence[str], options: RowOptions, first_document: int
    ) -> list[Row]:
        max_length = options.max_length
        full_query = self._cached_query_ids(query, options)
        values = {name: getattr(options, name) for name in self.spec.row_values}
        rows: list[Row] = []
        need = self.document_need(options, len(full_query))
        # A document with more than `need` tokens comes as its first need + 1 of them: every length
        # past need gives the same rows, so that length stands in for its own.
        for position, document_ids in enumerate(self.document_ids(documents, need + 1)):
            document = first_document + position
            limit = self.query_limit(max_length, len(full_query), len(document_ids))
            query_cut = len(full_query) > limit
            if query_cut and options.truncation is Truncation.NONE:
                raise PairTooLongError(
                    f"the query needs {len(full_query)} tokens; this model keeps {limit} of it at "
                    f"max_length {max_length}"
                )
            query_ids = full_query[:limit]
            room = max(0, self.room(query_ids, max_length))
            if len(document_ids) <= room:
                spans = [(0, len(document_ids))]
            elif options.truncation is Truncation.NONE:
                # Only a refused document is counted whole, to say what it needs: one per call.
                cut = len(document_ids) > need
                length = self.document_length(documents[position]) if cut else len(document_ids)
                raise PairTooLongError(
                    f"document {document} needs {length} tokens; {room} fit beside the query "
                    f"at max_length {max_length}"
                )
            elif options.truncation is Truncation.CHUNK:
                if room < 1:
                    raise PairTooLongError(
                        f"the query leaves no room for document windows at max_length {max_length}"
                    )
                spans = chunk_spans(len(document_ids), room, options.chunk_overlap, options.max_chunks)
            else:
                spans = [(0, room)]
            truncated = query_cut or spans[-1][1] < len(document_ids)
            rows.extend(
                Row(document, self.assemble(query_ids, document_ids[start:end]), values, truncated)
                for start, end in spans
            )
        return rows


def chunk_spans(length: int, window: int, overlap: int, max_chunks: int) -> list[tuple[int, int]]:
    """[start, end) token spans of the windows a document of `length` tokens is split into.

    Windows of `window` tokens start every `window - overlap` tokens (the overlap is at most half a
    window) until one reaches the end; at most `max_chunks` of them, so the tail of a very long
    document may go unscored.
    """
    stride = _stride(window, overlap)
    spans: list[tuple[int, int]] = []
    start = 0
    while len(spans) < max_chunks:
        spans.append((start, min(start + window, length)))
        if start + window >= length:
            break
        start += stride
    return spans


def chunk_reach(window: int, overlap: int, max_chunks: int) -> int:
    """How far into a document `max_chunks` windows reach (never less for a larger window)."""
    return (max_chunks - 1) * _stride(window, overlap) + window


def _stride(window: int, overlap: int) -> int:
    """Tokens between the starts of neighbouring windows: the overlap is at most half a window."""
    return window - min(overlap, window // 2)


def as_ids(values: Sequence[int]) -> IntArray:
    return np.asarray(values, dtype=np.int32)
