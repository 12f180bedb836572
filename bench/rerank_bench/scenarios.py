"""What is measured: one function per scenario, each returning an Outcome with its targets.

Every server runs with its defaults plus only what the scenario is about (the harness adds
`--host 127.0.0.1 --port 0 --metrics-port FREE`), and is stopped with SIGTERM and checked for a
clean shutdown before the next one starts, so no two servers share the cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rerank_client import RankedDocument, RerankerClient

from . import log
from .baseline import run_baseline, server_cpu_dtype
from .figures import BATCH_METRICS, Outcome, Phase, batch_figures, ratio, rounded, summarize, target
from .harness import ServerProcess, wait_until
from .http_load import http_sender
from .loadgen import Connect, closed_loop, grpc_sender, open_loop
from .machine import cores, machine_busy_seconds, proc_cpu_seconds, proc_memory_mib
from .peer import PeerProcess
from .precision import build_real_minilm, compare, score_all
from .profiling import group, start_profile
from .workloads import PASSAGE_BLOCKS, TokenCounter, Workload, make_workload, stream_documents

REPLICA_READY = re.compile(r"replica ready on (\S+) \((\w+), (\d+) threads\)")
STREAM_TOP_N = 10
RSS_GROWTH_BOUND_MIB = 256  # the front-end's growth while streaming that would mean it buffers the stream


@dataclass(frozen=True)
class Settings:
    """Every knob of a run; the defaults are the long run's (see docs/benchmarks.md)."""

    duration: float = 20.0
    warmup: float = 3.0
    seed: int = 0
    request_timeout: float = 120.0
    clients: tuple[int, ...] = (1, 8)
    open_loop_loads: tuple[float, ...] = (0.5, 0.8)
    frontend_clients: int = 8
    profile_seconds: float = 10.0
    device_replicas: tuple[int, ...] = (1, 2, 4, 8)
    clients_per_device: int = 4
    simulated_us_per_token: float = 50.0
    stream_documents: int = 100_000
    bf16_requests: int = 48
    peer_command: str = ""
    peer_model: str = ""
    http_workloads: tuple[str, ...] = ("tiny", "mixed")


@dataclass
class Bench:
    """What the scenarios share: settings, the model, its tokenizer's counts, a scratch folder."""

    settings: Settings
    model_dir: Path
    counter: TokenCounter
    scratch: Path

    def outcome(self, scenario: str) -> Outcome:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return Outcome(scenario, now, dataclasses.asdict(self.settings) | {"model": str(self.model_dir)})

    def workload(self, name: str, blocks: int = PASSAGE_BLOCKS) -> Workload:
        return make_workload(name, self.counter, self.settings.seed, blocks=blocks)


# ---------------------------------------------------------------------------------------------
# Serving and measuring


@contextlib.contextmanager
def serving(bench: Bench, outcome: Outcome, name: str, flags: list[str]) -> Iterator[ServerProcess]:
    """A server with `--model MODEL` and `flags`, SERVING; on leaving, stopped and checked."""
    log(f"{name}: rerank-server {' '.join(flags) or '(defaults)'}")
    with ServerProcess(["--model", str(bench.model_dir), *flags], bench.scratch / f"{name}.log") as server:
        try:
            server.wait_serving()
            yield server
            shutdown = server.shutdown()
        except BaseException:
            sys.stderr.write(f"--- last lines of the {name} log ---\n")
            sys.stderr.write("\n".join(server.log().splitlines()[-40:]) + "\n")
            raise
        lines = server.log().splitlines()
    outcome.shutdowns.append(
        {
            "server": name,
            "flags": flags,
            "clean": shutdown.clean,
            **dataclasses.asdict(shutdown),
            "replicas": [" ".join(m.groups()) for line in lines if (m := REPLICA_READY.search(line))],
            "log_warnings": [line for line in lines if " WARNING " in line or " ERROR " in line][:20],
        }
    )
    if not shutdown.clean:
        log(f"{name}: UNCLEAN shutdown: {dataclasses.asdict(shutdown)}")


def server_processes(server: ServerProcess) -> dict[str, list[int]]:
    return {"front-end": [server.process.pid], "workers": server.worker_pids()}


