"""bge-reranker-v2-gemma (GemmaForCausalLM): FlagLLMReranker's recipe, scored by the logit of "Yes".

Row: `<bos> tokens("A: " + query)[:max_length * 3 // 4]`, then `"\\n" + tokens("B: " + passage)`
cut (only the passage part, from its end) so both parts hold at most max_length + len(sep) +
len(prompt) tokens, then `"\\n" + prompt`. So a row may exceed max_length by the prompt and
separators, as in the reference. Normalized score: sigmoid.
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
from rerank_server.families.llm import TOKEN_OPTION, TokenLogitScorer, has_architecture
from rerank_server.families.loading import load_tokenizer, position_limit, single_token, template_ids
from rerank_server.families.template import PairTemplate, as_ids

NAME = "bge-reranker-gemma"
PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by "
    "providing a prediction of either 'Yes' or 'No'."
)
SEPARATOR = "\n"
DEFAULT_MAX_LENGTH = 512


def describe_prompted(files: ModelFiles, family: str, prompt: str = PROMPT) -> ModelSpec:
    """The spec of a model scored by FlagLLMReranker's "A: / B: / prompt" recipe."""
    tokenizer, pad_token_id = load_tokenizer(files.source)
    bos = files.config.get("bos_token_id")
    if not isinstance(bos, int):
        raise ValueError(f"{files.source!r} has no bos_token_id in its config; the recipe starts with it")
    prompt_ids, separator_ids = template_ids(tokenizer, prompt, SEPARATOR)
    # [bos] + query + sep + passage fill max_length + len(sep) + len(prompt); then sep + prompt again.
    overhead = 2 * (len(separator_ids) + len(prompt_ids))
    limit = position_limit(files.config) - overhead
    return ModelSpec(
        source=files.source,
        family=family,
        default_max_length=min(DEFAULT_MAX_LENGTH, limit),
        max_length_limit=limit,
        min_max_length=2,
        pad_token_id=pad_token_id,
        row_overhead=overhead,
        options={
            "bos": bos,
            "prompt_ids": tuple(prompt_ids),
            "separator_ids": tuple(separator_ids),
            TOKEN_OPTION: single_token(tokenizer, "Yes"),
        },
    )


class PromptedRows(PairTemplate):
    """The "A: query / B: passage / prompt" rows of FlagLLMReranker (and its layerwise sibling)."""

    document_prefix = "B: "

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._bos = [spec.options["bos"]]
        self._prompt = list(spec.options["prompt_ids"])
        self._separator = list(spec.options["separator_ids"])

    def query_ids(self, query: str, options: RowOptions) -> list[int]:
        return self.ids("A: " + query)

    def query_limit(self, max_length: int, query_length: int, document_length: int) -> int:
        return max_length * 3 // 4

    def room(self, query_ids: list[int], max_length: int) -> int:
        # prepare_for_model(only_second) keeps [bos] + query and cuts sep + passage from its end.
        both = max_length + len(self._separator) + len(self._prompt)
        return min(max_length, both - len(self._bos) - len(query_ids) - len(self._separator))

    def assemble(self, query_ids: list[int], document_ids: list[int]) -> dict[str, IntArray]:
        ids = [*self._bos, *query_ids, *self._separator, *document_ids, *self._separator, *self._prompt]
        return {"input_ids": as_ids(ids)}

    def normalize(self, raw: ScoreArray) -> ScoreArray:
        return sigmoid(raw)


FAMILY = Family(
    name=NAME,
    detect=has_architecture("GemmaForCausalLM"),
    describe=lambda files: describe_prompted(files, NAME),
    row_builder=PromptedRows,
    scorer=TokenLogitScorer,
    gpu_dtype="bfloat16",
    names=("bge-reranker-v2-gemma",),
)
