"""What the command line prints: aligned tables cut to the terminal, JSON, and a stream's progress line."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

from rerank_client import RankedDocument, RerankResult


class Progress:
    """How many documents a stream has scored, and how fast: one line on a terminal, rewritten in place."""

    def __init__(
        self, terminal: TextIO, clock: Callable[[], float] = time.monotonic, every_s: float = 0.2
    ) -> None:
        self._terminal = terminal
        self._clock = clock
        self._every_s = every_s
        self._started = clock()
        self._shown_at: float | None = None
        self.scored = 0

    def add(self, batch: Sequence[RankedDocument]) -> None:
        """on_scored of stream_rerank: count a batch, and redraw the line at most every `every_s`."""
        self.scored += len(batch)
        now = self._clock()
        if self._shown_at is not None and now - self._shown_at < self._every_s:
            return
        self._shown_at = now
        elapsed = now - self._started
        rate = f", {self.scored / elapsed:,.0f}/s" if elapsed > 0 else ""
        self._terminal.write(f"\r\x1b[K{self.scored:,} documents scored{rate}")
        self._terminal.flush()

    def clear(self) -> None:
        if self._shown_at is not None:
            self._terminal.write("\r\x1b[K")
            self._terminal.flush()


def output_width(stdout: TextIO, environ: Mapping[str, str]) -> int | None:
    """Columns to cut table lines to: COLUMNS, else the terminal's; None (no cut) for a pipe or file."""
    columns = environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return shutil.get_terminal_size().columns if stdout.isatty() else None


def one_line(text: str) -> str:
    """`text` for one table cell: line breaks, tabs and control characters become single spaces."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _columns(c: str) -> int:
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def cut(text: str, room: int) -> str:
    """`text` in at most `room` terminal columns, an ellipsis marking a cut (wide characters take two)."""
    if sum(map(_columns, text)) <= room:
        return text
    used = 0
    for end, c in enumerate(text):
        used += _columns(c)
        if used > room - 1:
            return text[:end] + "…"
    return text


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str, width: int | None) -> str:
    """Aligned columns ("<" or ">" per column in `align`); the last one is free text, cut to `width`."""
    *fixed, last = range(len(header))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in fixed]
    lines = []
    for row in (header, *rows):
        cells = [f"{row[i]:{align[i]}{widths[i]}}" for i in fixed]
        prefix = "  ".join(cells) + "  " if cells else ""
        text = one_line(row[last])
        if width is not None:
            text = cut(text, max(width - len(prefix), 8))
        lines.append((prefix + text).rstrip())
    return "\n".join(lines) + "\n"


def ranking_table(result: RerankResult, rows: Sequence[tuple[int, str]], width: int | None) -> str:
    """`rows`: the (input index, text) of each of `result`'s results."""
    cells = [
        (str(rank), f"{ranked.score:.4f}", str(index), text)
        for rank, (ranked, (index, text)) in enumerate(zip(result.results, rows, strict=True), start=1)
    ]
    return render_table(("rank", "score", "index", "document"), cells, ">>><", width)


def ranking_json(result: RerankResult, rows: Sequence[tuple[int, str]], *, streamed: bool) -> str:
    document = {
        "results": [
            {"index": index, "score": ranked.score, "document": text}
            for ranked, (index, text) in zip(result.results, rows, strict=True)
        ],
        "model": result.model,
        "usage": dataclasses.asdict(result.usage),
        "timings": dataclasses.asdict(result.timings),
        "streamed": streamed,
    }
    return json.dumps(document, ensure_ascii=False) + "\n"