def measure(
    setup: str,
    workload: Workload,
    connect: Connect,
    settings: Settings,
    processes: dict[str, list[int]],
    *,
    server: ServerProcess | None = None,
    clients: int = 0,
    rate: float = 0.0,
) -> Phase:
    """A closed loop of `clients` (or an open loop at `rate` requests/s), with the CPU seconds of
    `processes` and of the machine, and the server's batch counters, over the window."""
    me = os.getpid()

    def probe() -> dict[str, float]:
        values = {name: sum(proc_cpu_seconds(p) or 0.0 for p in pids) for name, pids in processes.items()}
        values["benchmark"] = proc_cpu_seconds(me) or 0.0
        values["machine"] = machine_busy_seconds()
        if server is not None:
            values.update(server.metric_sums(BATCH_METRICS))
        return values

    s = settings
    if rate > 0:
        run = open_loop(connect, workload.request, rate, s.warmup, s.duration, probe, seed=s.seed)
        load = f"open {rate:.1f} req/s"
    else:
        run = closed_loop(
            connect, workload.request, clients, s.warmup, s.duration, probe, s.request_timeout + 10
        )
        load = f"{clients} client" + ("s" if clients != 1 else "")
    phase = summarize(setup, workload.name, load, clients, run.samples, run.start, run.end)
    used = {key: run.after[key] - run.before[key] for key in [*processes, "benchmark", "machine"]}
    used["other"] = max(0.0, used.pop("machine") - sum(used.values()))
    phase.cpu_seconds = rounded(used)
    if server is not None:
        phase.batches = batch_figures(run.before, run.after)
        phase.real_to_padded = ratio(phase.tokens_per_pair, phase.batches.get("padded_tokens_per_pair"))
    for name, pids in processes.items():
        for index, pid in enumerate(pids):
            label = name if len(pids) == 1 else f"{name}-{index}"
            phase.peak_rss_mib[label] = round(proc_memory_mib(pid).get("VmHWM", 0.0), 1)
    return record(phase)


def record(phase: Phase) -> Phase:
    """Flag contention, and say in one line how the phase went."""
    phase.flag_contention(cores())
    note = f"; CONTENDED: others used {phase.cpu_seconds.get('other')} CPU s" if phase.contended else ""
    log(
        f"  {phase.setup}, {phase.workload}, {phase.load}: {phase.pairs_per_s} pairs/s, "
        f"p50 {phase.latency_ms.get('p50')} ms, errors {sum(phase.errors.values())}{note}"
    )
    return phase


def by_load(phases: list[Phase], setup_prefix: str, load: str) -> Phase | None:
    return next((p for p in phases if p.setup.startswith(setup_prefix) and p.load == load), None)


def p50(phase: Phase | None) -> float | None:
    return None if phase is None else phase.latency_ms.get("p50")


def rate_of(phase: Phase | None) -> float | None:
    return None if phase is None else phase.pairs_per_s


# ---------------------------------------------------------------------------------------------
# Scenarios


