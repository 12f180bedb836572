"""mxbai-rerank-v2 (base/large; Qwen2ForCausalLM): the mxbai-rerank package's recipe, scored by "1" - "0".

Row: chat prefix + query ids + (sep + document ids, cut) + sep + task prompt + suffix, where the
query part is `query: {query}` (after `instruction: {instruction}\\n` when one is given) cut to
ml * 3 // 4 tokens, the document part is `document: {document}`, and ml = min(max_length,
max_position_embeddings - the template's tokens). Normalized score as the package's normalize=True:
sigmoid(raw - 12 / 2).
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

NAME = "mxbai-rerank-v2"
PREFIX = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
SEPARATOR = "\n"
TASK_PROMPT = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your "
    "binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
ESTIMATED_MAX = 12.0  # the package's normalize=True centres the sigmoid at half of it
DEFAULT_MAX_LENGTH = 8192


def describe_mxbai(files: ModelFiles) -> ModelSpec:
    tokenizer, pad_token_id = load_tokenizer(files.source)
    names = ("prefix", "suffix", "sep", "task")
    texts = template_ids(tokenizer, PREFIX, SUFFIX, SEPARATOR, TASK_PROMPT)
    pieces = {name: tuple(ids) for name, ids in zip(names, texts, strict=True)}
    predefined = sum(len(ids) for ids in pieces.values())
    limit = position_limit(files.config) - predefined
    if limit < 8:
        raise ValueError(f"{files.source!r} has too few positions for the mxbai-rerank template")
    return ModelSpec(
        source=files.source,
        family=NAME,
        default_max_length=min(DEFAULT_MAX_LENGTH, limit),
        max_length_limit=limit,
        min_max_length=8,
        pad_token_id=pad_token_id,
        row_overhead=predefined,
        default_instruction="",
        options={
            **{f"{name}_ids": ids for name, ids in pieces.items()},
            TOKEN_OPTION: single_token(tokenizer, "1"),
            BASELINE_OPTION: single_token(tokenizer, "0"),
        },
    )


class MxbaiRows(PairTemplate):
    document_prefix = "document: "

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._prefix = list(spec.options["prefix_ids"])
        self._suffix = list(spec.options["suffix_ids"])
        self._separator = list(spec.options["sep_ids"])
        self._task = list(spec.options["task_ids"])

    def query_ids(self, query: str, options: RowOptions) -> list[int]:
        text = (
            f"instruction: {options.instruction}\nquery: {query}"
            if options.instruction
            else f"query: {query}"
        )
        return self.ids(text)

    def query_limit(self, max_length: int, query_length: int, document_length: int) -> int:
        return max_length * 3 // 4

    def room(self, query_ids: list[int], max_length: int) -> int:
        # sep + document is cut from its end so the query and it hold at most max_length tokens.
        return max_length - len(query_ids) - len(self._separator)

    def assemble(self, query_ids: list[int], document_ids: list[int]) -> dict[str, IntArray]:
        ids = [
            *self._prefix,
            *query_ids,
            *self._separator,
            *document_ids,
            *self._separator,
            *self._task,
            *self._suffix,
        ]
        return {"input_ids": as_ids(ids)}

    def normalize(self, raw: ScoreArray) -> ScoreArray:
        return sigmoid(raw - ESTIMATED_MAX / 2)


FAMILY = Family(
    name=NAME,
    detect=has_architecture("Qwen2ForCausalLM"),
    describe=describe_mxbai,
    row_builder=MxbaiRows,
    scorer=TokenLogitScorer,
    gpu_dtype="bfloat16",
    names=("mxbai-rerank",),
)
