"""Reference implementations of the LLM reranker recipes, written independently of the server.

Each class follows one recipe of model-recipes.md section 2 with transformers' AutoTokenizer and
AutoModelForCausalLM (fp32, CPU, no remote code), and scores one pair at a time with no padding, so a
reference score cannot depend on batching, padding side or position ids. The score is read from the
logits at the last position of the sequence.

Special-token parsing: the original references tokenize the user's text (query, document,
instruction) with the tokenizer's defaults, which turn a spelled-out `<|im_end|>` or `<eos>` into the
control token. model-recipes.md ("Pitfalls") asks servers to tokenize user text with special-token
parsing off, which changes nothing for ordinary text; these references do the same by default
(`split_special_tokens=True` on every string that holds user text), and `parse_special_in_text=True`
restores the original behaviour. Template strings (prefixes, suffixes, prompts, separators) are always
tokenized with parsing on: they need their <|im_start|>-style tokens. Non-special added tokens (Qwen3's
<think> and </think>) are matched in any text either way: `split_special_tokens` only concerns special
tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GEMMA_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query "
    "by providing a prediction of either 'Yes' or 'No'."
)
GEMMA_SEP = "\n"

QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

MXBAI_PREFIX = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
MXBAI_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
MXBAI_SEP = "\n"
MXBAI_TASK_PROMPT = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your "
    "binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
MXBAI_ESTIMATED_MAX = 12.0


class _CausalReference:
    """Loads a checkpoint the way the recipes do and runs one unpadded sequence at a time."""

    def __init__(self, path: str | Path, *, parse_special_in_text: bool = False) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=False, dtype=torch.float32
        ).eval()
        self.parse_special_in_text = parse_special_in_text

    def template(self, text: str) -> list[int]:
        """Tokens of a recipe's own string: no added specials, control tokens parsed."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(self, text: str, limit: int | None = None) -> list[int]:
        """Tokens of a string holding user text, cut to `limit` tokens from the end as the recipes do."""
        if limit is not None and limit <= 0:
            # No text survives. (The tokenizer gives [] for max_length=0 and raises OverflowError
            # for a negative one, which Qwen3's model card reaches when max_length is under its template.)
            return []
        kwargs: dict[str, object] = {"add_special_tokens": False}
        if not self.parse_special_in_text:
            kwargs["split_special_tokens"] = True
        if limit is not None:
            kwargs.update(truncation=True, max_length=limit)
        return self.tokenizer(text, **kwargs)["input_ids"]

    @torch.inference_mode()
    def last_logits(self, input_ids: list[int]) -> torch.Tensor:
        """The fp32 logits at the last position of one unpadded sequence."""
        logits = self.model(input_ids=torch.tensor([input_ids])).logits
        return logits[0, -1].float()


