"""Bi-encoders (sentence-transformers models with mean pooling, e.g. all-MiniLM-L6-v2): a pair's score
is the cosine similarity of the query's and the document's mean-pooled embeddings.

Row layout: the query with the tokenizer's single-sequence specials, then the document with them,
e.g. `[CLS] q [SEP] [CLS] d [SEP]`; token_type_ids are 0 on the query part and 1 on the document
part, which is how the scorer splits the row again (the model itself sees each part alone). Each
part is cut to max_length on its own, so a row holds up to 2 * max_length tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rerank_server.models.base import EncodedPair, ModelSpec, PairTooLongError
from rerank_server.models.loading import SpecialLayout, check_max_length, load_tokenizer

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy.typing as npt
    import torch


class BiEncoderEncoder:
    """Tokenizes query and documents in the front-end, each as sentence-transformers would alone."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._tokenizer, self.pad_token_id = load_tokenizer(spec.source)
        self._layout = SpecialLayout(self._tokenizer, pair=False)

    def encode(
        self, query: str, documents: Sequence[str], *, max_length: int, truncate: bool, first_index: int = 0
    ) -> list[EncodedPair]:
        """One row per document; with truncate=False, a query or document longer than max_length
        (specials included) raises PairTooLongError."""
        check_max_length(self.spec, max_length)
        room = max_length - self._layout.special_tokens
        query_ids = self._tokenizer.encode(query, add_special_tokens=False).ids
        query_cut = len(query_ids) > room
        query_row, _ = self._layout.apply((query_ids[:room],))
        encodings = self._tokenizer.encode_batch(list(documents), add_special_tokens=False)
        pairs = []
        for position, encoding in enumerate(encodings):
            document_ids = encoding.ids
            document_cut = len(document_ids) > room
            if (query_cut or document_cut) and not truncate:
                tokens = max(len(query_ids), len(document_ids)) + self._layout.special_tokens
                raise PairTooLongError(first_index + position, tokens, max_length)
            document_row, _ = self._layout.apply((document_ids[:room],))
            pairs.append(
                EncodedPair(
                    query_row + document_row,
                    [0] * len(query_row) + [1] * len(document_row),
                    query_cut or document_cut,
                )
            )
        return pairs

    def normalize(self, raw: float) -> float:
        """Cosine mapped linearly onto [0, 1] (clamped: rounding can push it past +-1)."""
        return min(1.0, max(0.0, (raw + 1.0) / 2.0))


class BiEncoderScorer:
    """Runs AutoModel on the query and document parts of the rows; each distinct query once per batch."""

    def __init__(self, spec: ModelSpec, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModel

        self._device = torch.device(device)
        model = AutoModel.from_pretrained(spec.source, trust_remote_code=False, dtype=getattr(torch, dtype))
        self._model = model.to(self._device).eval()
        pad_token_id = model.config.pad_token_id
        self._pad_token_id = pad_token_id if isinstance(pad_token_id, int) else 0

    def score(
        self,
        input_ids: npt.NDArray[np.int32],
        attention_mask: npt.NDArray[np.int8],
        token_type_ids: npt.NDArray[np.int8],
    ) -> npt.NDArray[np.float32]:
        """Cosine similarity of each row's query and document embeddings, as float32."""
        queries: dict[tuple[int, ...], int] = {}
        query_of_row = []
        documents = []
        for ids, mask, types in zip(input_ids, attention_mask, token_type_ids, strict=True):
            real = mask != 0
            ids, types = ids[real], types[real]
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