def throughput(bench: Bench) -> Outcome:
    """uniform and mixed: baselines, then the server (and a peer) at each client count, then open
    loops at shares of the server's best closed-loop rate."""
    s = bench.settings
    out = bench.outcome("throughput")
    dtype = server_cpu_dtype()
    out.notes["baseline_dtype"] = dtype
    for name in ("uniform", "mixed"):
        workload = bench.workload(name)
        out.notes[f"workload_{name}"] = workload.facts()
        log(f"throughput, {name}: in-process baseline ({dtype})")
        for sorted_rounds in (False, True) if name == "mixed" else (False,):
            phase = run_baseline(
                bench.model_dir, workload, s.warmup, s.duration, dtype, sorted_rounds=sorted_rounds
            )
            out.phases.append(record(phase))
        gc.collect()  # the baseline's model is garbage now; keep it out of the server's phases
        with serving(bench, out, f"throughput-{name}", []) as server:
            connect = grpc_sender(server.target, s.request_timeout)
            processes = server_processes(server)
            best = 0.0
            for clients in s.clients:
                phase = measure("server", workload, connect, s, processes, server=server, clients=clients)
                out.phases.append(phase)
                best = max(best, phase.pairs_per_s)
            for share in s.open_loop_loads:
                rate = share * best / workload.documents
                if rate > 0:
                    out.phases.append(
                        measure("server", workload, connect, s, processes, server=server, rate=rate)
                    )
        if s.peer_command:
            out.phases += peer_phases(bench, out, workload)
    phases = out.phases

    def of(workload: str, prefix: str, load: str) -> Phase | None:
        return by_load([p for p in phases if p.workload == workload], prefix, load)

    uniform_ratio = ratio(
        rate_of(of("uniform", "server", "8 clients")), rate_of(of("uniform", "baseline, one", "1 loop"))
    )
    mixed_sorted = of("mixed", "baseline sorted", "1 loop, 8 requests a round")
    mixed_8 = of("mixed", "server", "8 clients")
    mixed_sorted_ratio = ratio(rate_of(mixed_8), rate_of(mixed_sorted))
    mixed_real = mixed_8.real_to_padded if mixed_8 else None
    mixed_p50 = ratio(p50(of("mixed", "server", "1 client")), p50(of("mixed", "baseline, one", "1 loop")))
    out.notes["ratios"] = {
        "uniform: server 8 clients / baseline pairs/s": uniform_ratio,
        "uniform: server 1 client p50 / baseline p50": ratio(
            p50(of("uniform", "server", "1 client")), p50(of("uniform", "baseline, one", "1 loop"))
        ),
        "mixed: server 8 clients / sorted baseline pairs/s": mixed_sorted_ratio,
        "mixed: server 8 clients / one-padded-batch baseline pairs/s": ratio(
            rate_of(mixed_8), rate_of(of("mixed", "baseline, one", "1 loop"))
        ),
        "mixed: server 1 client p50 / one-padded-batch baseline p50": mixed_p50,
    }
    out.targets = [
        target("mixed, 8 clients: server / sorted baseline pairs/s", mixed_sorted_ratio, ">=", 0.9),
        target("mixed, 8 clients: real / padded tokens", mixed_real, ">=", 0.85),
        target("uniform, 8 clients: server / baseline pairs/s", uniform_ratio, ">=", 0.95),
        target("mixed, 1 client: server p50 / one-padded-batch baseline p50", mixed_p50, "<=", 0.6),
    ]
    return out


def peer_phases(bench: Bench, out: Outcome, workload: Workload) -> list[Phase]:
    """The peer server on the same model and workload, at each client count; a peer that does not
    start is noted, not fatal."""
    s = bench.settings
    log_path = bench.scratch / f"peer-{workload.name}.log"
    log(f"peer, {workload.name}: {s.peer_command}")
    phases = []
    with PeerProcess(s.peer_command, bench.model_dir, log_path, s.peer_model) as peer:
        try:
            peer.wait_ready()
        except (RuntimeError, TimeoutError) as exc:
            out.notes[f"peer_{workload.name}"] = f"did not start: {str(exc)[-500:]}"
            log(f"peer did not start: {str(exc)[-500:]}")
            return []
        processes = {"peer": [peer.process.pid]}
        for clients in s.clients:
            phases.append(
                measure("peer", workload, peer.connect(s.request_timeout), s, processes, clients=clients)
            )
    return phases


def tiny(bench: Bench) -> Outcome:
    """Requests of 3 short passages: what a request costs beyond its model time."""
    s = bench.settings
    out = bench.outcome("tiny")
    workload = bench.workload("tiny")
    out.notes["workload_tiny"] = workload.facts()
    dtype = server_cpu_dtype()
    out.phases.append(
        record(run_baseline(bench.model_dir, workload, s.warmup, s.duration, dtype, sorted_rounds=False))
    )
    gc.collect()
    with serving(bench, out, "tiny", []) as server:
        connect, processes = grpc_sender(server.target, s.request_timeout), server_processes(server)
        for clients in s.clients:
            out.phases.append(
                measure("server", workload, connect, s, processes, server=server, clients=clients)
            )
    base = out.phases[0]
    out.notes["ratios"] = {
        f"server {p.load} / baseline pairs/s": ratio(p.pairs_per_s, base.pairs_per_s) for p in out.phases[1:]
    }
    return out


