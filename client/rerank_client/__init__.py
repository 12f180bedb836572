"""Typed Python client of the rerank server: needs only grpcio and protobuf.

Usage: `with RerankerClient("localhost:50051") as client: client.rerank(query, documents, top_n=3)`;
AsyncRerankerClient is the same for asyncio. A target naming several servers ("dns:///name:port",
"ipv4:a:port,b:port") balances calls across those SERVING. Failed calls raise RerankError
subclasses. A secured server takes `credentials=tls_credentials(...)` and `token=...`.
"""

from rerank_client.aio import AsyncRerankerClient
from rerank_client.client import RerankerClient
from rerank_client.credentials import tls_credentials
from rerank_client.errors import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    RerankError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)
from rerank_client.retry import RetryPolicy
from rerank_client.types import ModelInfo, RankedDocument, RerankResult, Timings, Truncation, Usage

__all__ = [
    "AsyncRerankerClient",
    "CancelledError",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "RankedDocument",
    "RerankError",
    "RerankResult",
    "RerankerClient",
    "ResourceExhaustedError",
    "RetryPolicy",
    "Timings",
    "Truncation",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
    "from_rpc_error",
    "tls_credentials",
]
