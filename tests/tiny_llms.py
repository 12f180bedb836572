"""Tiny, randomly initialized LLM rerankers built offline, for tests that need real causal-LM checkpoints.

One builder per family the server scores by a token's logit: bge-reranker-v2-gemma (GemmaForCausalLM),
Qwen3-Reranker (Qwen3ForCausalLM) and mxbai-rerank-v2 (Qwen2ForCausalLM). Each wraps a small BPE
vocabulary in the transformers tokenizer class the real checkpoint loads with (so AutoTokenizer
reloads it the way it reloads them, with their normalizer, pre-tokenizer, byte handling and special
tokens), seeds torch, and saves weights, config and tokenizer with save_pretrained.

Same arguments, same files: the BPE merges are learned here from CORPUS and the recipe prompts by a
few lines of deterministic BPE (ties broken by the pair's text), not by the `tokenizers` trainers,
which break ties in hash order. Training runs until every word seen is one token, so the scoring
tokens ("Yes", "yes", "no", "0", "1") and the prompt words are single pieces while unseen words
split into smaller pieces (Gemma falls back to bytes for characters it has never seen; the Qwen
tokenizers are byte-level and need no fallback). A large `initializer_range` spreads the scores, so
tests can tell documents apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

from llm_reference import (
    GEMMA_PROMPT,
    MXBAI_PREFIX,
    MXBAI_SUFFIX,
    MXBAI_TASK_PROMPT,
    QWEN3_PREFIX,
    QWEN3_SUFFIX,
    Qwen3Reference,
)
from tiny_models import CORPUS, save_model
from tokenizers import AddedToken
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GemmaTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# Gemma's layout: pad 0, eos 1, bos 2, unk 3, mask 4, then its chat-turn markers (special tokens).
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")
# Appended after the BPE vocabulary, in the real Qwen tokenizers' order.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN3_THINK = ("<think>", "</think>")  # added tokens that are not special, as in the Qwen3 tokenizer
# Extra lone words every vocabulary learns, so the scoring tokens exist whichever recipe is used.
ANSWER_WORDS = ("Yes", "No", "yes", "no", "0", "1", "query", "document", "passage", "instruction")
MAX_POSITIONS = 1024


def _learn_merges(words: Counter[tuple[str, ...]]) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair (ties by text) until every word is one piece."""
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in words.items():
            if best[0] in symbols:
                out: list[str] = []
                index = 0
                while index < len(symbols):
                    if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                        out.append(joined)
                        index += 2
                    else:
                        out.append(symbols[index])
                        index += 1
                symbols = tuple(out)
            merged[symbols] += count
        words = merged


