"""Which worker processes to start, on which device, with which dtype and threads.

Pure planning, so it is tested on any machine: GPU discovery is injected.
A GPU worker sees only its own GPU (CUDA_VISIBLE_DEVICES set before CUDA
starts), so inside the worker it is always "cuda:0".
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaPlan:
    device: str  # what the server reports: "cpu" or "cuda:<physical id>"
    torch_device: str  # what the worker passes to torch: "cpu" or "cuda:0"
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES for the worker (None: leave as is)
    dtype: str
    threads: int  # torch intra-op threads (0: torch's default)

    def worker_environment(self) -> dict[str, str]:
        """Variables a worker sets before importing torch."""
        env = {}
        if self.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.visible_devices
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
            env["MKL_NUM_THREADS"] = str(self.threads)
        return env


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """Ids of the GPUs this process may use, without starting CUDA in the front-end."""
    environ = os.environ if environ is None else environ
    declared = environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return [d.strip() for d in declared.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:
        return []
    return [line.strip() for line in listing.stdout.splitlines() if line.strip()]


# CPU flags of native bfloat16 matrix instructions (Intel AMX, Intel/AMD AVX512-BF16): with them
# torch runs a bfloat16 model about 2-3x as fast as a float32 one; without them bfloat16 is slower.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The flags of this CPU (or of the given /proc/cpuinfo text); empty where none are listed."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as file:
                cpuinfo = file.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the given /proc/cpuinfo text) has native bfloat16 matrix units."""
    return not NATIVE_BF16_FLAGS.isdisjoint(cpu_flags(cpuinfo))


def cpu_dtype(dtype: str, native_bf16: bool) -> str:
    """What a dtype setting means on the CPU: auto is bfloat16 with native bfloat16 units, else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16 else "float32"


CGROUP_ROOT = "/sys/fs/cgroup"


def usable_cpus(cgroup_root: str = CGROUP_ROOT, affinity: int | None = None) -> int:
    """CPUs this process may really use: its affinity, capped by a cgroup CPU quota (a container's
    --cpus), rounded up; os.cpu_count() counts the host's, which oversubscribes a container."""
    cpus = len(os.sched_getaffinity(0)) if affinity is None else affinity
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: str) -> float | None:
    """The CPU quota in CPUs from cgroup v2 (cpu.max) or v1 (cpu.cfs_quota_us), None if unlimited."""
    try:
        with open(os.path.join(root, "cpu.max")) as file:
            quota, _, period = file.read().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as file:
            quota_us = int(file.read().strip())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as file:
            period_us = int(file.read().strip())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def plan_replicas(
    devices: str,
    *,
    cpu_replicas: int,
    threads_per_replica: int,
    dtype: str,
    gpus: list[str],
    cpu_count: int,
    gpu_dtype: str = "float16",
    cpu_bf16: bool = False,
) -> list[ReplicaPlan]:
    """One plan per worker process of one model. dtype "auto" is gpu_dtype (the family's usual one)
    on a GPU, and on the CPU bfloat16 where it has native bfloat16 units (cpu_bf16), else float32.
    Raises ValueError for a devices setting that cannot be met."""
    choice = devices.strip().lower()
    if choice == "auto":
        chosen = gpus
    elif choice == "cpu":
        chosen = []
    elif choice == "cuda":
        if not gpus:
            raise ValueError("devices=cuda but no GPU is visible")
        chosen = gpus
    else:
        chosen = [d.strip().removeprefix("cuda:") for d in choice.split(",") if d.strip()]
        unknown = [d for d in chosen if d not in gpus]
        if unknown:
            raise ValueError(
                f"GPU(s) {', '.join(unknown)} not visible (visible: {', '.join(gpus) or 'none'})"
            )
    if chosen:
        chosen_dtype = gpu_dtype if dtype == "auto" else dtype
        return [ReplicaPlan(f"cuda:{gpu}", "cuda:0", gpu, chosen_dtype, 0) for gpu in chosen]
    threads = threads_per_replica or max(1, cpu_count // cpu_replicas)
    chosen_dtype = cpu_dtype(dtype, cpu_bf16)
    return [ReplicaPlan("cpu", "cpu", "", chosen_dtype, threads) for _ in range(cpu_replicas)]
