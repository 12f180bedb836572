"""The registry of model families: detect a checkpoint's family, describe it, and load either half.

`describe_model` and `load_row_builder` run in the front-end and never import torch; `load_scorer`
runs in the workers and is the only entry point that does. Adding a family is adding its module and
one line in FAMILIES.
"""

from __future__ import annotations

from rerank_server.families import (
    bi_encoder,
    cross_encoder,
    gemma,
    minicpm_layerwise,
    mxbai,
    qwen3,
    st_cross_encoder,
)
from rerank_server.families.base import DEFAULT_MODEL, Family, ModelFiles, ModelSpec, RowBuilder, Scorer
from rerank_server.families.loading import read_config, resolve_source

__all__ = ["DEFAULT_MODEL", "FAMILIES", "describe_model", "family_of", "load_row_builder", "load_scorer"]

# In detection order: the first family whose detector accepts a checkpoint serves it.
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        st_cross_encoder.FAMILY,
        cross_encoder.FAMILY,
        gemma.FAMILY,
        qwen3.FAMILY,
        mxbai.FAMILY,
        minicpm_layerwise.FAMILY,
        bi_encoder.FAMILY,
    )
}
DTYPES = ("float32", "float16", "bfloat16")


def family_of(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}") from None


def describe_model(source: str, family: str = "auto") -> ModelSpec:
    """Tell the family and limits of a model from its config and tokenizer, without its weights.

    `family` "auto" detects it from the config (architecture, then name); a family name forces it.
    Raises ValueError for a model no family here can score.
    """
    chosen = None if family == "auto" else family_of(family)
    resolved = resolve_source(source)
    files = ModelFiles(resolved, read_config(resolved))
    if chosen is None:
        chosen = next((f for f in FAMILIES.values() if f.detect(files)), None)
    if chosen is None:  # the architecture cannot tell: the name may
        chosen = next((f for f in FAMILIES.values() if any(n in files.name for n in f.names)), None)
    if chosen is None:
        raise ValueError(
            f"{source!r} (architectures {files.architectures}, "
            f"model_type {files.config.get('model_type')!r}) "
            f"is not a supported reranker; supported families: {', '.join(FAMILIES)}. A checkpoint whose "
            "config does not tell its family can be served by naming the family"
        )
    return chosen.describe(files)


def load_row_builder(spec: ModelSpec) -> RowBuilder:
    """The tokenizer half of the model's family."""
    return family_of(spec.family).row_builder(spec)


def load_scorer(spec: ModelSpec, device: str, dtype: str) -> Scorer:
    """The weights half of the model's family, on `device` (a torch device string) in `dtype`."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    return family_of(spec.family).scorer(spec, device, dtype)
