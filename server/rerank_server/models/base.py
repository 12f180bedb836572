"""The contract every model family implements, split by the process it runs in.

The front-end holds a `PairEncoder` (tokenizer only, no torch): it turns a
query and its documents into one token row per pair. A worker holds a
`PairScorer` (the weights): it scores a right-padded batch of such rows. The
two halves of one family agree on the row layout; nothing else looks inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np
    import numpy.typing as npt


# Served when no model is named: small, and shipped inside a package, so it needs no network.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class ModelSpec:
    """What the server knows of a model before loading its weights; picklable for workers."""

    source: str  # hub id or local directory, as from_pretrained takes it
    family: str  # "cross-encoder" or "bi-encoder"
    default_max_length: int
    max_length_limit: int  # the most a request may ask for (position embeddings)
    min_max_length: int  # the least max_length that leaves room for text

    def row_length(self, max_length: int) -> int:
        """The longest token row a pair may become under max_length (a batch must hold one)."""
        # A bi-encoder row carries the query and the document, each up to max_length.
        return 2 * max_length if self.family == "bi-encoder" else max_length


@dataclass(frozen=True)
class EncodedPair:
    """One (query, document) pair as a token row; both lists have the same length."""

    input_ids: list[int]
    token_type_ids: list[int]
    truncated: bool


class PairTooLongError(ValueError):
    """A pair does not fit max_length and truncation was refused."""

    def __init__(self, index: int, tokens: int, max_length: int) -> None:
        super().__init__(
            f"document {index} needs {tokens} tokens with the query, more than max_length {max_length}"
        )
        self.index = index
        self.tokens = tokens
        self.max_length = max_length


class PairEncoder(Protocol):
    spec: ModelSpec
    pad_token_id: int

    def encode(
        self, query: str, documents: Sequence[str], *, max_length: int, truncate: bool, first_index: int = 0
    ) -> list[EncodedPair]:
        """Tokenize every pair; raise PairTooLongError (index = first_index + position) if one does
        not fit and truncate is False."""
        ...

    def normalize(self, raw: float) -> float:
        """Map a raw score into [0, 1]."""
        ...


class PairScorer(Protocol):
    def score(
        self,
        input_ids: npt.NDArray[np.int32],
        attention_mask: npt.NDArray[np.int8],
        token_type_ids: npt.NDArray[np.int8],
    ) -> npt.NDArray[np.float32]:
        """Raw scores of a right-padded batch of rows (shape [rows, cols]) -> shape [rows]."""
        ...
