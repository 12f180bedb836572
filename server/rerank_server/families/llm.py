"""What the LLM rerankers share: a causal LM scores a row by token logits at its last real position.

bge-reranker-v2-gemma scores by the logit of "Yes"; Qwen3-Reranker and mxbai-rerank-v2 by the
difference of two tokens' logits ("yes" - "no", "1" - "0"), which is the log-odds of their softmax.
Rows are right-padded: with causal attention a row's real tokens never see the padding after them,
and positions run 0..n-1 as in the unpadded reference, so a score never depends on its batch. Only
the last real position goes through the output layer, and only the rows of the scored tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from rerank_server.families.base import ModelFiles, ModelSpec, ScoreArray, TokenBatch

TOKEN_OPTION = "score_token"  # spec option: the token whose logit scores a row
BASELINE_OPTION = "baseline_token"  # spec option: a token whose logit is subtracted (or absent)


def has_architecture(*names: str) -> Callable[[ModelFiles], bool]:
    """A detector for checkpoints whose config names one of these architectures."""

    def detect(files: ModelFiles) -> bool:
        return any(name in names for name in files.architectures)

    return detect


class TokenLogitScorer:
    """AutoModelForCausalLM's body, then the output layer on each row's last real token."""

    def __init__(self, spec: ModelSpec, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self._device = torch.device(device)
        self._spec = spec
        model = AutoModelForCausalLM.from_pretrained(
            spec.source, trust_remote_code=False, dtype=getattr(torch, dtype)
        )
        self._model = model.to(self._device).eval()  # type: ignore[arg-type]
        tokens = [spec.options[TOKEN_OPTION]]
        if spec.options.get(BASELINE_OPTION) is not None:
            tokens.append(spec.options[BASELINE_OPTION])
        head = model.get_output_embeddings()
        self._head_weight = head.weight[tokens].detach()  # [1 or 2, hidden]
        bias = getattr(head, "bias", None)
        self._head_bias = bias[tokens].detach() if bias is not None else None
        self._softcap = getattr(model.config, "final_logit_softcapping", None)

    def score(self, batch: TokenBatch) -> ScoreArray:
        import torch

        input_ids = torch.from_numpy(batch.padded("input_ids", self._spec.pad_token_id)).to(self._device)
        mask = torch.from_numpy(batch.mask()).to(self._device, torch.long)
        last = torch.from_numpy(batch.lengths).to(self._device, torch.long) - 1
        with torch.inference_mode():
            hidden = self._model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            final = hidden[torch.arange(len(last), device=self._device), last]
            logits = final @ self._head_weight.T
            if self._head_bias is not None:
                logits = logits + self._head_bias
            logits = logits.float()
            if self._softcap:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            raw = logits[:, 0] - logits[:, 1] if logits.shape[1] == 2 else logits[:, 0]
        return raw.cpu().numpy()
