"""Settings: defaults, RERANK_* environment, flags over environment, --help listing every setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from rerank_server.settings import DEFAULT_MODEL, ModelChoice, ServerSettings

SERVER_SCRIPT = Path(sys.executable).with_name("rerank-server")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RERANK_"):
            monkeypatch.delenv(name)


def test_defaults_serve_the_embedded_model() -> None:
    settings = ServerSettings.from_args([])
    assert settings.models() == [ModelChoice(DEFAULT_MODEL, DEFAULT_MODEL, "auto")]
    assert (settings.port, settings.devices, settings.dtype) == (50051, "auto", "auto")


def test_environment_is_read_with_the_rerank_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_MODEL", "BAAI/bge-reranker-v2-m3")
    monkeypatch.setenv("RERANK_PORT", "6000")
    monkeypatch.setenv("RERANK_MAX_BATCH_TOKENS", "8192")
    settings = ServerSettings.from_args([])
    assert (settings.model, settings.port, settings.max_batch_tokens) == (
        ["BAAI/bge-reranker-v2-m3"],
        6000,
        8192,
    )


def test_several_models_from_the_environment_and_from_repeated_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_MODEL", "m3=BAAI/bge-reranker-v2-m3, qwen=Qwen/Qwen3-Reranker-0.6B")
    assert ServerSettings.from_args([]).models() == [
        ModelChoice("m3", "BAAI/bge-reranker-v2-m3", "auto"),
        ModelChoice("qwen", "Qwen/Qwen3-Reranker-0.6B", "auto"),
    ]
    flags = ["--model", "a=/models/a", "--model", "/models/b", "--family", "cross-encoder,qwen3-reranker"]
    assert ServerSettings.from_args(flags).models() == [
        ModelChoice("a", "/models/a", "cross-encoder"),
        ModelChoice("/models/b", "/models/b", "qwen3-reranker"),
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "a=x", "--model", "a=y"], "names repeat"),
        (["--model", "=x"], r"expected \[NAME=\]SOURCE"),
        (["--model", "x", "--family", "auto,auto"], "2 families for 1 models"),
    ],
)
def test_model_settings_that_cannot_be_met_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerSettings.from_args(flags).models()


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_PORT", "6000")
    monkeypatch.setenv("RERANK_CPU_REPLICAS", "4")
    monkeypatch.setenv("RERANK_MODEL", "from-env")
    settings = ServerSettings.from_args(["--port", "7000", "--model", "m3=BAAI/bge-reranker-v2-m3"])
    assert settings.port == 7000
    assert settings.cpu_replicas == 4
    assert [choice.name for choice in settings.models()] == ["m3"]


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        ServerSettings(cpu_replicas=0)
    with pytest.raises(ValidationError):
        ServerSettings(dtype="float8")


def test_help_lists_every_setting_with_its_default() -> None:
    wide = {**os.environ, "COLUMNS": "1000"}  # no line wrapping inside a default
    shown = subprocess.run(
        [str(SERVER_SCRIPT), "--help"], capture_output=True, text=True, timeout=60, env=wide
    )
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    for name, field in ServerSettings.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert f"(default: {field.default})".replace(" ", "") in text.replace(" ", "")


def test_a_bad_model_exits_with_a_clear_message(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "rerank_server", "--model", str(tmp_path / "missing"), "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 2
    assert "cannot serve model" in ran.stderr