def frontend(bench: Bench) -> Outcome:
    """`--scorer null`: the workers cost nothing, so what is left is the front-end's own CPU per
    pair; then py-spy (if installed) says where it goes."""
    s = bench.settings
    out = bench.outcome("frontend")
    workload = bench.workload("uniform")
    with serving(bench, out, "frontend", ["--scorer", "null"]) as server:
        connect, processes = grpc_sender(server.target, s.request_timeout), server_processes(server)
        clients = s.frontend_clients
        phase = measure(
            "server, null scorer", workload, connect, s, processes, server=server, clients=clients
        )
        out.phases.append(phase)
        if s.profile_seconds > 0:
            out.notes["profile"] = profile_front_end(bench, server, workload, connect)
    pairs = phase.pairs_per_s * phase.seconds
    per_1000 = 1000 * phase.cpu_seconds["front-end"] / pairs if pairs else None
    window_cpu = cores() * phase.seconds
    out.notes["cpu_share_of_machine"] = {
        key: round(value / window_cpu, 3) for key, value in phase.cpu_seconds.items()
    }
    out.notes["front_end_cpu_s_per_1000_pairs"] = None if per_1000 is None else round(per_1000, 4)
    out.targets = [target("front-end CPU s per 1000 pairs (null scorer)", per_1000, "<=", 0.1)]
    return out


def profile_front_end(
    bench: Bench, server: ServerProcess, workload: Workload, connect: Connect
) -> dict[str, object]:
    """py-spy on the front-end under the same load, after the measured window (it costs CPU)."""
    s = bench.settings
    raw = bench.scratch / "frontend-profile.txt"
    spy = start_profile(server.process.pid, s.profile_seconds, raw)
    if spy is None:
        return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    log(f"frontend: py-spy for {s.profile_seconds:g} s under the same load")
    try:
        closed_loop(connect, workload.request, s.frontend_clients, 0.0, s.profile_seconds + 1)
        _, stderr = spy.communicate(timeout=60)
    finally:
        if spy.poll() is None:  # the load failed, or py-spy hangs: never leave it running
            spy.kill()
            spy.wait(10)
    if spy.returncode != 0 or not raw.exists():
        return {"skipped": f"py-spy failed ({spy.returncode}): {stderr.decode(errors='replace')[-300:]}"}
    return {"seconds": s.profile_seconds} | group(raw.read_text())


def devices(bench: Bench) -> Outcome:
    """Simulated devices (a sleep per padded token, no CPU): does the front-end keep N busy?"""
    s = bench.settings
    out = bench.outcome("devices")
    workload = bench.workload("uniform")
    rates: dict[int, float] = {}
    for replicas in s.device_replicas:
        flags = [
            "--scorer", "simulated", "--simulated-us-per-token", f"{s.simulated_us_per_token:g}",
            "--devices", "cpu", "--cpu-replicas", str(replicas),
        ]  # fmt: skip
        with serving(bench, out, f"devices-{replicas}", flags) as server:
            connect, processes = grpc_sender(server.target, s.request_timeout), server_processes(server)
            clients = s.clients_per_device * replicas
            setup = f"server, {replicas} simulated devices"
            phase = measure(setup, workload, connect, s, processes, server=server, clients=clients)
        out.phases.append(phase)
        rates[replicas] = phase.pairs_per_s
    padded = [p.batches.get("padded_tokens_per_pair") for p in out.phases if p.batches]
    if padded and padded[0]:
        out.notes["ideal_pairs_per_s_per_device"] = round(1e6 / (s.simulated_us_per_token * padded[0]), 1)
    scaling = {n: ratio(rate, n * rates[1]) if 1 in rates else None for n, rate in rates.items()}
    out.notes["scaling"] = scaling
    out.targets = [
        target(f"{n} simulated devices: pairs/s / ({n} x 1 device)", share, ">=", 0.9)
        for n, share in scaling.items()
        if n > 1
    ]
    return out


class _Cancelled(Exception):
    """Raised from on_scored to cancel the stream."""


class StreamLoad:
    """One StreamRerank of many mixed passages in a thread of its own, cancelled on request."""

    def __init__(self, target: str, query: str, documents: Iterator[str], timeout: float) -> None:
        self.scored = 0
        self.outcome = "running"
        self._stop = threading.Event()

        def on_scored(batch: list[RankedDocument]) -> None:
            self.scored += len(batch)
            if self._stop.is_set():
                raise _Cancelled

        def run() -> None:
            try:
                with RerankerClient(target, retry=None, timeout=timeout) as client:
                    client.stream_rerank(query, documents, top_n=STREAM_TOP_N, on_scored=on_scored)
                self.outcome = "finished"
            except _Cancelled:
                self.outcome = "cancelled"
            except Exception as exc:
                self.outcome = f"failed: {type(exc).__name__}: {exc}"

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def wait_started(self, timeout: float) -> None:
        wait_until(lambda: self.scored > 0 or self.outcome != "running", timeout, "the stream's first scores")

    def cancel(self, timeout: float = 60) -> float:
        """Cancel at the next scores (the call is cancelled under the client); seconds it took."""
        started = time.perf_counter()
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the stream did not end within {timeout} s of its cancel")
        return time.perf_counter() - started


