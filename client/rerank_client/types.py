"""Typed options and results of the client: what a rerank call takes and returns (not protobuf)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Truncation(str, enum.Enum):
    """What the server does with a (query, document) pair longer than max_length."""

    END = "end"  # cut the pair to fit (query to 3/4 of max_length, then the document)
    NONE = "none"  # refuse the request with INVALID_ARGUMENT
    CHUNK = "chunk"  # score overlapping windows of the document; it gets its best window's score


@dataclass(frozen=True)
class RankedDocument:
    index: int
    score: float
    document: str | None = None


@dataclass(frozen=True)
class Usage:
    documents: int = 0
    tokens: int = 0
    truncated: int = 0
    chunked: int = 0  # documents split into windows (Truncation.CHUNK)
    windows: int = 0  # rows the model scored: one per document, one per window of a chunked one


@dataclass(frozen=True)
class Timings:
    tokenize_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class RerankResult:
    results: list[RankedDocument]
    model: str
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    max_length: int
    max_length_limit: int
    dtype: str
    devices: list[str]
    replicas: int
    ready_replicas: int
    ready: bool
    takes_instruction: bool = False  # whether rerank's `instruction` is accepted
    default_instruction: str = ""  # the instruction used when `instruction` is empty
    min_cutoff_layer: int = 0  # layerwise models: the range of `cutoff_layer` (both 0 for others)
    max_cutoff_layer: int = 0
