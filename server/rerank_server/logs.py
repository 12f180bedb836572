"""Where logs go and how they look (JSON for collectors, text for people), and the one line each call
writes.

Both formats carry a record's extra fields (`log.info(..., extra={...})`): JSON as keys of its object,
text as `key=value` after the message. The front-end and its workers log in the same format, to
standard error.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["json", "text"]

CALL_LOG = logging.getLogger("rerank_server.calls")
# The metadata key a caller names its call by; the server returns it under the same key.
REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
# With log_request_text on: the documents a call's line carries, and the characters of each text.
LOGGED_DOCUMENTS = 3
LOGGED_CHARS = 200

_TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_STANDARD_ATTRIBUTES = frozenset(RESERVED_ATTRS) | {"taskName"}


def resolve_log_format(log_format: str, stream: TextIO) -> LogFormat:
    """`auto` is text on a terminal (a person reads it) and JSON elsewhere (a collector does)."""
    if log_format == "auto":
        return "text" if stream.isatty() else "json"
    if log_format not in ("json", "text"):
        raise ValueError(f"unknown log format {log_format!r}: auto, json or text")
    return "json" if log_format == "json" else "text"


def configure_logging(level: str, log_format: LogFormat, *, replica: str | None = None) -> None:
    """Send every log record (Python warnings too) to standard error in `log_format`; in a worker
    process, `replica` names it on each line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(log_format, replica=replica))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)


def log_formatter(log_format: LogFormat, *, replica: str | None = None) -> logging.Formatter:
    if log_format == "json":
        return _JsonLogFormatter(static_fields={"replica": replica} if replica else None)
    if replica:
        return _TextLogFormatter(f"%(asctime)s worker-{replica} %(levelname)s %(message)s")
    return _TextLogFormatter(_TEXT_FORMAT)


class _JsonLogFormatter(JsonFormatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then the extra fields
    (and exc_info, a traceback, where there is one)."""

    def __init__(self, static_fields: dict[str, Any] | None = None) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields=static_fields,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        super().add_fields(log_data, record, message_dict)


class _TextLogFormatter(logging.Formatter):
    """The standard layout, then the record's extra fields as key=value (texts quoted)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{key}={_text_value(value)}" for key, value in extra_fields(record).items())
        line = super().formatMessage(record)
        return f"{line} {extras}" if extras else line


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What `extra=` added to a record (names starting with _ are private)."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")
    }


def _text_value(value: object) -> str:
    if isinstance(value, str) and value and value.isprintable() and not any(c in value for c in ' "='):
        return value
    if isinstance(value, int | float | bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def request_id(sent: str | None) -> str:
    """The caller's request id when it is printable ASCII without spaces and at most
    MAX_REQUEST_ID_CHARS long (it goes into log lines and spans as it is); otherwise a new one."""
    if sent and len(sent) <= MAX_REQUEST_ID_CHARS and all("!" <= c <= "~" for c in sent):
        return sent
    return uuid.uuid4().hex


@dataclass
class CallRecord:
    """What one call's log line says: no query or document text unless the server was told to log
    it (then `query` and `first_documents`, cut to LOGGED_CHARS)."""

    method: str
    request_id: str
    peer: str
    model: str = ""  # the served model; "" when the call failed before one was known
    code: str = "OK"
    documents: int = 0  # the request's (a failed stream: those received)
    tokens: int = 0  # 0 when the call failed: what it had tokenized is not known here
    tokenize_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0
    trace_id: str = ""  # with tracing on
    query: str | None = None
    first_documents: list[str] | None = None

    def keep_text(self, query: str, documents: list[str]) -> None:
        self.query = query[:LOGGED_CHARS]
        self.first_documents = [document[:LOGGED_CHARS] for document in documents[:LOGGED_DOCUMENTS]]

    def fields(self) -> dict[str, Any]:
        """The record as log fields: times rounded to microseconds; no trace id without tracing, no
        text unless kept."""
        fields = dict(vars(self))  # not asdict(): that deep-copies, at a cost per call
        for name in ("tokenize_ms", "queue_ms", "inference_ms", "total_ms"):
            fields[name] = round(fields[name], 3)
        if not self.trace_id:
            del fields["trace_id"]
        if self.query is None:
            del fields["query"], fields["first_documents"]
        return fields

    def log(self) -> None:
        CALL_LOG.info("call", extra=self.fields())