def interactive(bench: Bench) -> Outcome:
    """Interactive Rerank latency alone, then beside a long StreamRerank (bulk work that must yield)."""
    s = bench.settings
    out = bench.outcome("interactive")
    workload = bench.workload("mixed")
    documents = stream_documents(bench.counter, s.stream_documents, s.seed + 7)
    with serving(bench, out, "interactive", []) as server:
        connect = grpc_sender(server.target, s.request_timeout)
        processes = server_processes(server)
        front_end = server.process.pid
        alone = measure(
            "interactive Rerank, alone", workload, connect, s, processes, server=server, clients=1
        )
        rss_before = proc_memory_mib(front_end).get("VmRSS", 0.0)
        log(f"interactive: a StreamRerank of {s.stream_documents} mixed passages in another thread")
        stream = StreamLoad(server.target, workload.queries[0], documents, timeout=3600)
        stream.wait_started(120)
        scored_before, started = stream.scored, time.perf_counter()
        time.sleep(s.duration)  # the stream alone, for its own pace
        stream_alone = (stream.scored - scored_before) / (time.perf_counter() - started)
        scored_before, started = stream.scored, time.perf_counter()
        loaded = measure(
            "interactive Rerank, beside a stream", workload, connect, s, processes, server=server, clients=1
        )
        stream_rate = (stream.scored - scored_before) / (time.perf_counter() - started)
        memory = proc_memory_mib(front_end)
        cancel_s = stream.cancel()
        with RerankerClient(server.target, retry=None, timeout=10) as client:
            health_after = client.health()
    out.phases += [alone, loaded]
    growth = memory.get("VmHWM", 0.0) - rss_before
    out.notes.update(
        {
            "stream": {
                "documents": s.stream_documents,
                "scored": stream.scored,
                "pairs_per_s_alone": round(stream_alone, 1),
                "pairs_per_s_beside_interactive": round(stream_rate, 1),
                "outcome": stream.outcome,
                "cancel_seconds": round(cancel_s, 2),
                "health_after_cancel": health_after,
            },
            "front_end_rss_mib": {
                "before_stream": round(rss_before, 1),
                "peak": round(memory.get("VmHWM", 0.0), 1),
                "at_window_end": round(memory.get("VmRSS", 0.0), 1),
            },
        }
    )
    out.targets = [
        target("interactive p50 beside a stream / alone", ratio(p50(loaded), p50(alone)), "<=", 1.5),
        target("stream pairs/s meanwhile (keeps progressing)", stream_rate, ">=", 1.0),
        target("front-end RSS growth while streaming, MiB", growth, "<=", RSS_GROWTH_BOUND_MIB),
    ]
    return out


def bf16(bench: Bench) -> Outcome:
    """In-process, real weights: float32 against bfloat16 logits per request, and their speeds."""
    s = bench.settings
    out = bench.outcome("bf16")
    model_dir = build_real_minilm(bench.scratch / "all-minilm-l6-v2-cross-encoder", seed=0)
    workload = bench.workload("mixed", blocks=s.bf16_requests)
    log(f"bf16: {s.bf16_requests} mixed requests, float32 then bfloat16 (real all-MiniLM-L6-v2 weights)")
    full, full_rate = score_all(model_dir, "float32", workload, s.bf16_requests)
    half, half_rate = score_all(model_dir, "bfloat16", workload, s.bf16_requests)
    figures = compare(full, half)
    out.notes.update(
        {
            "comparison": figures,
            "float32_pairs_per_s": round(full_rate, 1),
            "bfloat16_pairs_per_s": round(half_rate, 1),
            "bfloat16_over_float32_throughput": round(half_rate / full_rate, 3),
            "server_cpu_dtype": server_cpu_dtype(),
        }
    )
    n = figures["requests"]
    out.targets = [
        target(f"bf16: requests with the float32 top-1 (of {n})", figures["top1_same"], ">=", n),
        target("bf16: least top-10 overlap with float32 (of 10)", figures["top10_overlap_min"], ">=", 9),
    ]
    log(f"  {figures}; bfloat16/float32 pairs/s {out.notes['bfloat16_over_float32_throughput']}")
    return out


