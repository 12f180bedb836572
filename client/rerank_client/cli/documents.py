"""The documents of a text input, read lazily: one per line, or JSON lines with a "text" field."""

from __future__ import annotations

import bisect
import io
import json
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

#: An input over either limit goes through StreamRerank rather than one Rerank call.
ONE_CALL_DOCUMENTS = 1_000
ONE_CALL_MIB = 8
ONE_CALL_CHARS = ONE_CALL_MIB * 2**20


class InputError(Exception):
    """The documents cannot be read (exit 3)."""


class DocumentReader:
    """The documents of a text input, read lazily: one per line, or JSON lines with a "text" field.

    `input_format` "auto" decides at the first non-blank line: a JSON object with a "text" string
    means JSON lines. Blank (whitespace-only) lines are skipped; input_index() maps a document's
    position among those read to its line's 0-based position in the input. Iterate it once.
    """

    def __init__(self, lines: Iterable[str], input_format: str = "auto") -> None:
        self._lines = lines
        self.input_format = input_format
        self._documents = 0  # read so far
        # For each blank line, how many documents came before it: kept sorted, one int per blank line.
        self._blanks_after: list[int] = []

    def __iter__(self) -> Iterator[str]:
        number = 0
        lines = iter(self._lines)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise InputError(f"the input is not UTF-8 text (after line {number})") from None
            number += 1
            line = line.rstrip("\r\n")
            if not line.strip():
                self._blanks_after.append(self._documents)
                continue
            if self.input_format == "auto":
                self.input_format = "jsonl" if _is_json_document(line) else "lines"
            text = line if self.input_format == "lines" else _json_document(line, number)
            self._documents += 1
            yield text

    def input_index(self, document_index: int) -> int:
        """The 0-based line, in the input, of the document at `document_index` among those read."""
        return document_index + bisect.bisect_right(self._blanks_after, document_index)


def _json_document(line: str, number: int) -> str:
    """The "text" of a JSON line."""
    try:
        value = json.loads(line)
    except ValueError as error:
        raise InputError(f"line {number}: not valid JSON ({error})") from None
    if not isinstance(value, dict) or not isinstance(value.get("text"), str):
        raise InputError(f'line {number}: not a JSON object with a "text" string')
    return value["text"]


def _is_json_document(line: str) -> bool:
    try:
        _json_document(line, 0)
    except InputError:
        return False
    return True


def open_input(path: str | None) -> TextIO:
    """FILE, or standard input for None or "-", as UTF-8 text (a leading byte-order mark dropped)."""
    if path is None or path == "-":
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:  # already text without bytes beneath (a test's StringIO)
            return sys.stdin
        if sys.stdin.isatty():
            print(
                "rerank: reading documents from standard input, one per line (Ctrl-D ends)", file=sys.stderr
            )
        return io.TextIOWrapper(buffer, encoding="utf-8-sig")
    try:
        return open(path, encoding="utf-8-sig")
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from None


def take_head(documents: Iterator[str]) -> tuple[list[str], bool]:
    """The documents up to the one that passes a single call's limits, and whether one did."""
    head: list[str] = []
    chars = 0
    for text in documents:
        head.append(text)
        chars += len(text)
        if len(head) > ONE_CALL_DOCUMENTS or chars > ONE_CALL_CHARS:
            return head, True
    return head, False
