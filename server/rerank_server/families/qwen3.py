"""Qwen3-Reranker (Qwen3ForCausalLM, 0.6B/4B/8B): the model card's recipe, scored by "yes" against "no".

Row: the chat prefix, then the body `<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}`
cut from its end to max_length minus the template, then the suffix. The body is tokenized in two
pieces, up to `<Document>:` and from the space after it: the byte-level pre-tokenizer splits there
anyway, so the ids equal the reference's whole-string ones (a test compares them). Raw score:
logit("yes") - logit("no"), the log-odds of the reference's softmax; normalized: its sigmoid, which
equals softmax([no, yes])[1].
"""

from __future__ import annotations

from rerank_server.families.base import (
    Family,
    IntArray,
    ModelFiles,
    ModelSpec,
    RowOptions,
    ScoreArray,
    sigmoid,
)
from rerank_server.families.llm import BASELINE_OPTION, TOKEN_OPTION, TokenLogitScorer, has_architecture
from rerank_server.families.loading import load_tokenizer, position_limit, single_token, template_ids
from rerank_server.families.template import PairTemplate, as_ids

NAME = "qwen3-reranker"
PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_MAX_LENGTH = 8192


def describe_qwen3(files: ModelFiles) -> ModelSpec:
    tokenizer, pad_token_id = load_tokenizer(files.source)
    prefix_ids, suffix_ids = template_ids(tokenizer, PREFIX, SUFFIX)
    limit = position_limit(files.config)
    template = len(prefix_ids) + len(suffix_ids)
    return ModelSpec(
        source=files.source,
        family=NAME,
        default_max_length=min(DEFAULT_MAX_LENGTH, limit),
        max_length_limit=limit,
        min_max_length=template + 1,
        pad_token_id=pad_token_id,
        default_instruction=DEFAULT_INSTRUCTION,
        options={
            "prefix_ids": tuple(prefix_ids),
            "suffix_ids": tuple(suffix_ids),
            TOKEN_OPTION: single_token(tokenizer, "yes"),
            BASELINE_OPTION: single_token(tokenizer, "no"),
        },
    )


class Qwen3Rows(PairTemplate):
    document_prefix = " "  # the body's "<Document>: " ends in it: the pre-tokenizer splits there

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._prefix = list(spec.options["prefix_ids"])
        self._suffix = list(spec.options["suffix_ids"])

    def query_ids(self, query: str, options: RowOptions) -> list[int]:
        text = f"<Instruct>: {options.instruction}\n<Query>: {query}\n<Document>:"
        return self.ids(text)

    def _budget(self, max_length: int) -> int:
        """Tokens of the whole body (instruction, query and document)."""
        return max_length - len(self._prefix) - len(self._suffix)

    def query_limit(self, max_length: int, query_length: int, document_length: int) -> int:
        return self._budget(max_length)

    def room(self, query_ids: list[int], max_length: int) -> int:
        return self._budget(max_length) - len(query_ids)

    def assemble(self, query_ids: list[int], document_ids: list[int]) -> dict[str, IntArray]:
        return {"input_ids": as_ids([*self._prefix, *query_ids, *document_ids, *self._suffix])}

    def normalize(self, raw: ScoreArray) -> ScoreArray:
        return sigmoid(raw)


FAMILY = Family(
    name=NAME,
    detect=has_architecture("Qwen3ForCausalLM"),
    describe=describe_qwen3,
    row_builder=Qwen3Rows,
    scorer=TokenLogitScorer,
    gpu_dtype="bfloat16",
    names=("qwen3-reranker",),
)
