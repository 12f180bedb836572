"""Reference implementations the tests compare the server with, written independently of it.

FlagReranker's cross-encoder recipe with transformers directly (transformers 5 has no
`prepare_for_model`, so the pair layout is built from the tokenizer's special token ids as the
model families document it), run one pair at a time with no padding; and sentence-transformers
for the bi-encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


@dataclass
class ReferenceRow:
    input_ids: list[int]
    token_type_ids: list[int] | None  # None where the family has no token types (XLM-R)
    truncated: bool
    full_length: int  # the whole pair with specials, nothing cut


class FlagReference:
    """FlagReranker's encoder-only recipe, with transformers' tokenizer and model."""

    def __init__(self, path: Path, layout: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.layout = layout

    def tokens(self, text: str, limit: int | None = None) -> list[int]:
        if limit is None:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=limit)["input_ids"]

    def row(self, query: str, document: str, max_length: int) -> ReferenceRow:
        full_query, full_document = self.tokens(query), self.tokens(document)
        query_ids = self.tokens(query, max_length * 3 // 4)
        document_ids = self.tokens(document, max_length)
        tok = self.tokenizer
        if self.layout == "bert":  # [CLS] A [SEP] B [SEP], types 0 then 1 from B on
            specials = 3
            document_ids = document_ids[: max_length - specials - len(query_ids)]
            ids = [tok.cls_token_id, *query_ids, tok.sep_token_id, *document_ids, tok.sep_token_id]
            types: list[int] | None = [0] * (len(query_ids) + 2) + [1] * (len(document_ids) + 1)
        else:  # <s> A </s></s> B </s>
            specials = 4
            document_ids = document_ids[: max_length - specials - len(query_ids)]
            eos = tok.eos_token_id
            ids = [tok.bos_token_id, *query_ids, eos, eos, *document_ids, eos]
            types = None
        truncated = len(query_ids) < len(full_query) or len(document_ids) < len(full_document)
        return ReferenceRow(ids, types, truncated, len(full_query) + len(full_document) + specials)

    def score(self, row: ReferenceRow) -> float:
        inputs = {"input_ids": torch.tensor([row.input_ids])}
        if row.token_type_ids is not None:
            inputs["token_type_ids"] = torch.tensor([row.token_type_ids])
        with torch.inference_mode():
            return self.model(**inputs).logits.view(-1).float().item()


def st_scores(model: SentenceTransformer, query: str, documents: list[str]) -> np.ndarray:
    query_embedding = model.encode([query], normalize_embeddings=True, convert_to_numpy=True)[0]
    embeddings = model.encode(documents, normalize_embeddings=True, convert_to_numpy=True)
    return embeddings @ query_embedding
