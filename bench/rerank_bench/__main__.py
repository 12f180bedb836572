"""Command line: `.venv/bin/python -m bench.rerank_bench [--scenarios a,b] [--duration S] ...`.

Runs the chosen scenarios (default: all but http), prints the tables, merges this run's scenarios
into the results JSON and renders docs/performance.md and its plots from it. Exits 1 when a scenario
failed or a server did not shut down cleanly; a missed target is a finding, not a failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from . import log
from .machine import machine_facts
from .model import build_model_in_subprocess
from .report import all_clean, load, merge, render, write_docs
from .scenarios import DEFAULT_SCENARIOS, SCENARIOS, Bench, Settings
from .workloads import SHAPES, TokenCounter, default_tokenizer_path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"
DEFAULT_DOCS = ROOT / "docs" / "performance.md"


def _ints(text: str) -> tuple[int, ...]:
    values = tuple(int(item) for item in text.split(",") if item.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 1,8, got {text!r}")
    return values


def _shares(text: str) -> tuple[float, ...]:
    values = tuple(float(item) for item in text.split(",") if item.strip())
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive shares such as 0.5,0.8, got {text!r}")
    return values


def _workloads(text: str) -> tuple[str, ...]:
    names = tuple(item.strip() for item in text.split(",") if item.strip())
    if not names or not set(names) <= set(SHAPES):
        raise argparse.ArgumentTypeError(f"workloads are {', '.join(SHAPES)}; got {text!r}")
    return names


def _scenarios(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"scenarios are {', '.join(SCENARIOS)}; got {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m bench.rerank_bench", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add(
        "--scenarios",
        type=_scenarios,
        default=DEFAULT_SCENARIOS,
        help=f"comma-separated: {','.join(SCENARIOS)} (default: all but http)",
    )
    add(
        "--model",
        type=Path,
        help="an existing cross-encoder directory (default: build the MiniLM-shaped one)",
    )
    add("--duration", type=float, default=d.duration, help="measured seconds per phase")
    add("--warmup", type=float, default=d.warmup, help="unmeasured seconds before each phase")
    add("--seed", type=int, default=d.seed, help="seed of the model weights, texts and arrivals")
    add("--request-timeout", type=float, default=d.request_timeout, help="deadline of one request (s)")
    add("--clients", type=_ints, default=d.clients, help="closed-loop clients (throughput, tiny)")
    add(
        "--open-loop-loads",
        type=_shares,
        default=d.open_loop_loads,
        help="open-loop rates as shares of the server's best closed-loop pairs/s ('' for none)",
    )
    add("--frontend-clients", type=int, default=d.frontend_clients, help="clients of the frontend scenario")
    add("--profile-seconds", type=float, default=d.profile_seconds, help="py-spy on the front-end (0: off)")
    add("--device-replicas", type=_ints, default=d.device_replicas, help="simulated devices to try")
    add(
        "--clients-per-device",
        type=int,
        default=d.clients_per_device,
        help="devices scenario's clients per device",
    )
    add(
        "--simulated-us-per-token",
        type=float,
        default=d.simulated_us_per_token,
        help="a simulated device's microseconds per padded token",
    )
    add("--stream-documents", type=int, default=d.stream_documents, help="passages of the interactive stream")
    add("--bf16-requests", type=int, default=d.bf16_requests, help="mixed requests compared in bf16")
    add(
        "--peer-command",
        default=d.peer_command,
        help="a peer server's command with {model} and {port}, serving POST /rerank (throughput)",
    )
    add("--peer-model", default=d.peer_model, help="the model name the peer's requests carry ('' = none)")
    add(
        "--http-workloads",
        type=_workloads,
        default=d.http_workloads,
        help="workloads the http scenario runs over gRPC and HTTP at each --clients count",
    )
    add("--out", type=Path, default=DEFAULT_OUT, help="results JSON (this run's scenarios replace its own)")
    add("--docs", type=Path, default=DEFAULT_DOCS, help="the performance page to write, plots beside it")
    add("--no-docs", action="store_true", help="do not write the performance page and plots")
    add("--report-only", action="store_true", help="run nothing: render the page from --out")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.frontend_clients < 1 or args.clients_per_device < 1:
        parser.error("need --duration > 0, --warmup >= 0, --frontend-clients >= 1, --clients-per-device >= 1")
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so the servers are still stopped by the `with` blocks."""
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each chosen scenario in turn; one that fails is recorded with its error, and the rest run."""
    settings = settings_of(args)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="rerank-bench-") as scratch:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(scratch) / "minilm-shaped"
            log(f"building a MiniLM-L6-shaped cross-encoder in {model_dir}")
            build_model_in_subprocess(model_dir, settings.seed)
        tokenizer = model_dir / "tokenizer.json"
        counter = TokenCounter(tokenizer if tokenizer.exists() else default_tokenizer_path())
        bench = Bench(settings, model_dir, counter, Path(scratch))
        for name in args.scenarios:
            log(f"=== {name}")
            try:
                outcome = SCENARIOS[name](bench)
            except Exception as exc:
                traceback.print_exc()
                outcome = bench.outcome(name)
                outcome.error = f"{type(exc).__name__}: {exc}"[-2000:]
            outcomes.append(dataclasses.asdict(outcome))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the models and tokenizers are local; never reach the hub
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keep stderr to the progress lines
    os.environ.setdefault("TQDM_DISABLE", "1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    previous = load(args.out)
    if args.report_only:
        if previous is None:
            log(f"no results in {args.out}")
            return 2
        results = previous
    else:
        machine = machine_facts()
        results = merge(previous, machine, run(args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.out}")
    print(render(results))
    if not args.no_docs:
        for path in write_docs(results, args.docs):
            log(f"wrote {path}")
    ran = list(results["scenarios"]) if args.report_only else args.scenarios
    return 0 if all_clean(results, ran) else 1


if __name__ == "__main__":
    sys.exit(main())
