"""Model families behind one interface: describe a model, load its tokenizer half, load its weights half.

describe_model and load_encoder run in the front-end and never import torch; load_scorer runs in
the workers and is the only entry point that does.
"""

from __future__ import annotations

from rerank_server.models.base import DEFAULT_MODEL, ModelSpec, PairEncoder, PairScorer
from rerank_server.models.bi_encoder import BiEncoderEncoder, BiEncoderScorer
from rerank_server.models.cross_encoder import CrossEncoderEncoder, CrossEncoderScorer
from rerank_server.models.loading import describe_model

__all__ = ["DEFAULT_MODEL", "describe_model", "load_encoder", "load_scorer"]

DTYPES = ("float32", "float16", "bfloat16")


def load_encoder(spec: ModelSpec) -> PairEncoder:
    """The tokenizer half of the model's family."""
    if spec.family == "cross-encoder":
        return CrossEncoderEncoder(spec)
    if spec.family == "bi-encoder":
        return BiEncoderEncoder(spec)
    raise ValueError(f"unknown model family {spec.family!r}")


def load_scorer(spec: ModelSpec, device: str, dtype: str) -> PairScorer:
    """The weights half of the model's family, on `device` (a torch device string) in `dtype`."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    if spec.family == "cross-encoder":
        return CrossEncoderScorer(spec, device, dtype)
    if spec.family == "bi-encoder":
        return BiEncoderScorer(spec, device, dtype)
    raise ValueError(f"unknown model family {spec.family!r}")