class GemmaReference(_CausalReference):
    """FlagLLMReranker's recipe for bge-reranker-v2-gemma: the logit of "Yes" after the prompt."""

    def __init__(self, path: str | Path, *, parse_special_in_text: bool = False) -> None:
        super().__init__(path, parse_special_in_text=parse_special_in_text)
        self.sep_ids = self.template(GEMMA_SEP)
        self.prompt_ids = self.template(GEMMA_PROMPT)
        self.yes_id = self.template("Yes")[0]

    def input_ids(self, query: str, document: str, max_length: int = 512) -> list[int]:
        """`[bos] + A` and `sep + B` joined with only_second truncation, then `sep + prompt`."""
        first = [self.tokenizer.bos_token_id, *self.text(f"A: {query}", max_length * 3 // 4)]
        second = [*self.sep_ids, *self.text(f"B: {document}", max_length)]
        # prepare_for_model(first, second, truncation="only_second", max_length=limit): the end of the
        # second part goes until both fit (the first part alone always fits: 1 + 3/4 of max_length).
        limit = max_length + len(self.sep_ids) + len(self.prompt_ids)
        second = second[: max(0, limit - len(first))]
        return [*first, *second, *self.sep_ids, *self.prompt_ids]

    def raw(self, query: str, document: str, max_length: int = 512) -> float:
        """The logit of "Yes" at the last position."""
        return float(self.last_logits(self.input_ids(query, document, max_length))[self.yes_id])

    def normalized(self, query: str, document: str, max_length: int = 512) -> float:
        """sigmoid of the raw score, as FlagLLMReranker's normalize=True gives it."""
        return float(torch.sigmoid(torch.tensor(self.raw(query, document, max_length))))


class Qwen3Reference(_CausalReference):
    """The Qwen3-Reranker model card's recipe: "yes" against "no" after the chat template."""

    def __init__(self, path: str | Path, *, parse_special_in_text: bool = False) -> None:
        super().__init__(path, parse_special_in_text=parse_special_in_text)
        self.prefix_ids = self.template(QWEN3_PREFIX)
        self.suffix_ids = self.template(QWEN3_SUFFIX)
        # As the model card looks them up: vocabulary entries, not tokenizations.
        self.yes_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.no_id = self.tokenizer.convert_tokens_to_ids("no")

    @staticmethod
    def body(query: str, document: str, instruction: str | None = None) -> str:
        """The model card's format_instruction: only None (not "") selects the default instruction."""
        if instruction is None:
            instruction = QWEN3_DEFAULT_INSTRUCTION
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"

    def input_ids(
        self, query: str, document: str, max_length: int = 8192, instruction: str | None = None
    ) -> list[int]:
        """prefix + body cut to what the template leaves of max_length + suffix."""
        limit = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        body_ids = self.text(self.body(query, document, instruction), limit)
        return [*self.prefix_ids, *body_ids, *self.suffix_ids]

    def raw(self, query: str, document: str, max_length: int = 8192, instruction: str | None = None) -> float:
        """logit("yes") - logit("no"): the log-odds of the normalized score."""
        logits = self.last_logits(self.input_ids(query, document, max_length, instruction))
        return float(logits[self.yes_id] - logits[self.no_id])

    def normalized(
        self, query: str, document: str, max_length: int = 8192, instruction: str | None = None
    ) -> float:
        """softmax([logit("no"), logit("yes")])[1], as the model card computes it."""
        logits = self.last_logits(self.input_ids(query, document, max_length, instruction))
        pair = torch.stack([logits[self.no_id], logits[self.yes_id]])
        return float(torch.log_softmax(pair, dim=0)[1].exp())


class MxbaiReference(_CausalReference):
    """The mxbai-rerank package's v2 recipe: logit("1") - logit("0") after the task prompt."""

    def __init__(self, path: str | Path, *, parse_special_in_text: bool = False) -> None:
        super().__init__(path, parse_special_in_text=parse_special_in_text)
        self.prefix_ids = self.template(MXBAI_PREFIX)
        self.suffix_ids = self.template(MXBAI_SUFFIX)
        self.sep_ids = self.template(MXBAI_SEP)
        self.task_ids = self.template(MXBAI_TASK_PROMPT)
        self.yes_id = self.template("1")[0]
        self.no_id = self.template("0")[0]
        self.predefined = len(self.prefix_ids) + len(self.task_ids) + len(self.suffix_ids) + len(self.sep_ids)
        self.max_positions = int(self.model.config.max_position_embeddings)

    def input_ids(
        self, query: str, document: str, max_length: int = 8192, instruction: str | None = None
    ) -> list[int]:
        """prefix + query + (sep + document, cut so query and it hold ml tokens) + sep + task + suffix."""
        ml = min(max_length, self.max_positions - self.predefined)
        query_text = f"query: {query}"
        if instruction:  # the package tests truthiness: "" means no instruction
            query_text = f"instruction: {instruction}\n{query_text}"
        query_ids = self.text(query_text, ml * 3 // 4)
        document_limit = min(self.max_positions - len(query_ids) - self.predefined, ml)
        document_ids = self.text(f"document: {document}", document_limit)
        # prepare_for_model(query_ids, sep + document_ids, truncation="only_second", max_length=ml)
        second = [*self.sep_ids, *document_ids][: max(0, ml - len(query_ids))]
        return [*self.prefix_ids, *query_ids, *second, *self.sep_ids, *self.task_ids, *self.suffix_ids]

    def raw(self, query: str, document: str, max_length: int = 8192, instruction: str | None = None) -> float:
        """logit("1") - logit("0") at the last position."""
        logits = self.last_logits(self.input_ids(query, document, max_length, instruction))
        return float(logits[self.yes_id] - logits[self.no_id])

    def normalized(
        self, query: str, document: str, max_length: int = 8192, instruction: str | None = None
    ) -> float:
        """sigmoid(raw - estimated_max / 2), the package's normalize=True."""
        raw = self.raw(query, document, max_length, instruction)
        return float(torch.sigmoid(torch.tensor(raw - MXBAI_ESTIMATED_MAX / 2)))
