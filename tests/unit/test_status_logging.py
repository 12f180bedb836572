"""An unexpected error is logged with where it happened, never with its text (it may quote a request)."""

from __future__ import annotations

import logging

import grpc
import pytest
from rerank_server.edge.status import status_of

MARKER = "query-text-7c1f"


def fail_with_request_text() -> None:
    raise KeyError(f"no entry for {MARKER}")


def test_an_unexpected_error_logs_its_type_and_traceback_but_not_its_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        fail_with_request_text()
    except KeyError as exc:
        with caplog.at_level(logging.DEBUG):
            code, message = status_of(exc)
    assert code == grpc.StatusCode.INTERNAL
    assert MARKER in message  # the caller, who sent the text, still reads what went wrong
    assert "unexpected error KeyError" in caplog.text
    assert "fail_with_request_text" in caplog.text
    assert MARKER not in caplog.text
