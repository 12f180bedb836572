"""Log formats (JSON for collectors, text for people), the request id, and the call's log record."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from datetime import datetime

import pytest
from rerank_server.logs import (
    LOGGED_CHARS,
    LOGGED_DOCUMENTS,
    MAX_REQUEST_ID_CHARS,
    CallRecord,
    log_formatter,
    request_id,
    resolve_log_format,
)


def record(message: str = "replica %s ready", *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("rerank_server.workers.pool", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def failed_record() -> logging.LogRecord:
    try:
        raise KeyError("lost")
    except KeyError:
        made = logging.LogRecord(
            "rerank_server", logging.ERROR, __file__, 1, "batch %d failed", (7,), sys.exc_info()
        )
    return made


def test_json_is_one_object_per_line_with_time_level_logger_message_and_the_extra_fields() -> None:
    line = log_formatter("json").format(record("replica %s ready", "m0/1", documents=3, model="m"))
    assert "\n" not in line
    fields = json.loads(line)
    assert list(fields)[:4] == ["time", "level", "logger", "message"]
    assert fields["level"] == "INFO"
    assert fields["logger"] == "rerank_server.workers.pool"
    assert fields["message"] == "replica m0/1 ready"
    assert fields["documents"] == 3 and fields["model"] == "m"
    assert datetime.fromisoformat(fields["time"]).utcoffset() is not None  # ISO 8601, with its zone
    assert set(fields) == {"time", "level", "logger", "message", "documents", "model"}


def test_json_keeps_a_traceback_inside_its_one_line() -> None:
    line = log_formatter("json").format(failed_record())
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["level"] == "ERROR" and fields["message"] == "batch 7 failed"
    assert "Traceback" in fields["exc_info"] and "KeyError" in fields["exc_info"]


def test_text_reads_as_before_with_the_extra_fields_as_key_value() -> None:
    text = log_formatter("text")
    line = text.format(record("replica %s ready", "m0/1", documents=3, peer="ipv4:1.2.3.4:5"))
    assert line.endswith(
        " rerank_server.workers.pool INFO replica m0/1 ready documents=3 peer=ipv4:1.2.3.4:5"
    )
    assert text.format(record("stopped")).endswith(" rerank_server.workers.pool INFO stopped")


def test_text_quotes_what_would_break_a_key_value_line() -> None:
    line = log_formatter("text").format(
        record("call", query='what "pandas" eat\nnow', model="", first_documents=["a b"])
    )
    assert "\nnow" not in line
    assert r'query="what \"pandas\" eat\nnow"' in line
    assert 'model=""' in line
    assert 'first_documents=["a b"]' in line


def test_text_puts_a_traceback_after_the_line() -> None:
    lines = log_formatter("text").format(failed_record()).splitlines()
    assert lines[0].endswith(" rerank_server ERROR batch 7 failed")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "KeyError: 'lost'"


def test_a_worker_names_its_replica_in_either_format() -> None:
    fields = json.loads(log_formatter("json", replica="m0/1").format(record("ready")))
    assert fields["replica"] == "m0/1"
    assert " worker-m0/1 INFO ready" in log_formatter("text", replica="m0/1").format(record("ready"))


class Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize(
    ("setting", "terminal", "resolved"),
    [("auto", True, "text"), ("auto", False, "json"), ("json", True, "json"), ("text", False, "text")],
)
def test_auto_is_text_on_a_terminal_and_json_elsewhere(setting: str, terminal: bool, resolved: str) -> None:
    assert resolve_log_format(setting, Stream(terminal)) == resolved


def test_configured_logging_writes_every_record_and_warning_as_json_to_stderr() -> None:
    script = (
        "import logging, warnings\n"
        "from rerank_server.logs import configure_logging\n"
        "configure_logging('INFO', 'json')\n"
        "logging.getLogger('rerank_server').debug('hidden')\n"
        "logging.getLogger('rerank_server').info('shown', extra={'documents': 2})\n"
        "warnings.warn('careful')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["level"], line["logger"]) for line in lines] == [
        ("INFO", "rerank_server"),
        ("WARNING", "py.warnings"),
    ]
    assert lines[0]["documents"] == 2 and "careful" in lines[1]["message"]


@pytest.mark.parametrize("sent", ["abc-123", "req_9.Z/x:y", "!" * MAX_REQUEST_ID_CHARS, "0f" * 16], ids=repr)
def test_a_sane_request_id_is_kept(sent: str) -> None:
    assert request_id(sent) == sent


@pytest.mark.parametrize(
    "sent",
    [None, "", "has space", "tab\there", "new\nline", "ünïcode", "\x00nul", "x" * (MAX_REQUEST_ID_CHARS + 1)],
    ids=repr,
)
def test_a_missing_or_odd_request_id_is_replaced_by_a_fresh_one(sent: str | None) -> None:
    first, second = request_id(sent), request_id(sent)
    assert first != second
    for made in (first, second):
        assert len(made) == 32 and int(made, 16) >= 0


def call(**facts: object) -> CallRecord:
    return CallRecord("Rerank", "req-1", "ipv4:127.0.0.1:5000", **facts)  # type: ignore[arg-type]


def test_a_calls_record_holds_its_facts_and_no_text() -> None:
    fields = call(model="m", documents=3, tokens=40, tokenize_ms=1.23456, total_ms=9.87654).fields()
    assert fields == {
        "method": "Rerank",
        "request_id": "req-1",
        "peer": "ipv4:127.0.0.1:5000",
        "model": "m",
        "code": "OK",
        "documents": 3,
        "tokens": 40,
        "tokenize_ms": 1.235,
        "queue_ms": 0.0,
        "inference_ms": 0.0,
        "total_ms": 9.877,
    }
    assert call(trace_id="ab" * 16).fields()["trace_id"] == "ab" * 16


def test_kept_text_is_the_query_and_the_first_documents_cut_short() -> None:
    documents = [f"document {i} " + "x" * 1000 for i in range(10)]
    record = call()
    record.keep_text("q" * 1000, documents)
    fields = record.fields()
    assert fields["query"] == "q" * LOGGED_CHARS
    assert fields["first_documents"] == [d[:LOGGED_CHARS] for d in documents[:LOGGED_DOCUMENTS]]


def test_a_call_logs_one_info_line_on_the_calls_logger(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="rerank_server.calls"):
        call(code="INVALID_ARGUMENT", documents=2).log()
    [logged] = caplog.records
    assert (logged.name, logged.levelno) == ("rerank_server.calls", logging.INFO)
    fields = json.loads(log_formatter("json").format(logged))
    assert fields["code"] == "INVALID_ARGUMENT" and fields["request_id"] == "req-1"
    assert "query" not in fields and "first_documents" not in fields
