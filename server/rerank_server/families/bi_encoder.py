"""Bi-encoders (sentence-transformers models with mean pooling, e.g. all-MiniLM-L6-v2): a pair's score
is the cosine similarity of the query's and the document's mean-pooled embeddings.

Row layout: the query with the tokenizer's single-sequence specials, then the document with them,
e.g. `[CLS] q [SEP] [CLS] d [SEP]`; token_type_ids are 0 on the query part and 1 on the document
part, which is how the scorer splits the row again (the model itself sees each part alone). Each
part is cut to max_length on its own, so a row holds up to 2 * max_length tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rerank_server.families.base import (
    Family,
    IntArray,
    ModelFiles,
    ModelSpec,
    ScoreArray,
    TokenBatch,
)
from rerank_server.families.loading import (
    DEFAULT_MAX_LENGTH,
    PADDING_OFFSET_TYPES,
    SpecialLayout,
    load_tokenizer,
    model_file,
    position_limit,
    read_json,
)
from rerank_server.families.template import PairTemplate, as_ids

if TYPE_CHECKING:
    import torch

NAME = "bi-encoder"

# Bare encoders accepted as bi-encoders without a sentence-transformers config.
_ENCODER_TYPES = frozenset(
    {"bert", "distilbert", "albert", "electra", "mpnet", "deberta", "deberta-v2", "modernbert"}
    | PADDING_OFFSET_TYPES
)
# Pooling modes a sentence-transformers Pooling config may name, old and new style.
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_SUPPORTED_MODULES = frozenset({"Transformer", "Pooling", "Normalize"})


def is_bi_encoder(files: ModelFiles) -> bool:
    """A sentence-transformers model, or a bare encoder (`*Model`) of a known encoder type."""
    if model_file(files.source, "modules.json") or model_file(files.source, "sentence_bert_config.json"):
        return True
    architectures = files.architectures
    return files.config.get("model_type") in _ENCODER_TYPES and all(
        a.endswith("Model") for a in architectures
    )


def describe_bi_encoder(files: ModelFiles) -> ModelSpec:
    _check_sentence_transformers_modules(files.source, read_json(files.source, "modules.json") or [])
    tokenizer, pad_token_id = load_tokenizer(files.source)
    limit = position_limit(files.config)
    return ModelSpec(
        source=files.source,
        family=NAME,
        default_max_length=min(_default_length(files.source), limit),
        max_length_limit=limit,
        min_max_length=SpecialLayout(tokenizer, pair=False).special_tokens + 1,
        pad_token_id=pad_token_id,
        row_factor=2,
        token_columns=("token_type_ids",),
    )


def _check_sentence_transformers_modules(source: str, modules: list[dict[str, Any]]) -> None:
    """Accept only Transformer -> mean Pooling (-> Normalize): the scorer computes exactly that."""
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _SUPPORTED_MODULES:
            raise ValueError(f"{source!r} has a sentence-transformers {kind} module; not supported yet")
        if kind == "Pooling":
            folder = module.get("path") or ""
            pooling = read_json(source, f"{folder}/config.json" if folder else "config.json") or {}
            modes = pooling.get("pooling_mode") or [
                mode for flag, mode in _POOLING_FLAGS.items() if pooling.get(flag)
            ]
            if modes not in ("mean", ["mean"]):
                raise ValueError(f"{source!r} pools with {modes!r}; only mean pooling is supported yet")


def _default_length(source: str) -> int:
    """sentence-transformers' max_seq_length: the legacy config key, else the tokenizer's model_max_length
    (where newer sentence-transformers releases keep it), else 512."""
    settings = read_json(source, "sentence_bert_config.json") or {}
    if isinstance(settings.get("max_seq_length"), int):
        return settings["max_seq_length"]
    if model_file(source, "modules.json") is not None:
        model_max_length = (read_json(source, "tokenizer_config.json") or {}).get("model_max_length")
        if isinstance(model_max_length, int):
            return model_max_length
    return DEFAULT_MAX_LENGTH


class BiEncoderRows(PairTemplate):
    """Tokenizes query and documents in the front-end, each as sentence-transformers would alone."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._layout = SpecialLayout(self.tokenizer, pair=False)

    def query_limit(self, max_length: int, query_length: int, document_length: int) -> int:
        return max_length - self._layout.special_tokens

    def room(self, query_ids: list[int], max_length: int) -> int:
        return max_length - self._layout.special_tokens  # the document is embedded alone

    def assemble(self, query_ids: list[int], document_ids: list[int]) -> dict[str, IntArray]:
        query_row, _ = self._layout.apply((query_ids,))
        document_row, _ = self._layout.apply((document_ids,))
        return {
            "input_ids": as_ids(query_row + document_row),
            "token_type_ids": as_ids([0] * len(query_row) + [1] * len(document_row)),
        }

    def normalize(self, raw: ScoreArray) -> ScoreArray:
        """Cosine mapped linearly onto [0, 1] (clamped: rounding can push it past +-1)."""
        return np.clip((np.asarray(raw, dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)


class BiEncoderScorer:
    """Runs AutoModel on the query and document parts of the rows; each distinct query once per batch."""

    def __init__(self, spec: ModelSpec, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModel

        self._device = torch.device(device)
        model = AutoModel.from_pretrained(spec.source, trust_remote_code=False, dtype=getattr(torch, dtype))
        self._model = model.to(self._device).eval()
        self._pad_token_id = spec.pad_token_id

    def score(self, batch: TokenBatch) -> ScoreArray:
        """Cosine similarity of each row's query and document embeddings, as float32."""
        queries: dict[tuple[int, ...], int] = {}
        query_of_row = []
        documents = []
        ends = np.cumsum(batch.lengths)
        for end, length in zip(ends.tolist(), batch.lengths.tolist(), strict=True):
            ids = batch.tokens["input_ids"][end - length : end]
            types = batch.tokens["token_type_ids"][end - length : end]
            query = tuple(ids[types == 0].tolist())
            query_of_row.append(queries.setdefault(query, len(queries)))
            documents.append(ids[types == 1].tolist())
        query_embeddings = self._embed(list(queries))[query_of_row]
        document_embeddings = self._embed(documents)
        return (query_embeddings * document_embeddings).sum(dim=-1).cpu().numpy()

    def _embed(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """L2-normalized mean of the last hidden states over each row's tokens (right-padded batch)."""
        import torch

        width = max([1, *(len(row) for row in rows)])  # a row may have no tokens at all
        ids = np.full((len(rows), width), self._pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for position, row in enumerate(rows):
            ids[position, : len(row)] = row
            mask[position, : len(row)] = 1
        ids_tensor = torch.from_numpy(ids).to(self._device)
        mask_tensor = torch.from_numpy(mask).to(self._device)
        with torch.inference_mode():
            hidden = self._model(input_ids=ids_tensor, attention_mask=mask_tensor).last_hidden_state.float()
            weights = mask_tensor.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)


FAMILY = Family(
    name=NAME,
    detect=is_bi_encoder,
    describe=describe_bi_encoder,
    row_builder=BiEncoderRows,
    scorer=BiEncoderScorer,
    gpu_dtype="float16",
)
