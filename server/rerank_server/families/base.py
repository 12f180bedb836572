"""The contract every model family implements, split by the process it runs in.

A family is one module that registers a `Family`: it tells a checkpoint of its own from its config,
describes it (`ModelSpec`, before any weights load), builds token rows in the front-end (`RowBuilder`,
tokenizer only, no torch) and scores batches of rows in a worker (`Scorer`, the weights). A row names
the document it scores and carries the named int32 token arrays the family needs; a document may
become several rows (chunking), whose raw scores the service combines by their maximum.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from rerank_server.types import Truncation

# Served when no model is named: small, and shipped inside a package, so it needs no network.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

IntArray = npt.NDArray[np.int32]
ScoreArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ModelSpec:
    """What the server knows of a model before loading its weights; picklable for workers."""

    source: str  # hub id or local directory, as from_pretrained takes it
    family: str  # a registered family's name
    default_max_length: int
    max_length_limit: int  # the most a request may ask for (position embeddings)
    min_max_length: int  # the least max_length that leaves room for text
    pad_token_id: int
    # Tokens a row may hold beyond max_length (LLM prompts), and per max_length token (a bi-encoder
    # row holds the query and the document, each up to max_length): the longest row is
    # row_factor * max_length + row_overhead.
    row_overhead: int = 0
    row_factor: int = 1
    token_columns: tuple[str, ...] = ()  # per-token int32 columns a row carries beyond input_ids
    row_values: Mapping[str, int] = field(default_factory=dict)  # per-row int32 values, with defaults
    default_instruction: str | None = None  # None: the family takes no instruction
    cutoff_layers: tuple[int, int] | None = None  # layerwise families: the cutoff layer range
    options: Mapping[str, Any] = field(default_factory=dict)  # the family's own (token ids, prompts)

    def row_length(self, max_length: int) -> int:
        """The longest token row one document may become under max_length (a batch must hold one)."""
        return self.row_factor * max_length + self.row_overhead


@dataclass(frozen=True)
class RowOptions:
    """A request's options that shape its rows, resolved against the model's defaults."""

    max_length: int
    truncation: Truncation = Truncation.END
    instruction: str | None = None
    cutoff_layer: int = 0
    chunk_overlap: int = 0
    max_chunks: int = 1


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence the model scores, for one document (a chunked document has several)."""

    document: int  # the document's index in its request (in the whole stream for StreamRerank)
    tokens: Mapping[str, IntArray]  # "input_ids" and the spec's token_columns, all of one length
    values: Mapping[str, int] = field(default_factory=dict)  # the spec's row_values
    truncated: bool = False  # the document (or the query) lost tokens to fit

    @property
    def length(self) -> int:
        return len(self.tokens["input_ids"])


@dataclass(frozen=True)
class TokenBatch:
    """Rows packed end to end, as they travel through shared memory; scorers pad them as they need."""

    lengths: IntArray  # [rows]
    tokens: Mapping[str, IntArray]  # per token column, [sum(lengths)]
    values: Mapping[str, IntArray]  # per row value, [rows]

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return int(self.lengths.max(initial=0))

    def mask(self) -> npt.NDArray[np.bool_]:
        """[rows, width]: True on each row's real tokens, which come first (right padding)."""
        return np.arange(self.width)[None, :] < self.lengths[:, None]

    def padded(self, column: str, pad: int) -> npt.NDArray[np.int64]:
        """A token column as a right-padded [rows, width] array."""
        out = np.full((self.rows, self.width), pad, dtype=np.int64)
        out[self.mask()] = self.tokens[column]
        return out


def pack_rows(rows: Sequence[Row], spec: ModelSpec) -> TokenBatch:
    """The batch a worker receives for these rows."""
    return TokenBatch(
        lengths=np.fromiter((row.length for row in rows), dtype=np.int32, count=len(rows)),
        tokens={
            name: np.concatenate([row.tokens[name] for row in rows]).astype(np.int32, copy=False)
            for name in ("input_ids", *spec.token_columns)
        },
        values={
            name: np.fromiter((row.values[name] for row in rows), dtype=np.int32, count=len(rows))
            for name in spec.row_values
        },
    )


class PairTooLongError(ValueError):
    """A pair does not fit max_length and truncation was refused."""


class RowBuilder(Protocol):
    """The front-end half of a family: tokenizer only."""

    spec: ModelSpec

    def rows(
        self, query: str, documents: Sequence[str], options: RowOptions, first_document: int
    ) -> list[Row]:
        """Rows for the documents, numbered from first_document; raises PairTooLongError when a
        pair does not fit and options.truncation is NONE."""
        ...

    def normalize(self, raw: ScoreArray) -> ScoreArray:
        """Raw scores mapped into [0, 1], as the family's reference normalizes them."""
        ...


class Scorer(Protocol):
    """The worker half of a family: the weights."""

    def score(self, batch: TokenBatch) -> ScoreArray:
        """Raw scores, one per row."""
        ...


@dataclass(frozen=True)
class ModelFiles:
    """What detection reads: the resolved source and its config.json."""

    source: str
    config: Mapping[str, Any]

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def name(self) -> str:
        """The model's name as the checkpoint or its location gives it, lower-cased."""
        return f"{self.config.get('_name_or_path') or ''} {self.source}".lower()


@dataclass(frozen=True)
class Family:
    """One registered family: how to tell, describe, tokenize for and score a model of it."""

    name: str
    detect: Callable[[ModelFiles], bool]
    describe: Callable[[ModelFiles], ModelSpec]
    row_builder: Callable[[ModelSpec], RowBuilder]
    scorer: Callable[[ModelSpec, str, str], Scorer]  # (spec, torch device, dtype); imports torch
    gpu_dtype: str  # what dtype "auto" means on a GPU
    names: tuple[str, ...] = ()  # lower-case name parts that tell the family when the config cannot


def sigmoid(raw: ScoreArray) -> ScoreArray:
    """1 / (1 + e^-x) without overflow warnings for large |x|."""
    x = np.asarray(raw, dtype=np.float64)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    odds = np.exp(x[~positive])
    out[~positive] = odds / (1.0 + odds)
    return out.astype(np.float32)
