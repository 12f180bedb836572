"""The commands of `rerank` (rank, models, health), its argument parser and its exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rerank_client import RerankError
from rerank_client.cli.documents import (
    ONE_CALL_DOCUMENTS,
    ONE_CALL_MIB,
    DocumentReader,
    InputError,
    open_input,
    take_head,
)
from rerank_client.cli.options import (
    DEFAULT_TARGET,
    ENV_PREFIX,
    Connection,
    UsageError,
    add_tls_arguments,
    env_count,
    env_value,
    positive_seconds,
    whole_number,
)
from rerank_client.cli.output import Progress, output_width, ranking_json, ranking_table, render_table

COMMANDS = ("models", "health")
DEFAULT_TOP_N = 10
#: The deadline of `models` and `health` when --timeout is not given (reranking has none).
QUICK_CALL_TIMEOUT_S = 10.0

EXIT_FAILED = 1  # the call failed, or `health` is not SERVING
EXIT_USAGE = 2  # argparse's own code for bad usage
EXIT_INPUT = 3  # the documents could not be read
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_PIPE_CLOSED = 141  # standard output closed early, as a shell reports SIGPIPE

USAGE = """rerank [options] QUERY [FILE]
       rerank [options] --query QUERY [FILE]
       rerank [options] models
       rerank [options] health [SERVICE]"""

EPILOG = f"""\
commands:
  QUERY [FILE]      rank the documents of FILE (standard input when absent or "-") against QUERY
  models            the models the server serves
  health [SERVICE]  the server's health ("" = the whole server, or e.g. "liveness"); exit 0 only
                    when SERVING
  A first argument of "models" or "health" is the command; to rank documents against a query
  that is one of these words, give it with --query: rerank --query models docs.txt

input:
  One document per line, or JSON lines with a "text" field (extra fields are ignored). The first
  non-blank line decides: a JSON object with a "text" string means JSON lines; --input-format
  forces either. Blank lines are skipped, not scored. A result's index is the 0-based position of
  its line in the input, blank lines counted (line number = index + 1).

streaming:
  An input of more than {ONE_CALL_DOCUMENTS:,} documents or {ONE_CALL_MIB} MiB of text goes through
  StreamRerank: documents are read as the server takes them, never all held in memory, and a
  progress line goes to standard error when it is a terminal. --stream / --no-stream force either
  way. A stream needs --top-n of at least 1 (default {DEFAULT_TOP_N}); --top-n 0 (all) is for an
  input sent in one call.

output:
  A table (rank, score, index, document), the document cut to the terminal width when standard
  output is a terminal or COLUMNS is set; --json prints one JSON object instead (results with index,
  score and document; model, usage, timings, and whether it was streamed).