def http(bench: Bench) -> Outcome:
    """The same workloads through gRPC and through the HTTP/JSON API (POST /v2/rerank) of one server
    at its defaults, phase by phase: what the HTTP edge costs a client in latency and throughput and
    the front-end in CPU; then under `--scorer null`, where the front-end's own cost is all there is
    (uniform requests, and tiny ones, where the cost per request dominates)."""
    s = bench.settings
    out = bench.outcome("http")
    loads = [(name, clients) for name in s.http_workloads for clients in s.clients]
    out.phases += both_protocols(bench, out, ("http", "server"), [], loads)
    null_loads = [("uniform", s.frontend_clients), ("tiny", s.frontend_clients)]
    null = ("http-null", "server, null scorer")
    out.phases += both_protocols(bench, out, null, ["--scorer", "null"], null_loads)
    out.notes["http_against_grpc"] = compare_protocols(out.phases)
    return out


def both_protocols(
    bench: Bench, out: Outcome, names: tuple[str, str], flags: list[str], loads: list[tuple[str, int]]
) -> list[Phase]:
    """A server with `flags` (named: its log, its phases' setup); each (workload, clients) load
    through gRPC, then through HTTP."""
    s = bench.settings
    name, setup = names
    phases = []
    with serving(bench, out, name, flags) as server:
        with RerankerClient(server.target, retry=None, timeout=10) as client:
            model = client.list_models()[0].name
        drivers = {
            "gRPC": grpc_sender(server.target, s.request_timeout),
            "HTTP": http_sender(server.http_url, model, s.request_timeout),
        }
        processes = server_processes(server)
        for workload_name, clients in loads:
            workload = bench.workload(workload_name)
            out.notes[f"workload_{workload_name}"] = workload.facts()
            for protocol, connect in drivers.items():
                phase = measure(
                    f"{setup}, {protocol}", workload, connect, s, processes, server=server, clients=clients
                )
                phases.append(phase)
    return phases


def per_1000_pairs(phase: Phase, process: str) -> float | None:
    """A process's CPU seconds in the window per 1000 pairs scored in it."""
    pairs = phase.pairs_per_s * phase.seconds
    return round(1000 * phase.cpu_seconds[process] / pairs, 4) if pairs else None


# The figures set side by side for each protocol, in the comparison's columns.
PROTOCOL_FIGURES: dict[str, Callable[[Phase], float | None]] = {
    "pairs/s": lambda p: p.pairs_per_s,
    "p50 ms": lambda p: p.latency_ms.get("p50"),
    "p99 ms": lambda p: p.latency_ms.get("p99"),
    "front-end CPU s/1000 pairs": lambda p: per_1000_pairs(p, "front-end"),
    "client CPU s/1000 pairs": lambda p: per_1000_pairs(p, "benchmark"),
}


def compare_protocols(phases: list[Phase]) -> list[dict[str, object]]:
    """One row per setup, workload and load measured over both protocols (phases "<setup>, gRPC"
    and "<setup>, HTTP"): each figure for gRPC and HTTP side by side, and HTTP's throughput as a
    share of gRPC's."""
    by_key = {(p.setup, p.workload, p.load): p for p in phases}
    rows: list[dict[str, object]] = []
    for (setup, workload, load), grpc in by_key.items():
        base, _, protocol = setup.rpartition(", ")
        http_phase = by_key.get((f"{base}, HTTP", workload, load))
        if protocol != "gRPC" or http_phase is None:
            continue
        row: dict[str, object] = {"setup": base, "workload": workload, "load": load}
        for figure, of in PROTOCOL_FIGURES.items():
            row |= {f"{figure} gRPC": of(grpc), f"{figure} HTTP": of(http_phase)}
        row["HTTP / gRPC pairs/s"] = ratio(http_phase.pairs_per_s, grpc.pairs_per_s)
        rows.append(row)
    return rows


SCENARIOS: dict[str, Callable[[Bench], Outcome]] = {
    "throughput": throughput,
    "tiny": tiny,
    "frontend": frontend,
    "devices": devices,
    "interactive": interactive,
    "bf16": bf16,
    "http": http,
}
# What a run without --scenarios measures: the HTTP comparison only when asked for.
DEFAULT_SCENARIOS = [name for name in SCENARIOS if name != "http"]
