"""`rerank`: the command-line client (placeholder until the CLI lands)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    raise SystemExit("rerank: not yet built")
