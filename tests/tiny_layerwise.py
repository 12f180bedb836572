"""A tiny, randomly initialised bge-reranker-v2-minicpm-layerwise checkpoint, built offline.

The files have the released checkpoint's layout: a config.json with its keys (architecture,
auto_map, MiniCPM's scale_emb / scale_depth / dim_model_base, the layerwise start_layer / head_multi /
head_type, plain rope), the weights in model.safetensors under its tensor names
(`model.layers.{i}.self_attn.q_proj.weight`, `lm_head.{k - start_layer}.linear_head.weight`, ...),
and a Llama (SentencePiece-style BPE, byte fallback) tokenizer with `<unk>` 0, `<s>` 1, `</s>` 2,
pad `<unk>`, that prepends `<s>`.
The vocabulary is derived from the test corpus and the reranker prompt, not trained, so the same
arguments always give the same files; "Yes" is one token, as the recipe needs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_models import CORPUS
from transformers import LlamaTokenizer

PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query "
    "by providing a prediction of either 'Yes' or 'No'."
)
HIDDEN, HEAD_DIM = 64, 16  # the real model: hidden 2304, 36 heads of 64, intermediate 2.5 x hidden
HEADS = HIDDEN // HEAD_DIM
SPECIALS = ("<unk>", "<s>", "</s>")


def _tokenizer() -> LlamaTokenizer:
    """BPE whose merges grow each corpus word one character at a time, so whole words are tokens and
    unseen text splits into characters, then bytes."""
    units: set[str] = set()
    for text in (*CORPUS, PROMPT, "A: ", "B: ", "Yes", "No"):
        # SentencePiece marks a space, and the start of the text, with "▁".
        units.update(re.findall(r"▁?[A-Za-z0-9]+|▁?[^A-Za-z0-9▁]", "▁" + text.replace(" ", "▁")))
    characters = sorted({character for unit in units for character in unit} | {"▁"})
    # Merges that grow a "▁word" rank first, so a spaced word merges whole before any piece of it can.
    prefixes = sorted(
        {unit[:end] for unit in units for end in range(2, len(unit) + 1)},
        key=lambda piece: (not piece.startswith("▁"), len(piece), piece),
    )
    pieces = [*SPECIALS, *(f"<0x{byte:02X}>" for byte in range(256)), *characters, *prefixes]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    merges = [(prefix[:-1], prefix[-1]) for prefix in prefixes]
    return LlamaTokenizer(
        vocab=vocab, merges=merges, pad_token="<unk>", add_bos_token=True, add_eos_token=False
    )


def _config(vocab_size: int, layers: int, start_layer: int, kv_heads: int, hidden: int) -> dict[str, object]:
    """The released config.json's keys, with tiny sizes."""
    return {
        "architectures": ["LayerWiseMiniCPMForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_minicpm_reranker.LayerWiseMiniCPMConfig",
            "AutoModel": "modeling_minicpm_reranker.LayerWiseMiniCPMModel",
            "AutoModelForCausalLM": "modeling_minicpm_reranker.LayerWiseMiniCPMForCausalLM",
        },
        "bos_token_id": 1,
        "dim_model_base": 256,
        "eos_token_id": 2,
        "head_multi": True,
        "head_type": "simple",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.1,
        "intermediate_size": hidden * 5 // 2,
        "max_position_embeddings": 2048,
        "model_type": "minicpm",
        "num_attention_heads": hidden // HEAD_DIM,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "scale_depth": 1.4,
        "scale_emb": 12,
        "start_layer": start_layer,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.38.1",
        "use_cache": False,
        "vocab_size": vocab_size,
    }


def _weights(
    vocab_size: int, layers: int, start_layer: int, kv_heads: int, seed: int, hidden: int
) -> dict[str, torch.Tensor]:
    """Random weights under the checkpoint's names; std 0.2 (not the real 0.1) so different inputs score
    clearly apart, norm weights near one."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, mean: float = 0.0, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std + mean

    kv, intermediate = kv_heads * HEAD_DIM, hidden * 5 // 2
    state = {"model.embed_tokens.weight": normal(vocab_size, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        state |= {
            prefix + "self_attn.q_proj.weight": normal(hidden, hidden),
            prefix + "self_attn.k_proj.weight": normal(kv, hidden),
            prefix + "self_attn.v_proj.weight": normal(kv, hidden),
            prefix + "self_attn.o_proj.weight": normal(hidden, hidden),
            prefix + "mlp.gate_proj.weight": normal(intermediate, hidden),
            prefix + "mlp.up_proj.weight": normal(intermediate, hidden),
            prefix + "mlp.down_proj.weight": normal(hidden, intermediate),
            prefix + "input_layernorm.weight": normal(hidden, mean=1.0, std=0.1),
            prefix + "post_attention_layernorm.weight": normal(hidden, mean=1.0, std=0.1),
        }
    state["model.norm.weight"] = normal(hidden, mean=1.0, std=0.1)
    for head in range(layers - start_layer + 1):
        state[f"lm_head.{head}.linear_head.weight"] = normal(1, hidden)
    return state


def build_minicpm_layerwise(
    path: str | Path,
    *,
    seed: int = 0,
    layers: int = 6,
    start_layer: int = 2,
    kv_heads: int = HEADS,
    hidden: int = HIDDEN,
) -> Path:
    """Write the checkpoint to `path` and return it. Heads are 16 wide; `kv_heads` below
    hidden / 16 gives grouped-query attention (the released model has as many key-value heads as
    heads). The benchmark builds a wider one."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    if len(tokenizer("Yes", add_special_tokens=False).input_ids) != 1:
        raise AssertionError("the tiny vocabulary must hold 'Yes' as one token")
    vocab_size = len(tokenizer)
    config = _config(vocab_size, layers, start_layer, kv_heads, hidden)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(
        _weights(vocab_size, layers, start_layer, kv_heads, seed, hidden),
        path / "model.safetensors",
        {"format": "pt"},
    )
    tokenizer.save_pretrained(path)
    return path
