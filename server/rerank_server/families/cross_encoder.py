"""Sequence-classification cross-encoders (bge-reranker-v2-m3, bge-reranker-large): FlagReranker's recipe.

Row layout: the tokenizer's pair template around the query and the document tokens, e.g.
`[CLS] q [SEP] d [SEP]` with token_type_ids 0 up to the first [SEP] and 1 after it (BERT), or
`<s> q </s></s> d </s>` (XLM-R, single token type). The query is cut to max_length * 3 // 4 tokens,
then only the document is cut so the row, specials included, fits max_length. Raw score: the
single logit; normalized: its sigmoid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rerank_server.families.base import (
    Family,
    IntArray,
    ModelFiles,
    ModelSpec,
    ScoreArray,
    TokenBatch,
    sigmoid,
)
from rerank_server.families.loading import (
    DEFAULT_MAX_LENGTH,
    SpecialLayout,
    load_tokenizer,
    position_limit,
)
from rerank_server.families.template import PairTemplate, as_ids

NAME = "cross-encoder"


def num_labels(config: Mapping[str, Any]) -> int:
    id2label = config.get("id2label")
    if isinstance(id2label, dict):
        return len(id2label)
    return int(config.get("num_labels", 2))  # transformers' default


def is_sequence_classifier(files: ModelFiles) -> bool:
    """A *ForSequenceClassification; one with several labels is refused when described."""
    return any(name.endswith("ForSequenceClassification") for name in files.architectures)


def describe_cross_encoder(files: ModelFiles, family: str = NAME) -> ModelSpec:
    labels = num_labels(files.config)
    if labels != 1:
        raise ValueError(
            f"{files.source!r} is a classifier with {labels} labels; a cross-encoder needs exactly one logit"
        )
    tokenizer, pad_token_id = load_tokenizer(files.source)
    specials = SpecialLayout(tokenizer, pair=True).special_tokens
    limit = position_limit(files.config)
    typed = int(files.config.get("type_vocab_size", 1)) > 1
    return ModelSpec(
        source=files.source,
        family=family,
        default_max_length=min(DEFAULT_MAX_LENGTH, limit),
        max_length_limit=limit,
        min_max_length=min_max_length(specials),
        pad_token_id=pad_token_id,
        # BERT-family models read token_type_ids (1 on the document); XLM-R has a single type.
        token_columns=("token_type_ids",) if typed else (),
    )


def min_max_length(pair_specials: int) -> int:
    """The least max_length at which a query cut to 3/4 of it still leaves the document one token."""
    max_length = pair_specials + 2
    while max_length - pair_specials - max_length * 3 // 4 < 1:
        max_length += 1
    return max_length


class CrossEncoderRows(PairTemplate):
    """Tokenizes pairs in the front-end; drives the Rust tokenizer directly (no torch, no transformers)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._layout = SpecialLayout(self.tokenizer, pair=True)

    def query_limit(self, max_length: int, query_length: int, document_length: int) -> int:
        return max_length * 3 // 4

    def room(self, query_ids: list[int], max_length: int) -> int:
        return max_length - self._layout.special_tokens - len(query_ids)

    def assemble(self, query_ids: list[int], document_ids: list[int]) -> dict[str, IntArray]:
        input_ids, token_type_ids = self._layout.apply((query_ids, document_ids))
        row = {"input_ids": as_ids(input_ids)}
        if self.spec.token_columns:
            row["token_type_ids"] = as_ids(token_type_ids)
        return row

    def normalize(self, raw: ScoreArray) -> ScoreArray:
        return sigmoid(raw)


class SequenceClassifierScorer:
    """Runs AutoModelForSequenceClassification on right-padded rows; the raw score is the single logit."""

    def __init__(self, spec: ModelSpec, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        self._device = torch.device(device)
        self._spec = spec
        model = AutoModelForSequenceClassification.from_pretrained(
            spec.source, trust_remote_code=False, dtype=getattr(torch, dtype)
        )
        self._model = model.to(self._device).eval()

    def score(self, batch: TokenBatch) -> ScoreArray:
        import torch

        def tensor(column: str, pad: int) -> torch.Tensor:
            return torch.from_numpy(batch.padded(column, pad)).to(self._device)

        inputs = {
            "input_ids": tensor("input_ids", self._spec.pad_token_id),
            "attention_mask": torch.from_numpy(batch.mask()).to(self._device, torch.long),
        }
        if "token_type_ids" in self._spec.token_columns:
            inputs["token_type_ids"] = tensor("token_type_ids", 0)
        with torch.inference_mode():
            logits = self._model(**inputs).logits
        return logits.view(-1).float().cpu().numpy()


FAMILY = Family(
    name=NAME,
    detect=is_sequence_classifier,
    describe=describe_cross_encoder,
    row_builder=CrossEncoderRows,
    scorer=SequenceClassifierScorer,
    gpu_dtype="float16",
)
