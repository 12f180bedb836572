"""What the machine is, and what its processes use, read from /proc.

Why /proc: a process's CPU seconds and peak RSS are the kernel's own accounting, the same for the
server's processes and this one, with nothing to install in the server.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPU_FLAGS_OF_INTEREST = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def cores() -> int:
    """The cores this process may run on (what torch and the server's defaults use)."""
    return len(os.sched_getaffinity(0))


def proc_memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the kernel's peak RSS) of a process, in MiB; empty when it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def reset_peak_rss(pid: int) -> bool:
    """Restart the kernel's peak RSS (VmHWM) of a process at its RSS now, so the next reading is
    the peak of what happens from here; False when it is gone or not ours."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def proc_open_fds(pid: int) -> int | None:
    """File descriptors a process holds open; None when it is gone or not ours."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def proc_threads(pid: int) -> int | None:
    """Threads of a process; None when it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, rest = line.partition(":")
        if key == "Threads":
            return int(rest)
    return None


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads); None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot, to see how much others used during a window."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def alive(pid: int) -> bool:
    """Running (a zombie is not): what "no worker left" means after a shutdown."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def command_line(pid: int) -> str | None:
    """A process's command line with spaces between arguments; None when it is gone."""
    try:
        return (Path(f"/proc/{pid}/cmdline")).read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def children(pid: int) -> list[tuple[int, str]]:
    """Direct children of `pid` with their command lines."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        cmdline = command_line(int(entry.name))
        if parent == pid and cmdline is not None:
            found.append((int(entry.name), cmdline))
    return sorted(found)


def cpu_facts() -> dict[str, Any]:
    """The CPU model and the flags that decide the dtype and speed (AVX-512, bfloat16, AMX)."""
    from rerank_server.workers.devices import cpu_flags

    cpuinfo = ""
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
    model = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
            break
    flags = cpu_flags(cpuinfo)
    return {"cpu_model": model, "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags]}


def machine_facts() -> dict[str, Any]:
    """Everything a reader needs to compare this run with another machine's."""
    import tokenizers
    import torch
    import transformers
    from rerank_server.workers.devices import cpu_has_native_bf16

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        **cpu_facts(),
        "native_bf16": cpu_has_native_bf16(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "loadavg": list(os.getloadavg()),
    }
