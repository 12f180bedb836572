"""Where the front-end's time goes: py-spy samples of its Python threads, grouped by the server's parts.

py-spy reads the process from outside (no change to the server); `--format raw` gives one line per
distinct stack, "frame;frame;... count". A stack belongs to the part of its innermost frame that
matches one (a tokenizer call made by the servicer is tokenizing, not gRPC). py-spy does not see
every blocked thread as idle here: stacks that end in a blocking call (a selector, a pipe read, an
idle pool thread) are counted as waiting and left out of the shares. A sample is a thread that is
running or waiting for the GIL, so the shares are of busy threads, not exactly of CPU seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# Innermost frames (function, file) of a thread blocked in C: the thread uses no CPU.
WAITING = (
    ("select", "selectors.py"),
    ("_recv", "multiprocessing/connection.py"),
    ("_worker", "concurrent/futures/thread.py"),
    ("Thread.run", "threading.py"),
    ("wait", "threading.py"),
    ("get", "queue.py"),
)
# (part, substrings of a frame's file); the first part whose pattern a frame matches wins.
PARTS = (
    ("shared memory", ("rerank_server/transport/", "multiprocessing/shared_memory")),
    ("tokenizing", ("tokenizers/", "transformers/tokenization", "rerank_server/families/")),
    ("ranking", ("rerank_server/ranking",)),
    ("batching", ("rerank_server/scheduling/",)),
    ("dispatch to workers (pipes)", ("rerank_server/workers/", "multiprocessing/connection")),
    ("validation", ("rerank_server/edge/convert", "rerank_server/service/request", "rerank_server/errors")),
    ("service (rest)", ("rerank_server/",)),
    ("gRPC and protobuf", ("grpc/", "grpc_", "google/protobuf")),
    ("event loop (and native callbacks: gRPC's Cython)", ("asyncio/",)),
)


def py_spy() -> str | None:
    """py-spy next to this interpreter, or on PATH; None when not installed."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy recording `pid` for `seconds` into `out` (raw stacks); None without py-spy."""
    executable = py_spy()
    if executable is None:
        return None
    command = [executable, "record", "-d", str(max(1, round(seconds))), "-p", str(pid), "--format", "raw"]
    return subprocess.Popen([*command, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def waiting(stack: str) -> bool:
    function, _, location = stack.rpartition(";")[2].partition(" (")
    return any(function.endswith(name) and location.startswith(file) for name, file in WAITING)


def part_of(stack: str) -> str:
    """The part of the innermost frame that matches one; "other" when none does."""
    for frame in reversed(stack.split(";")):
        location = frame.rpartition("(")[2]
        for part, patterns in PARTS:
            if any(pattern in location for pattern in patterns):
                return part
    return "other"


def group(raw: str, top: int = 8) -> dict[str, object]:
    """From py-spy's raw output: samples, the waiting share, the busy samples' share per part and
    their innermost functions with the largest shares."""
    parts: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    idle = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if waiting(stack):
            idle += int(count)
            continue
        parts[part_of(stack)] += int(count)
        functions[stack.rpartition(";")[2]] += int(count)
    busy = sum(parts.values())
    if not busy:
        return {"samples": idle, "waiting_share": 1.0 if idle else None}
    return {
        "samples": busy + idle,
        "waiting_share": round(idle / (busy + idle), 3),
        "busy_share_by_part": {part: round(n / busy, 3) for part, n in parts.most_common()},
        "busy_share_by_function": {f: round(n / busy, 3) for f, n in functions.most_common(top)},
    }
