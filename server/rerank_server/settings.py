"""Every server setting, in one place.

Precedence: command-line flag > `RERANK_*` environment variable > default.
Built once in `main`; nothing reads settings at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rerank_server.families.base import DEFAULT_MODEL
from rerank_server.workers.stand_in import StandIn


@dataclass(frozen=True)
class ModelChoice:
    """One `--model` value: the name clients use, where the model is, and its family (or auto)."""

    name: str
    source: str
    family: str


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

    model: Annotated[list[str], NoDecode] = Field(
        [DEFAULT_MODEL],
        description="A model to serve, as [NAME=]SOURCE: SOURCE a hub id or local directory, NAME what "
        "clients ask for (default: SOURCE). Repeat the flag (or separate by commas) to serve several; "
        "the first is the default. The default model is a small embedded bi-encoder for trying the "
        "server; production uses a reranker such as BAAI/bge-reranker-v2-m3.",
    )
    family: Annotated[list[str], NoDecode] = Field(
        ["auto"],
        description="Model family: auto reads it from the model's config; a family name forces it. "
        "One value for every model, or one per model in --model's order.",
    )
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = any free port, logged at start).")
    http_port: int = Field(
        8080,
        ge=0,
        le=65535,
        description="HTTP/JSON port of the Cohere- and Jina-compatible rerank API (POST /v1/rerank, "
        "/v2/rerank; GET /v1/models, /health), with the gRPC port's host, TLS and tokens (0 = off).",
    )
    metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus /metrics port (0 = off).")
    metrics_host: str = Field("0.0.0.0", description="Address the metrics port listens on.")
    tls_cert: str = Field(
        "", description="PEM certificate chain of the gRPC port; with --tls-key, the port speaks TLS only."
    )
    tls_key: str = Field("", description="PEM private key of --tls-cert.")
    tls_client_ca: str = Field(
        "",
        description="PEM CA bundle: clients must present a certificate it signed (mutual TLS); needs "
        "--tls-cert.",
    )
    auth_tokens_file: str = Field(
        "",
        description="File of accepted bearer tokens, one per line (reread on SIGHUP); calls without "
        "one get UNAUTHENTICATED. Health checks stay open. Empty = no token needed.",
    )
    max_connection_age_s: float = Field(
        300.0,
        ge=0,
        description="A client connection older than this is asked to reconnect (GOAWAY; its calls in "
        "flight finish first), so balancing clients see replicas added since they resolved their "
        "target. 0 = never.",
    )
    reflection: bool = Field(True, description="Serve gRPC server reflection (--no-reflection turns it off).")
    devices: str = Field(
        "auto",
        description="auto = every visible GPU, else the CPU; cpu; cuda = every visible GPU; "
        "or GPU ids such as 0,1 (one worker process each).",
    )
    cpu_replicas: int = Field(1, ge=1, description="Worker processes when serving on the CPU.")
    threads_per_replica: int = Field(
        0,
        ge=0,
        description="torch threads per CPU worker (0 = the CPUs this process may use, by its affinity "
        "and cgroup quota, / cpu_replicas).",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Weights and activations; auto = the family's usual dtype on a GPU (float16 for "
        "encoders, bfloat16 for LLM rerankers); on the CPU bfloat16 where it has native bfloat16 units "
        "(AMX or AVX512-BF16), else float32. float32 keeps full precision everywhere.",
    )
    max_length: int = Field(
        0, ge=0, description="Default token budget of one pair (0 = the model's own default)."
    )
    max_batch_tokens: int = Field(
        16384, ge=1, description="A batch's padded token count (rows x longest row) stays at or under this."
    )
    max_batch_size: int = Field(128, ge=1, description="Most pairs in one batch.")
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        description="Longest wait for a fuller batch, while the replica it goes to is busy anyway "
        "(an idle replica takes what is queued at once).",
    )
    bulk_batch_ms: float = Field(
        100.0,
        gt=0,
        description="A StreamRerank batch holds about this much work (at the replicas' measured "
        "speed), so an interactive Rerank waits at most about this long behind a stream.",
    )
    max_queued_pairs: int = Field(
        200_000, ge=1, description="Queue bound; past it requests fail at once with RESOURCE_EXHAUSTED."
    )
    max_queued_tokens: int = Field(
        8_000_000,
        ge=1,
        description="Queue bound in tokens (memory); past it a Rerank fails at once with "
        "RESOURCE_EXHAUSTED and a stream waits for room.",
    )
    max_queue_delay_ms: float = Field(
        5000.0,
        ge=0,
        description="A Rerank that would wait longer than this behind the work queued ahead of it (at "
        "the replicas' measured speed) fails at once with RESOURCE_EXHAUSTED (0 = no such limit).",
    )
    max_concurrent_calls: int = Field(
        1024, ge=1, description="Most Rerank calls served at once; past it RESOURCE_EXHAUSTED."
    )
    max_concurrent_streams: int = Field(
        64, ge=1, description="Most StreamRerank calls served at once; past it RESOURCE_EXHAUSTED."
    )
    stream_idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A stream whose client neither sends nor reads for this long is ended "
        "(DEADLINE_EXCEEDED).",
    )
    max_call_s: float = Field(
        3600.0, gt=0, description="Longest any call may run, whatever deadline its client set."
    )
    batch_timeout_factor: float = Field(
        10.0,
        gt=1,
        description="A batch running this many times longer than its size predicts (from recent "
        "batches) marks its worker hung: it is killed and replaced, and the batch runs elsewhere.",
    )
    batch_timeout_floor_s: float = Field(
        10.0, gt=0, description="No batch counts as hung before this many seconds."
    )
    max_documents: int = Field(10_000, ge=1, description="Most documents in one Rerank request.")
    max_query_chars: int = Field(
        20_000, ge=1, description="Most characters in a query (and in an instruction)."
    )
    max_document_chars: int = Field(200_000, ge=1, description="Most characters in one document.")
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
    chunk_overlap: int = Field(
        64, ge=0, description="TRUNCATION_CHUNK: tokens shared by neighbouring windows (at most half one)."
    )
    max_chunks: int = Field(
        10, ge=1, description="TRUNCATION_CHUNK: most windows scored per document; the rest is cut."
    )
    scorer: Literal["model", "null", "simulated"] = Field(
        "model",
        description="model = score with the model. For measuring the server alone: null = workers "
        "return a cheap deterministic score without running the model; simulated = that, after a sleep "
        "of --simulated-us-per-token per padded token of the batch (a device that uses no CPU).",
    )
    simulated_us_per_token: float = Field(
        2.0, ge=0, description="scorer=simulated: microseconds per padded token of a batch."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="json = one JSON object per line (for log collectors); text = for people; auto = "
        "json unless standard error is a terminal.",
    )
    log_request_text: bool = Field(
        False,
        description="Debugging only: put each call's query (and its first documents) in its log line. "
        "Off, no query or document text is ever logged.",
    )
    tracing: bool = Field(
        False,
        description="Export OpenTelemetry spans (per call: tokenize, queue, inference) over OTLP, "
        "configured by the standard OTEL_* variables; needs the tracing extra.",
    )

    @field_validator("model", "family", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """RERANK_MODEL=a,b (and a flag value with commas) means several values."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and any(isinstance(v, str) and "," in v for v in value):
            return [part.strip() for v in value for part in str(v).split(",") if part.strip()]
        return value

    @property
    def max_message_bytes(self) -> int:
        """The largest gRPC message either way: what the server receives, sends, and checks replies
        against."""
        return self.max_message_mb * 1024 * 1024

    def stand_in(self) -> StandIn | None:
        """What the workers run instead of the model, if anything."""
        if self.scorer == "model":
            return None
        return StandIn(self.scorer, self.simulated_us_per_token)

    def models(self) -> list[ModelChoice]:
        """The models to serve, in order; raises ValueError for settings that cannot be met."""
        if not self.model:
            raise ValueError("no model to serve: give --model at least once")
        if len(self.family) not in (1, len(self.model)):
            raise ValueError(
                f"{len(self.family)} families for {len(self.model)} models: give one family for all "
                "models, or one per model"
            )
        families = self.family * len(self.model) if len(self.family) == 1 else self.family
        choices = []
        for value, family in zip(self.model, families, strict=True):
            name, equals, source = value.partition("=")
            if not equals:
                name = source = value
            if not name or not source:
                raise ValueError(f"--model {value!r}: expected [NAME=]SOURCE")
            choices.append(ModelChoice(name, source, family))
        names = [choice.name for choice in choices]
        if len(set(names)) != len(names):
            raise ValueError(f"served model names repeat: {names}")
        return choices

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> ServerSettings:
        """Settings from the environment, overridden by command-line flags (None = sys.argv)."""
        return cls(_cli_parse_args=list(argv) if argv is not None else True)  # type: ignore[call-arg]
