"""`rerank-server` entry point: settings from the environment and flags, logging, then serve."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from rerank_server.logs import configure_logging, resolve_log_format
from rerank_server.settings import ServerSettings


def main(argv: Sequence[str] | None = None) -> int:
    settings = ServerSettings.from_args(argv)
    # Resolved once, here: the workers log in the front-end's format whatever their own stderr is.
    log_format = resolve_log_format(settings.log_format, sys.stderr)
    settings = settings.model_copy(update={"log_format": log_format})
    configure_logging(settings.log_level, log_format)
    # Workers are spawned (fork + exec): let the front-end's tokenizer keep its threads, quietly.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from rerank_server.app import StartupError, serve

    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        logging.getLogger("rerank_server").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
