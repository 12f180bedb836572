"""Sequence-classification cross-encoders (bge-reranker-*, ms-marco cross-encoders): FlagReranker's recipe.

Row layout: the tokenizer's pair template around the query and the document tokens, e.g.
`[CLS] q [SEP] d [SEP]` with token_type_ids 0 up to the first [SEP] and 1 after it (BERT), or
`<s> q </s></s> d </s>` with token_type_ids all 0 (XLM-R). The query is cut to max_length * 3 // 4
tokens, then only the document is cut so the row, specials included, fits max_length.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rerank_server.models.base import EncodedPair, ModelSpec, PairTooLongError
from rerank_server.models.loading import SpecialLayout, check_max_length, load_tokenizer

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np
    import numpy.typing as npt


class CrossEncoderEncoder:
    """Tokenizes pairs in the front-end; drives the Rust tokenizer directly (no torch, no transformers)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._tokenizer, self.pad_token_id = load_tokenizer(spec.source)
        self._layout = SpecialLayout(self._tokenizer, pair=True)

    def encode(
        self, query: str, documents: Sequence[str], *, max_length: int, truncate: bool, first_index: int = 0
    ) -> list[EncodedPair]:
        """One row per document; with truncate=False a pair that does not fit whole raises
        PairTooLongError, and nothing is cut (not even a query over 3/4 of max_length)."""
        check_max_length(self.spec, max_length)
        specials = self._layout.special_tokens
        query_ids = self._tokenizer.encode(query, add_special_tokens=False).ids
        query_limit = max_length * 3 // 4
        query_cut = truncate and len(query_ids) > query_limit
        if query_cut:
            query_ids = query_ids[:query_limit]
        room = max_length - specials - len(query_ids)
        encodings = self._tokenizer.encode_batch(list(documents), add_special_tokens=False)
        pairs = []
        for position, encoding in enumerate(encodings):
            document_ids = encoding.ids
            document_cut = len(document_ids) > room
            if document_cut:
                if not truncate:
                    tokens = len(query_ids) + len(document_ids) + specials
                    raise PairTooLongError(first_index + position, tokens, max_length)
                document_ids = document_ids[:room]
            input_ids, token_type_ids = self._layout.apply((query_ids, document_ids))
            pairs.append(EncodedPair(input_ids, token_type_ids, query_cut or document_cut))
        return pairs

    def normalize(self, raw: float) -> float:
        """sigmoid(logit), as FlagReranker's normalize=True; written to not overflow on large logits."""
        if raw >= 0:
            return 1.0 / (1.0 + math.exp(-raw))
        odds = math.exp(raw)
        return odds / (1.0 + odds)


class CrossEncoderScorer:
    """Runs AutoModelForSequenceClassification on rows; the raw score is the single logit."""

    def __init__(self, spec: ModelSpec, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        self._device = torch.device(device)
        model = AutoModelForSequenceClassification.from_pretrained(
            spec.source, trust_remote_code=False, dtype=getattr(torch, dtype)
        )
        self._model = model.to(self._device).eval()
        # BERT-family models read token_type_ids (1 on the document); XLM-R has a single type and
        # its tokenizer does not return them, so they are left out there.
        self._token_types = getattr(model.config, "type_vocab_size", 1) > 1

    def score(
        self,
        input_ids: npt.NDArray[np.int32],
        attention_mask: npt.NDArray[np.int8],
        token_type_ids: npt.NDArray[np.int8],
    ) -> npt.NDArray[np.float32]:
        """The logit of each row, as float32."""
        import torch

        # torch.tensor copies: the arrays may be read-only views of shared memory.
        inputs = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long, device=self._device),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long, device=self._device),
        }
        if self._token_types:
            inputs["token_type_ids"] = torch.tensor(token_type_ids, dtype=torch.long, device=self._device)
        with torch.inference_mode():
            logits = self._model(**inputs).logits
        return logits.view(-1).float().cpu().numpy()
