"""What can be checked of the Dockerfile without a Docker engine."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    joined = DOCKERFILE.replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.split(None, 1)[:1] == [name]]


def test_it_builds_on_a_cuda_runtime_image() -> None:
    (base,) = instructions("FROM")
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-\S+", base)


def test_torch_is_pinned_before_the_project_is_installed() -> None:
    runs = instructions("RUN")
    torch_step = next(i for i, r in enumerate(runs) if "TORCH_SPEC" in r)
    project_step = next(i for i, r in enumerate(runs) if '".[server]"' in r)
    assert torch_step < project_step
    assert any(arg.startswith("TORCH_SPEC=torch==") for arg in instructions("ARG"))


def test_it_runs_as_a_non_root_user_with_a_model_cache_volume() -> None:
    (user,) = instructions("USER")
    assert user not in ("root", "0")
    assert instructions("VOLUME") == ['["/models"]']
    assert any("HF_HOME=/models" in env for env in instructions("ENV"))


def test_the_health_check_uses_the_grpc_health_service() -> None:
    (check,) = instructions("HEALTHCHECK")
    assert "rerank_client.healthcheck" in check
    assert (ROOT / "client" / "rerank_client" / "healthcheck.py").exists()


def test_every_copied_path_exists_and_the_entrypoint_is_the_server() -> None:
    for copy in instructions("COPY"):
        *sources, _target = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    assert instructions("ENTRYPOINT") == ['["rerank-server"]']
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
