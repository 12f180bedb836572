"""An independent reference for bge-reranker-v2-minicpm-layerwise, written from its recipe: the rows as
LayerWiseFlagLLMReranker builds them (bge-reranker-v2-gemma's, bos always first), and a naive forward
pass from the safetensors weights, one unpadded sequence at a time, reading every head after every layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from llm_reference import GEMMA_PROMPT, GEMMA_SEP, GemmaReference
from safetensors.torch import load_file
from transformers import AutoTokenizer


class LayerwiseReference(GemmaReference):
    """The gemma recipe's rows (transformers has no model class here: scores come from naive_scores)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.parse_special_in_text = False
        self.sep_ids = self.template(GEMMA_SEP)
        self.prompt_ids = self.template(GEMMA_PROMPT)

    def layer_scores(self, query: str, document: str, max_length: int = 512) -> dict[int, float]:
        """{cutoff layer: raw score} for one pair."""
        return naive_scores(self.path, self.input_ids(query, document, max_length))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [positions, head_dim]: dimension i turns with dimension i + head_dim/2 by the angle
    pos * theta^(-2i/d). The reference rounds the frequencies and angles to float32, which shows
    at 1e-5 after a few layers, so this does too."""
    half = x.shape[1] // 2
    frequencies = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) * 2 / x.shape[1])
    angles = torch.arange(x.shape[0], dtype=torch.float32)[:, None] * frequencies
    out = torch.empty_like(x)
    for i in range(half):
        c, s = angles[:, i].cos(), angles[:, i].sin()
        a, b = x[:, i], x[:, i + half]
        out[:, i], out[:, i + half] = a * c - b * s, b * c + a * s
    return out


def naive_scores(directory: Path, ids: list[int]) -> dict[int, float]:
    """{cutoff k: head k on norm(hidden after k layers) at the last token} for one unpadded sequence."""
    config = json.loads((directory / "config.json").read_text())
    w = load_file(directory / "model.safetensors")
    n_layers, heads, kv_heads = (
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
    )
    d = config["hidden_size"] // heads
    eps, residual = config["rms_norm_eps"], config["scale_depth"] / math.sqrt(n_layers)
    h = w["model.embed_tokens.weight"][torch.tensor(ids)] * config["scale_emb"]
    t = len(ids)
    causal = torch.full((t, t), float("-inf")).triu(1)
    scores = {}
    for layer in range(n_layers + 1):
        if layer >= config["start_layer"]:
            head = w[f"lm_head.{layer - config['start_layer']}.linear_head.weight"]
            scores[layer] = (rms_norm(h[-1], w["model.norm.weight"], eps) @ head[0]).item()
        if layer == n_layers:
            break
        p = f"model.layers.{layer}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q, k, v = (x @ w[p + f"self_attn.{name}_proj.weight"].T for name in "qkv")
        outputs = []
        for head_index in range(heads):
            kv = head_index // (heads // kv_heads)
            qh = rope(q[:, head_index * d : (head_index + 1) * d], config["rope_theta"])
            kh = rope(k[:, kv * d : (kv + 1) * d], config["rope_theta"])
            attention = torch.softmax(qh @ kh.T / math.sqrt(d) + causal, dim=-1)
            outputs.append(attention @ v[:, kv * d : (kv + 1) * d])
        h = h + torch.cat(outputs, dim=1) @ w[p + "self_attn.o_proj.weight"].T * residual
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T * residual
    return scores