environment (flags override them; the server's RERANK_* variables are not read):
  {ENV_PREFIX}TARGET, {ENV_PREFIX}TOKEN, {ENV_PREFIX}TOKEN_FILE, {ENV_PREFIX}TLS (true/false),
  {ENV_PREFIX}CA_FILE, {ENV_PREFIX}CERT_FILE, {ENV_PREFIX}KEY_FILE, {ENV_PREFIX}SERVER_NAME,
  {ENV_PREFIX}MODEL, {ENV_PREFIX}TOP_N, {ENV_PREFIX}INSTRUCTION

exit status:
  0    done (health: SERVING)
  {EXIT_FAILED}    the call failed (its gRPC status and message go to standard error); health not SERVING
  {EXIT_USAGE}    bad usage
  {EXIT_INPUT}    the input could not be read: a missing file, bad JSON lines, not UTF-8
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
  {EXIT_PIPE_CLOSED}  standard output was closed early (rerank ... | head)
"""


@dataclass(frozen=True)
class RerankRequest:
    """What `rerank QUERY [FILE]` asks for, its flags resolved over the environment."""

    query: str
    file: str | None
    top_n: int
    model: str
    instruction: str
    max_length: int
    truncation: str
    raw_scores: bool
    cutoff_layer: int
    stream: bool | None  # None: when the input passes one call's limits
    input_format: str
    timeout: float | None

    @classmethod
    def resolve(
        cls, args: argparse.Namespace, query: str, file: str | None, environ: Mapping[str, str]
    ) -> RerankRequest:
        top_n = args.top_n if args.top_n is not None else env_count(environ, "TOP_N", DEFAULT_TOP_N)
        if top_n == 0 and args.stream:
            raise UsageError("a stream needs --top-n of at least 1")
        return cls(
            query=query,
            file=file,
            top_n=top_n,
            model=args.model if args.model is not None else env_value(environ, "MODEL") or "",
            instruction=args.instruction
            if args.instruction is not None
            else env_value(environ, "INSTRUCTION") or "",
            max_length=args.max_length or 0,
            truncation=args.truncation or "end",
            raw_scores=bool(args.raw_scores),
            cutoff_layer=args.cutoff_layer or 0,
            stream=args.stream,
            input_format=args.input_format or "auto",
            timeout=args.timeout,
        )


def rerank_command(
    request: RerankRequest, connection: Connection, *, as_json: bool, width: int | None
) -> int:
    options: dict[str, Any] = {
        "top_n": request.top_n,
        "model": request.model,
        "instruction": request.instruction,
        "max_length": request.max_length,
        "truncation": request.truncation,
        "raw_scores": request.raw_scores,
        "cutoff_layer": request.cutoff_layer,
        "timeout": request.timeout,
    }
    # The client first: bad TLS files or a malformed token are reported before any input is read.
    with connection.open() as client, open_input(request.file) as lines:
        reader = DocumentReader(lines, request.input_format)
        documents = iter(reader)
        if request.stream is False:
            head, streamed = list(documents), False
        else:
            head, over_limits = take_head(documents)
            streamed = request.stream or over_limits
        if not head:
            raise InputError("no documents in the input (blank lines are skipped)")
        if streamed and request.top_n == 0:
            raise UsageError(
                f"--top-n 0 (all) is for at most {ONE_CALL_DOCUMENTS:,} documents and"
                f" {ONE_CALL_MIB} MiB; this input is streamed: give --top-n N (or --no-stream)"
            )
        if streamed:
            progress = Progress(sys.stderr) if sys.stderr.isatty() else None
            try:
                result = client.stream_rerank(
                    request.query,
                    itertools.chain(head, documents),
                    return_documents=True,
                    on_scored=None if progress is None else progress.add,
                    **options,
                )
            finally:
                if progress is not None:
                    progress.clear()
            texts = [ranked.document or "" for ranked in result.results]
        else:
            result = client.rerank(request.query, head, **options)
            texts = [head[ranked.index] for ranked in result.results]
    rows = [
        (reader.input_index(ranked.index), text) for ranked, text in zip(result.results, texts, strict=True)
    ]
    if as_json:
        sys.stdout.write(ranking_json(result, rows, streamed=streamed))
    else:
        sys.stdout.write(ranking_table(result, rows, width))
    sys.stdout.flush()
    return 0


def models_command(connection: Connection, timeout: float | None, *, as_json: bool, width: int | None) -> int:
    with connection.open() as client:
        models = client.list_models(timeout=timeout or QUICK_CALL_TIMEOUT_S)
    if as_json:
        sys.stdout.write(
            json.dumps({"models": [dataclasses.asdict(m) for m in models]}, ensure_ascii=False) + "\n"
        )
    else:
        rows = [
            (
                m.name,
                m.family,
                str(m.max_length),
                m.dtype,
                f"{m.ready_replicas}/{m.replicas}",
                ",".join(m.devices),
            )
            for m in models
        ]
        header = ("name", "family", "max_length", "dtype", "ready", "devices")
        sys.stdout.write(render_table(header, rows, "<<><><", width))
    sys.stdout.flush()
    return 0


def health_command(connection: Connection, service: str, timeout: float | None, *, as_json: bool) -> int:
    with connection.open(retry=False) as client:
        status = client.health(service, timeout=timeout or QUICK_CALL_TIMEOUT_S)
    sys.stdout.write(json.dumps({"service": service, "status": status}) + "\n" if as_json else status + "\n")
    sys.stdout.flush()
    return 0 if status == "SERVING" else EXIT_FAILED


#: Flags that only reranking takes: refused with `models` and `health`.
RERANK_FLAGS = {
    "query": "--query",
    "top_n": "--top-n",
    "model": "--model",
    "instruction": "--instruction",
    "max_length": "--max-length",
    "truncation": "--truncation",
    "raw_scores": "--raw-scores",
    "cutoff_layer": "--cutoff-layer",
    "stream": "--stream",
    "input_format": "--input-format",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerank",
        usage=USAGE,
        description="Rank documents against a query on a rerank server; list its models; check its health.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("words", nargs="*", help=argparse.SUPPRESS)
    server = parser.add_argument_group("server")
    server.add_argument(
        "--target",
        metavar="HOST:PORT",
        help=f"the server (default {DEFAULT_TARGET}; env {ENV_PREFIX}TARGET)",
    )
    token = server.add_mutually_exclusive_group()
    token.add_argument(
        "--token", help=f"bearer token (env {ENV_PREFIX}TOKEN); --token-file keeps it out of the process list"
    )
    token.add_argument(
        "--token-file", metavar="FILE", help=f"a file holding the bearer token (env {ENV_PREFIX}TOKEN_FILE)"
    )
    server.add_argument(
        "--timeout",
        type=positive_seconds,
        metavar="SECONDS",
        help=f"deadline of the call (default: none for reranking, {QUICK_CALL_TIMEOUT_S:g} for models"
        " and health)",
    )
    add_tls_arguments(parser, environment=True)
    ranking = parser.add_argument_group("reranking")
    ranking.add_argument("-q", "--query", help="the query, when it is not the first argument")
    ranking.add_argument(
        "-n",
        "--top-n",
        type=whole_number,
        metavar="N",
        help=f"results to print (default {DEFAULT_TOP_N}; 0 = all, for an input sent in one call;"
        f" env {ENV_PREFIX}TOP_N)",
    )
    ranking.add_argument(
        "--model",
        metavar="NAME",
        help=f"a served model (default: the server's first; env {ENV_PREFIX}MODEL)",
    )
    ranking.add_argument(
        "--instruction",
        metavar="TEXT",
        help=f"replaces the model's default instruction (models that take one; env {ENV_PREFIX}INSTRUCTION)",
    )
    ranking.add_argument(
        "--max-length",
        type=whole_number,
        metavar="TOKENS",
        help="token budget of a (query, document) pair (default: the model's)",
    )
    ranking.add_argument(
        "--truncation",
        choices=("end", "none", "chunk"),
        help="a pair over the budget is cut (end, the default), refused (none), or scored by its best"
        " window (chunk)",
    )
    ranking.add_argument(
        "--raw-scores", action="store_true", default=None, help="the model's raw scores, not normalized ones"
    )
    ranking.add_argument(
        "--cutoff-layer",
        type=whole_number,
        metavar="LAYER",
        help="the layer whose score is returned (layerwise models; default: the last)",
    )
    ranking.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"use StreamRerank, or never (default: for more than {ONE_CALL_DOCUMENTS:,} documents or"
        f" {ONE_CALL_MIB} MiB)",
    )
    ranking.add_argument(
        "--input-format",
        choices=("auto", "lines", "jsonl"),
        help='one document per line, or JSON lines with a "text" field (default: auto, from the first'
        " non-blank line)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    return parser


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """The command `args` name, with settings from `args` over `environ`."""
    words = list(args.words)
    width = output_width(sys.stdout, environ)
    if args.query is None and words and words[0] in COMMANDS:
        command, operands = words[0], words[1:]
        given = [flag for name, flag in RERANK_FLAGS.items() if getattr(args, name) is not None]
        if given:
            raise UsageError(f"{given[0]} is for reranking, not for '{command}'")
        if len(operands) > (0 if command == "models" else 1):
            raise UsageError(f"unexpected argument after '{' '.join(words[:-1])}': {words[-1]!r}")
        connection = Connection.resolve(args, environ)
        if command == "models":
            return models_command(connection, args.timeout, as_json=args.json, width=width)
        return health_command(connection, operands[0] if operands else "", args.timeout, as_json=args.json)
    query = args.query if args.query is not None else (words.pop(0) if words else None)
    if query is None:
        raise UsageError("give a QUERY (documents from FILE or standard input), or a command: models, health")
    if len(words) > 1:
        raise UsageError(f"unexpected argument after FILE: {words[1]!r}")
    request = RerankRequest.resolve(args, query, words[0] if words else None, environ)
    return rerank_command(request, Connection.resolve(args, environ), as_json=args.json, width=width)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_intermixed_args(argv)
        return run(args, os.environ)
    except UsageError as error:
        parser.error(str(error))
    except InputError as error:
        print(f"rerank: {error}", file=sys.stderr)
        return EXIT_INPUT
    except RerankError as error:
        print(f"rerank: {error.code.name}: {error.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_PIPE_CLOSED


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's final flush does not fail again."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)
