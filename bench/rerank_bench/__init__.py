"""How `rerank-server` performs against a raw in-process baseline, measured in one run.

Why in one run: figures from different days, machines or loads cannot be compared. The baseline is
what a user would write without a server (transformers tokenizer + model in their own process), so
the server has to justify its extra processes against it on the same model, dtype and workload.

Run from the repository root: `.venv/bin/python -m bench.rerank_bench --help`. One module per job:
workloads (the texts), model (the MiniLM-shaped cross-encoder), loadgen (closed and open loop
clients), http_load (the HTTP/JSON API as a load driver), figures (from samples to a phase's
figures and targets), baseline (in-process), harness (the server subprocess, shared with the
integration tests), machine (/proc), scenarios (what is measured), precision (bfloat16 against
float32), profiling (py-spy), peer (another server over HTTP), report (JSON, markdown, plots,
docs/performance.md).
"""

from __future__ import annotations

import sys
import time


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
