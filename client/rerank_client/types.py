"""Typed results shared by the client and the server: what a rerank call returns."""

from __future__ import annotations

from dataclasses import dataclass, field


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
