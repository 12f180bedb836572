"""The server's own request type; results use the shared types of `rerank_client.types`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RerankQuery:
    """A rerank request as the data plane sees it (no protobuf past the edge)."""

    query: str
    documents: list[str] = field(default_factory=list)
    model: str = ""
    top_n: int = 0  # 0 = all
    return_documents: bool = False
    raw_scores: bool = False
    max_length: int = 0  # 0 = the server's default
    truncate: bool = True  # False: a pair that does not fit is an error
