"""sentence-transformers cross-encoders (cross-encoder/ms-marco-MiniLM-L-6-v2 and kin): CrossEncoder.predict.

The same model and row layout as the cross-encoder family, but the pair is cut as the tokenizer's
longest_first truncation cuts it: tokens come off the longer of query and document until the pair
fits (so a long query may keep more than 3/4 of max_length beside a short document). The checkpoint
marks itself as one: `sbert_ce_default_activation_function` in config.json, or a
config_sentence_transformers.json beside a sequence classifier.
"""

from __future__ import annotations

from dataclasses import replace

from rerank_server.families.base import Family, ModelFiles, ModelSpec, RowOptions
from rerank_server.families.cross_encoder import (
    CrossEncoderRows,
    SequenceClassifierScorer,
    describe_cross_encoder,
    is_sequence_classifier,
)
from rerank_server.families.loading import model_file, read_json

NAME = "sentence-transformers-cross-encoder"


def is_st_cross_encoder(files: ModelFiles) -> bool:
    if not is_sequence_classifier(files):
        return False
    marked = "sbert_ce_default_activation_function" in files.config
    return marked or model_file(files.source, "config_sentence_transformers.json") is not None


def describe_st_cross_encoder(files: ModelFiles) -> ModelSpec:
    spec = describe_cross_encoder(files, NAME)
    # CrossEncoder's max_length: the tokenizer's model_max_length when the checkpoint sets one.
    model_max_length = (read_json(files.source, "tokenizer_config.json") or {}).get("model_max_length")
    if (
        isinstance(model_max_length, int)
        and spec.min_max_length <= model_max_length < spec.default_max_length
    ):
        return replace(spec, default_max_length=model_max_length)
    return spec


def longest_first(first: int, second: int, budget: int) -> tuple[int, int]:
    """How many tokens of each sequence the tokenizers library's longest_first truncation keeps."""
    if first + second <= budget:
        return first, second
    shorter, longer = sorted((first, second))
    longer = shorter if shorter > budget else max(shorter, budget - shorter)
    if shorter + longer > budget:
        shorter, longer = budget // 2, budget // 2 + budget % 2
    # An equal pair counts the first sequence as the shorter one.
    return (shorter, longer) if first <= second else (longer, shorter)


class STCrossEncoderRows(CrossEncoderRows):
    def query_limit(self, max_length: int, query_length: int, document_length: int) -> int:
        budget = max_length - self._layout.special_tokens
        return longest_first(query_length, document_length, budget)[0]

    def document_need(self, options: RowOptions, query_length: int) -> int:
        """longest_first keeps the same query tokens beside every document longer than both the
        budget and the query, so the rows need to know only that much of the document."""
        return max(super().document_need(options, query_length), query_length)


FAMILY = Family(
    name=NAME,
    detect=is_st_cross_encoder,
    describe=describe_st_cross_encoder,
    row_builder=STCrossEncoderRows,
    scorer=SequenceClassifierScorer,
    gpu_dtype="float16",
)
