"""Device planning and worker pinning, on any machine (GPU discovery is injected)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rerank_server.workers.devices import (
    ReplicaPlan,
    cpu_has_native_bf16,
    plan_replicas,
    usable_cpus,
    visible_gpus,
)


def plan(devices: str, gpus: list[str], **kwargs: object) -> list[ReplicaPlan]:
    options = {"cpu_replicas": 1, "threads_per_replica": 0, "dtype": "auto", "cpu_count": 8, **kwargs}
    return plan_replicas(devices, gpus=gpus, **options)  # type: ignore[arg-type]


def test_auto_takes_every_visible_gpu_one_worker_each_in_float16() -> None:
    plans = plan("auto", ["0", "1", "3"])
    assert [p.device for p in plans] == ["cuda:0", "cuda:1", "cuda:3"]
    assert all(p.torch_device == "cuda:0" for p in plans)  # each worker sees only its own GPU
    assert [p.worker_environment()["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "1", "3"]
    assert {p.dtype for p in plans} == {"float16"}


def test_auto_without_gpus_is_the_cpu_in_float32_with_threads_shared() -> None:
    plans = plan("auto", [], cpu_replicas=2)
    assert [(p.device, p.torch_device, p.dtype, p.threads) for p in plans] == [
        ("cpu", "cpu", "float32", 4)
    ] * 2
    env = plans[0].worker_environment()
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU worker never touches a GPU


def test_explicit_choices() -> None:
    assert [p.device for p in plan("1", ["0", "1"])] == ["cuda:1"]
    assert [p.device for p in plan("cuda:0,cuda:1", ["0", "1"])] == ["cuda:0", "cuda:1"]
    assert [p.device for p in plan("cpu", ["0"], cpu_replicas=3)] == ["cpu"] * 3
    assert plan("cuda", ["0"], dtype="bfloat16")[0].dtype == "bfloat16"
    assert plan("cpu", [], cpu_replicas=3, threads_per_replica=1)[0].threads == 1


def test_impossible_choices_are_refused() -> None:
    with pytest.raises(ValueError, match="no GPU is visible"):
        plan("cuda", [])
    with pytest.raises(ValueError, match="not visible"):
        plan("2", ["0", "1"])


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def _torch_imported_before_pinning() -> None:
    import sys

    import rerank_server.workers.worker  # noqa: F401 - what a spawned worker unpickles first

    sys.exit(1 if "torch" in sys.modules else 0)


def test_a_spawned_worker_has_not_imported_torch_when_it_pins_its_device() -> None:
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=_torch_imported_before_pinning)
    process.start()
    process.join(120)
    assert process.exitcode == 0


def test_dtype_auto_is_the_familys_usual_dtype_on_a_gpu_and_float32_on_the_cpu() -> None:
    assert {p.dtype for p in plan("auto", ["0", "1"], gpu_dtype="bfloat16")} == {"bfloat16"}
    assert plan("auto", [], gpu_dtype="bfloat16")[0].dtype == "float32"
    assert plan("cuda", ["0"], dtype="float16", gpu_dtype="bfloat16")[0].dtype == "float16"


def test_dtype_auto_is_bfloat16_on_a_cpu_with_native_bfloat16_units_unless_float32_is_asked() -> None:
    assert plan("cpu", [], cpu_bf16=True)[0].dtype == "bfloat16"
    assert plan("cpu", [], cpu_bf16=True, dtype="float32")[0].dtype == "float32"
    assert plan("auto", ["0"], cpu_bf16=True)[0].dtype == "float16"  # a GPU keeps its own


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
flags\t\t: fpu sse2 avx2 avx512f {extra}
bugs\t\t: spectre_v1
"""


@pytest.mark.parametrize(
    ("extra", "native"),
    [("amx_bf16 amx_tile", True), ("avx512_bf16", True), ("avx512bw avx512_vnni", False), ("", False)],
)
def test_native_bfloat16_is_read_from_the_cpu_flags(extra: str, native: bool) -> None:
    assert cpu_has_native_bf16(CPUINFO.format(vendor="GenuineIntel", extra=extra)) is native


def test_no_flags_line_means_no_native_bfloat16() -> None:
    assert cpu_has_native_bf16("processor\t: 0\nmodel name\t: some arm core\n") is False


def test_each_model_is_planned_on_every_gpu_in_its_familys_dtype(
    monkeypatch: pytest.MonkeyPatch, bert_cross_encoder_dir: Path, gemma_dir: Path
) -> None:
    """plan_models, as `serve` calls it before any worker starts: two GPUs made visible by
    CUDA_VISIBLE_DEVICES (no GPU is touched), one worker per GPU for each model."""
    from rerank_server.app import plan_models
    from rerank_server.settings import ServerSettings

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    settings = ServerSettings.from_args(
        ["--model", f"ce={bert_cross_encoder_dir}", "--model", f"llm={gemma_dir}"]
    )
    plans = {p.name: p for p in plan_models(settings)}
    assert {name: [(r.device, r.dtype) for r in p.replicas] for name, p in plans.items()} == {
        "ce": [("cuda:0", "float16"), ("cuda:1", "float16")],
        "llm": [("cuda:0", "bfloat16"), ("cuda:1", "bfloat16")],
    }
    assert (plans["ce"].spec.family, plans["llm"].spec.family) == ("cross-encoder", "bge-reranker-gemma")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_usable_cpus_follow_the_affinity_when_no_quota_is_set(tmp_path: Path) -> None:
    assert usable_cpus(str(tmp_path), affinity=6) == 6  # no cgroup files at all
    write(tmp_path / "cpu.max", "max 100000\n")
    assert usable_cpus(str(tmp_path), affinity=6) == 6


@pytest.mark.parametrize(
    ("cpu_max", "expected"), [("200000 100000", 2), ("150000 100000", 2), ("5000 100000", 1)]
)
def test_a_cgroup_v2_quota_caps_the_usable_cpus_rounded_up(
    tmp_path: Path, cpu_max: str, expected: int
) -> None:
    write(tmp_path / "cpu.max", cpu_max + "\n")
    assert usable_cpus(str(tmp_path), affinity=64) == expected
    assert usable_cpus(str(tmp_path), affinity=1) == 1  # the quota never raises the affinity


def test_a_cgroup_v1_quota_caps_the_usable_cpus(tmp_path: Path) -> None:
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "300000\n")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert usable_cpus(str(tmp_path), affinity=64) == 3
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")  # unlimited
    assert usable_cpus(str(tmp_path), affinity=64) == 64


def test_this_process_may_use_at_least_one_cpu_and_no_more_than_its_affinity() -> None:
    import os

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