def _bpe_vocab(
    units: Counter[str], alphabet: Iterable[str], specials: Iterable[str] = ()
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Specials, then the alphabet, then one piece per merge, in order: ids are stable across runs."""
    merges = _learn_merges(Counter({tuple(unit): count for unit, count in units.items()}))
    pieces = [*specials, *alphabet, *(left + right for left, right in merges)]
    return {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}, merges


def _training_texts(*prompts: str) -> list[str]:
    """Corpus lines as they reach the tokenizer in the recipes (alone and behind the recipes' labels)."""
    labels = ("", "A: ", "B: ", "query: ", "document: ", "<Query>: ", "<Document>: ")
    return [*(label + line for line in CORPUS for label in labels), *prompts, *ANSWER_WORDS]


def _gemma_tokenizer() -> GemmaTokenizer:
    # The Gemma normalizer turns spaces into "▁" with no prefix space, so a text's first word has no
    # "▁" ("Yes", "A:", "B:") and later words carry it; merges never span a "▁", so words stay apart.
    units: Counter[str] = Counter()
    for text in _training_texts(GEMMA_PROMPT):
        for line in text.split("\n"):
            first, *rest = line.split(" ")
            units.update([first, *(f"▁{word}" for word in rest)])
    units.pop("", None)
    ascii_characters = {chr(code) for code in range(ord("!"), ord("~") + 1)}
    alphabet = sorted({character for unit in units for character in unit} | ascii_characters | {"▁", "\n"})
    byte_pieces = [f"<0x{byte:02X}>" for byte in range(256)]  # byte fallback for unseen characters
    vocab, merges = _bpe_vocab(units, [*byte_pieces, *alphabet], GEMMA_SPECIALS)
    # add_bos_token=True writes the real checkpoints' "<bos> $A" post-processor (the class default adds
    # nothing); the recipes pass add_special_tokens=False and put <bos> in themselves.
    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # BPE takes (left, right) pairs as well as "left right"
        add_bos_token=True,
        extra_special_tokens=list(GEMMA_SPECIALS[5:]),
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to code points from 256."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _qwen_tokenizer(*prompts: str, eos: str, extra_tokens: Iterable[str] = ()) -> Qwen2Tokenizer:
    # Split the training texts with the Qwen pre-tokenizer itself (regex split + byte-level mapping),
    # then put the 256 byte symbols first, in GPT-2 order, as the real vocabularies do.
    splitter = Qwen2Tokenizer().backend_tokenizer
    units: Counter[str] = Counter()
    for text in _training_texts(*prompts):
        # Template strings hold <|im_start|> and the like; learn only the text between them.
        for special in (*QWEN_SPECIALS, *extra_tokens):
            text = text.replace(special, "\n")
        units.update(
            piece
            for piece, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text))
        )
    byte_symbols = _bytes_to_unicode()
    vocab, merges = _bpe_vocab(units, [byte_symbols[byte] for byte in range(256)])
    for token in (*QWEN_SPECIALS, *extra_tokens):  # after the BPE pieces, in the real tokenizers' order
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # BPE takes (left, right) pairs as well as "left right"
        unk_token=None,  # type: ignore[arg-type]  # byte-level: nothing is unknown, as in Qwen's own
        eos_token=eos,
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIALS[1:]),
    )
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in extra_tokens])
    return tokenizer


def build_gemma_reranker(path: str | Path, *, seed: int = 0, max_positions: int = MAX_POSITIONS) -> Path:
    """A GemmaForCausalLM shaped like bge-reranker-v2-gemma (multi-query attention, tied embeddings)."""
    tokenizer = _gemma_tokenizer()
    config = GemmaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=max_positions,
        initializer_range=0.3,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return save_model(GemmaForCausalLM, config, tokenizer, Path(path), seed)


def build_qwen3_reranker(path: str | Path, *, seed: int = 0, max_positions: int = MAX_POSITIONS) -> Path:
    """A Qwen3ForCausalLM shaped like Qwen3-Reranker-0.6B (grouped-query attention, q/k norms, tied)."""
    tokenizer = _qwen_tokenizer(
        QWEN3_PREFIX,
        QWEN3_SUFFIX,
        # The body as the recipe joins it, so "?\n" and ".\n" after a query are pieces too.
        *(Qwen3Reference.body(line, line) for line in CORPUS),
        eos="<|im_end|>",
        extra_tokens=QWEN3_THINK,
    )
    config = Qwen3Config(
        vocab_size=_padded(len(tokenizer)),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_positions,
        initializer_range=0.3,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,  # <|endoftext|>, as in the Qwen configs
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return save_model(Qwen3ForCausalLM, config, tokenizer, Path(path), seed)


def build_mxbai_reranker(path: str | Path, *, seed: int = 0, max_positions: int = MAX_POSITIONS) -> Path:
    """A Qwen2ForCausalLM shaped like mxbai-rerank-base-v2 (Qwen2.5-0.5B: q/k/v biases, tied)."""
    tokenizer = _qwen_tokenizer(
        MXBAI_PREFIX,
        MXBAI_SUFFIX,
        MXBAI_TASK_PROMPT,
        *(f"instruction: {line}\nquery: {line}" for line in CORPUS),
        eos="<|endoftext|>",
    )
    config = Qwen2Config(
        vocab_size=_padded(len(tokenizer)),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.3,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,  # <|endoftext|>, as in the Qwen configs
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return save_model(Qwen2ForCausalLM, config, tokenizer, Path(path), seed)


def _padded(size: int) -> int:
    """The Qwen checkpoints' embedding tables are larger than their tokenizers (151936 rows); keep that."""
    return -(-size // 64) * 64 + 64
