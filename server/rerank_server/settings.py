"""Every server setting, in one place.

Precedence: command-line flag > `RERANK_*` environment variable > default.
Built once in `main`; nothing reads settings at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from rerank_server.models.base import DEFAULT_MODEL


class ServerSettings(BaseSettings):
    """rerank-server: serve a reranker over gRPC (Rerank, StreamRerank, ListModels, health, reflection)."""

    model_config = SettingsConfigDict(
        env_prefix="RERANK_",
        cli_prog_name="rerank-server",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_avoid_json=True,
        extra="ignore",
    )

    model: str = Field(
        DEFAULT_MODEL,
        description="Hub id or local directory of the model. The default is a small embedded bi-encoder "
        "for trying the server; production uses a cross-encoder such as BAAI/bge-reranker-v2-m3.",
    )
    model_name: str = Field("", description="Name clients use for the model; empty = the model setting.")
    family: Literal["auto", "cross-encoder", "bi-encoder"] = Field(
        "auto", description="Model family; auto reads it from the model's config."
    )
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = any free port, logged at start).")
    metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus /metrics port (0 = off).")
    devices: str = Field(
        "auto",
        description="auto = every visible GPU, else the CPU; cpu; cuda = every visible GPU; "
        "or GPU ids such as 0,1 (one worker process each).",
    )
    cpu_replicas: int = Field(1, ge=1, description="Worker processes when serving on the CPU.")
    threads_per_replica: int = Field(
        0, ge=0, description="torch threads per CPU worker (0 = CPU cores / cpu_replicas)."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights and activations; auto = float16 on a GPU, float32 on the CPU."
    )
    max_length: int = Field(
        0, ge=0, description="Default token budget of one pair (0 = the model's own default)."
    )
    max_batch_tokens: int = Field(
        16384, ge=1, description="A batch's padded token count (rows x longest row) stays at or under this."
    )
    max_batch_size: int = Field(128, ge=1, description="Most pairs in one batch.")
    max_wait_ms: float = Field(2.0, ge=0, description="Longest wait for a fuller batch.")
    max_queued_pairs: int = Field(
        200_000, ge=1, description="Queue bound; past it requests fail at once with RESOURCE_EXHAUSTED."
    )
    max_documents: int = Field(10_000, ge=1, description="Most documents in one Rerank request.")
    stream_window: int = Field(
        4096, ge=1, description="Documents of one StreamRerank in flight before the server stops reading."
    )
    max_stream_top_n: int = Field(10_000, ge=1, description="Largest top_n a StreamRerank may ask for.")
    max_message_mb: int = Field(64, ge=1, description="Largest gRPC message, in MiB.")
    tokenizer_threads: int = Field(2, ge=1, description="Threads that tokenize off the event loop.")
    grace_period_s: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT, how long calls in flight may take to finish."
    )
    restart_backoff_s: float = Field(
        1.0, ge=0, description="First wait before restarting a dead worker (doubles, up to 30 s)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    @property
    def served_name(self) -> str:
        return self.model_name or self.model

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> ServerSettings:
        """Settings from the environment, overridden by command-line flags (None = sys.argv)."""
        return cls(_cli_parse_args=list(argv) if argv is not None else True)  # type: ignore[call-arg]
