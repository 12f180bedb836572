"""The server's own request and result types: the edges convert protobuf (or HTTP) to and from these.

They mirror the client's types field for field (a test checks both against the proto), but are the
server's own, so a change here is not an SDK change.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Truncation(enum.Enum):
    """What happens to a (query, document) pair longer than max_length."""

    END = "end"  # cut the pair as the family's recipe does
    NONE = "none"  # refuse the request
    CHUNK = "chunk"  # score overlapping windows of the document; its score is the best window's


@dataclass(frozen=True)
class RerankQuery:
    """A rerank request as the data plane sees it (no protobuf past the edge)."""

    query: str
    documents: list[str] = field(default_factory=list)
    model: str = ""
    top_n: int = 0  # 0 = all
    return_documents: bool = False
    raw_scores: bool = False
    max_length: int = 0  # 0 = the model's default
    truncation: Truncation = Truncation.END
    instruction: str = ""  # "" = the model's default, for families that take one
    cutoff_layer: int = 0  # 0 = the model's default, for layerwise families


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
    chunked: int = 0
    windows: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.documents + other.documents,
            self.tokens + other.tokens,
            self.truncated + other.truncated,
            self.chunked + other.chunked,
            self.windows + other.windows,
        )


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
    takes_instruction: bool = False
    default_instruction: str = ""
    min_cutoff_layer: int = 0
    max_cutoff_layer: int = 0
