"""The scoring forward pass of BAAI/bge-reranker-v2-minicpm-layerwise (`LayerWiseMiniCPMForCausalLM`).

transformers has no class for this model and the checkpoint's own Python must never run, so this is a
small re-implementation of FlagEmbedding's `modeling_minicpm_reranker.py` that reads the checkpoint's
`config.json` and loads its weights under their own names. MiniCPM is a Llama-shaped decoder with
three differences: embeddings are scaled by `scale_emb`, each residual branch by
`scale_depth / sqrt(num_hidden_layers)`, and, in the layerwise reranker, a bias-free `Linear(hidden, 1)`
head sits on every layer k from `start_layer` to `num_hidden_layers`. Head k reads the final norm of
the hidden state after k layers, so a batch stops after its largest cutoff: that is the speed lever.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "LayerWiseMiniCPMForCausalLM"


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As the reference: the variance in float32, the product back in the model's dtype.
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def _linears(bias: bool, **shapes: tuple[int, int]) -> nn.ModuleDict:
    return nn.ModuleDict({name: nn.Linear(*shape, bias=bias) for name, shape in shapes.items()})


class _DecoderLayer(nn.Module):
    """`model.layers.{i}`: `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj` and two norms."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        hidden, inner = c["hidden_size"], c["intermediate_size"]
        kv = hidden // c["num_attention_heads"] * c["num_key_value_heads"]
        self.self_attn = _linears(
            c["attention_bias"],
            q_proj=(hidden, hidden),
            k_proj=(hidden, kv),
            v_proj=(hidden, kv),
            o_proj=(hidden, hidden),
        )
        self.mlp = _linears(
            False, gate_proj=(hidden, inner), up_proj=(hidden, inner), down_proj=(inner, hidden)
        )
        self.input_layernorm = _RMSNorm(hidden, c["rms_norm_eps"])
        self.post_attention_layernorm = _RMSNorm(hidden, c["rms_norm_eps"])


class _Backbone(nn.Module):
    """Named `model` in the checkpoint: `model.embed_tokens`, `model.layers.{i}`, `model.norm`."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(_DecoderLayer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = _RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class _Head(nn.Module):
    """`lm_head.{k - start_layer}.linear_head`: one logit from the normed hidden state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear_head = nn.Linear(hidden, 1, bias=False)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as the reference applies it: in float32, dimension i paired with i + d/2."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-second, first), dim=-1) * sin).to(x.dtype)


class LayerwiseMiniCPM(nn.Module):
    """Scores right-padded rows, each through the head of its own cutoff layer."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        c = _checked(config)
        self.num_layers: int = c["num_hidden_layers"]
        self.start_layer: int = c["start_layer"]
        self.heads: int = c["num_attention_heads"]
        self.kv_heads: int = c["num_key_value_heads"]
        self.head_dim: int = c["hidden_size"] // self.heads
        self.scale_emb = float(c["scale_emb"])
        self.residual_scale = c["scale_depth"] / math.sqrt(self.num_layers)
        self.rope_theta = float(c["rope_theta"])
        self.rope_factor = float(c["rope_scaling"]["factor"]) if c["rope_scaling"] else 1.0
        self.layers_run = 0
        self.model = _Backbone(c)
        self.lm_head = nn.ModuleList(
            _Head(c["hidden_size"]) for _ in range(self.start_layer, self.num_layers + 1)
        )

    @classmethod
    def load(cls, source: str, *, device: str, dtype: torch.dtype) -> LayerwiseMiniCPM:
        """Build on the meta device and take the checkpoint's tensors as the parameters, so a 2.7B
        model is neither randomly initialised first nor held twice."""
        directory = _checkpoint_dir(source)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{source}: no config.json, so not a {ARCHITECTURE} checkpoint")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        with torch.device("meta"):
            model = cls(config)
        state = {
            name: tensor.to(device=device, dtype=dtype)
            for name, tensor in _weights(directory)
            if not name.endswith("rotary_emb.inv_freq")  # a buffer older checkpoints saved
        }
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source}: weights do not match the config:"
                f" missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.load_state_dict(state, assign=True)
        return model.requires_grad_(False).eval()

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, lengths: torch.Tensor, cutoffs: torch.Tensor) -> torch.Tensor:
        """Head k on norm(hidden state after k layers) at each row's last real token, k its cutoff.

        Right padding keeps each row independent of its batch: positions are 0..len-1 as when run
        alone, and under the causal mask a real token only sees earlier, real tokens, so no key
        padding mask is needed (and SDPA may use its fused causal kernels). Rows leave the batch
        once their cutoff is scored, and the batch stops after max(cutoffs) layers.
        """
        device = self.model.norm.weight.device
        length_list, cutoff_list = [int(n) for n in lengths.tolist()], [int(k) for k in cutoffs.tolist()]
        batch = input_ids.shape[0]
        if not batch or len(length_list) != batch or len(cutoff_list) != batch:
            raise ValueError("input_ids, lengths and cutoffs must describe the same, non-empty batch")
        if min(length_list) < 1 or max(length_list) > input_ids.shape[1]:
            raise ValueError(f"lengths must lie in [1, {input_ids.shape[1]}], got {length_list}")
        if min(cutoff_list) < self.start_layer or max(cutoff_list) > self.num_layers:
            raise ValueError(
                f"cutoff layers must lie in [{self.start_layer}, {self.num_layers}], got {cutoff_list}"
            )
        width = max(length_list)
        ids = input_ids[:, :width].to(device)
        real = torch.arange(width, device=device) < torch.tensor(length_list, device=device)[:, None]
        hidden = self.model.embed_tokens(ids.masked_fill(~real, 0)) * self.scale_emb  # pads may be any value
        positions = torch.arange(width, device=device, dtype=torch.float32) / self.rope_factor
        inv_freq = 1.0 / self.rope_theta ** (
            torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim
        )
        angles = torch.outer(positions, inv_freq).repeat(1, 2)
        cos, sin = angles.cos(), angles.sin()
        scores = torch.empty(batch, dtype=torch.float32, device=device)
        live = list(range(batch))  # the original row of each row still in `hidden`
        for k in range(max(cutoff_list) + 1):
            done = [i for i, row in enumerate(live) if cutoff_list[row] == k]
            if done:
                picked = torch.tensor(done, device=device)
                last = torch.tensor([length_list[live[i]] - 1 for i in done], device=device)
                head = cast(_Head, self.lm_head[k - self.start_layer]).linear_head
                logits = head(self.model.norm(hidden[picked, last])).float().squeeze(-1)
                scores[torch.tensor([live[i] for i in done], device=device)] = logits
                keep = [i for i in range(len(live)) if cutoff_list[live[i]] != k]
                live = [live[i] for i in keep]
                if not live:
                    break
                width = max(length_list[row] for row in live)  # causal: later columns change nothing
                hidden = hidden[torch.tensor(keep, device=device), :width]
                cos, sin = cos[:width], sin[:width]
            hidden = self._layer(cast(_DecoderLayer, self.model.layers[k]), hidden, cos, sin)
            self.layers_run += 1
        return scores

    def _layer(
        self, layer: _DecoderLayer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        batch, width, _ = hidden.shape
        attn, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(hidden)
        q = attn["q_proj"](x).view(batch, width, self.heads, self.head_dim).transpose(1, 2)
        k = attn["k_proj"](x).view(batch, width, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn["v_proj"](x).view(batch, width, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if self.kv_heads != self.heads:  # grouped-query attention: query head h reads kv head h // group
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = (
            F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, width, -1)
        )
        hidden = hidden + attn["o_proj"](out) * self.residual_scale
        x = layer.post_attention_layernorm(hidden)
        return (
            hidden + mlp["down_proj"](F.silu(mlp["gate_proj"](x)) * mlp["up_proj"](x)) * self.residual_scale
        )


def _checked(config: dict[str, Any]) -> dict[str, Any]:
    """The config with the reference's defaults filled in; settings this scorer does not implement
    are refused rather than silently scored wrong."""
    if ARCHITECTURE not in (config.get("architectures") or []):
        raise ValueError(f"not a {ARCHITECTURE} checkpoint: architectures={config.get('architectures')}")
    defaults = {
        "num_key_value_heads": config.get("num_attention_heads"),
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "hidden_act": "silu",
        "scale_emb": 1,
        "scale_depth": 1,
        "start_layer": 8,
        "head_multi": True,
        "head_type": "simple",
    }
    c = {**defaults, **{key: value for key, value in config.items() if value is not None}}
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    if absent := [key for key in required if key not in c]:
        raise ValueError(f"{ARCHITECTURE} config lacks {absent}")
    # 'raw' and 'complex' heads give vocabulary-sized logits, and one shared head (head_multi false)
    # is a training setting: the released reranker has one simple head per layer.
    if c["head_type"] != "simple" or c["head_multi"] is not True:
        raise ValueError(
            "only head_type 'simple' with head_multi true is supported,"
            f" got {c['head_type']!r}, {c['head_multi']!r}"
        )
    if c["hidden_act"] != "silu":
        raise ValueError(f"only hidden_act 'silu' is supported, got {c['hidden_act']!r}")
    # Dynamic NTK scaling changes every position's angles with the batch's length: refused.
    scaling = c["rope_scaling"]
    if scaling is not None and (
        not isinstance(scaling, dict) or scaling.get("type", scaling.get("rope_type")) != "linear"
    ):
        raise ValueError(f"only plain or linear rope scaling is supported, got {scaling!r}")
    if c["hidden_size"] % c["num_attention_heads"] or c["num_attention_heads"] % c["num_key_value_heads"]:
        raise ValueError("hidden_size must divide into heads, and heads into key-value heads")
    if not 0 <= c["start_layer"] <= c["num_hidden_layers"]:
        raise ValueError(f"start_layer {c['start_layer']} outside [0, {c['num_hidden_layers']}]")
    return c


def _checkpoint_dir(source: str) -> Path:
    """A local directory as it is; anything else is a hub id, fetched (config and weights only,
    never the checkpoint's Python) into the usual huggingface_hub cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{source} is a file, not a checkpoint directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=source, allow_patterns=["*.json", "*.safetensors", "*.bin"]))


def _weights(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint: safetensors (one file or sharded with an index) first,
    else pytorch_model*.bin read with weights_only, which runs no pickled code."""
    from safetensors.torch import load_file

    def load_bin(path: Path) -> dict[str, torch.Tensor]:
        return torch.load(path, map_location="cpu", weights_only=True)

    for single, loader in (("model.safetensors", load_file), ("pytorch_model.bin", load_bin)):
        index = directory / f"{single}.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif (directory / single).is_file():
            files = [single]
        else:
            continue
        for name in files:
            yield from loader(directory / name).items()
        return
    raise ValueError(f"{directory}: no model.safetensors or pytorch_model.bin weights")
