"""sentence-transformers cross-encoders score as CrossEncoder.predict does.

A tiny BERT cross-encoder is loaded with sentence_transformers.CrossEncoder and saved by it, so the
checkpoint marks itself as sentence-transformers does (config_sentence_transformers.json, and the
CrossEncoder's max_length in tokenizer_config.json). Its rows must be the tokenizer's own
longest_first pair truncation at the CrossEncoder's max length, and its scores predict's raw logits
(activation_fn=Identity) and, normalized, predict's default sigmoid.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rerank_server.families import describe_model, load_row_builder, load_scorer
from rerank_server.families.base import Row, RowOptions, pack_rows
from rerank_server.families.st_cross_encoder import NAME, longest_first
from rerank_server.types import Truncation
from tiny_models import CORPUS

TOLERANCE = 1e-5
MAX_LENGTH = 64  # the max_length the CrossEncoder is saved with (its tokenizer's model_max_length)
SPECIALS = 3  # [CLS] A [SEP] B [SEP]


@pytest.fixture(scope="module")
def st_dir(st_cross_encoder_dir: Path) -> Path:
    return st_cross_encoder_dir


@pytest.fixture(scope="module")
def cross_encoder(st_dir: Path) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(st_dir), device="cpu")


@pytest.fixture(scope="module")
def tokenizer(st_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(st_dir)


@pytest.fixture(scope="module")
def words(tokenizer: Any) -> list[str]:
    """Distinct corpus words that are one token each, to write texts of an exact token count."""
    found = dict.fromkeys(re.findall(r"[a-z]+", " ".join(CORPUS).lower()))
    single = [w for w in found if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(single) > 100
    return single


def text(words: list[str], count: int, offset: int = 0) -> str:
    """`count` tokens of distinct words (a cut from the wrong end would show)."""
    return " ".join(words[(offset + i) % len(words)] for i in range(count))


def ids(row: Row) -> list[int]:
    return row.tokens["input_ids"].tolist()


def types(row: Row) -> list[int]:
    return row.tokens["token_type_ids"].tolist()


# --- detection -------------------------------------------------------------------------------------


def test_a_checkpoint_saved_by_sentence_transformers_is_detected(
    st_dir: Path, bert_cross_encoder_dir: Path, cross_encoder: Any
) -> None:
    assert (st_dir / "config_sentence_transformers.json").is_file()
    spec = describe_model(str(st_dir))
    assert spec.family == NAME == "sentence-transformers-cross-encoder"
    # The CrossEncoder's max length is the served default.
    assert spec.default_max_length == cross_encoder.max_seq_length == MAX_LENGTH
    assert spec.max_length_limit == 512
    assert spec.token_columns == ("token_type_ids",)
    # The same weights saved by transformers alone stay a FlagReranker-style cross-encoder.
    assert not (bert_cross_encoder_dir / "config_sentence_transformers.json").exists()
    assert describe_model(str(bert_cross_encoder_dir)).family == "cross-encoder"


def test_the_legacy_config_marker_is_detected(bert_cross_encoder_dir: Path, tmp_path: Path) -> None:
    """sentence-transformers before v4 marked the checkpoint in config.json alone."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bert_cross_encoder_dir / name, legacy / name)
    config = json.loads((bert_cross_encoder_dir / "config.json").read_text())
    config["sbert_ce_default_activation_function"] = "torch.nn.modules.activation.Sigmoid"
    (legacy / "config.json").write_text(json.dumps(config))
    spec = describe_model(str(legacy))
    assert (spec.family, spec.default_max_length) == (NAME, 512)


# --- rows ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query_tokens", "document_tokens", "max_length"),
    [
        (5, 200, 64),  # short query, long document: the document is cut
        (200, 5, 64),  # long query, short document: the query keeps more than 3/4 of max_length
        (100, 120, 64),  # both long, odd budget (61): the query gets the smaller half
        (100, 120, 65),  # both long, even budget (62)
        (100, 100, 64),  # equal lengths, odd budget: the first sequence counts as the shorter one
        (100, 100, 65),  # equal lengths, even budget
        (40, 40, 64),  # both over half the budget, unequal after the cut
        (20, 30, 64),  # fits: 20 + 30 + 3 = 53 tokens, nothing cut
        (30, 31, 64),  # fits to the last token: 30 + 31 + 3 == 64
    ],
)
def test_rows_equal_the_tokenizers_longest_first_pair(
    st_dir: Path, tokenizer: Any, words: list[str], query_tokens: int, document_tokens: int, max_length: int
) -> None:
    builder = load_row_builder(describe_model(str(st_dir)))
    query, document = text(words, query_tokens), text(words, document_tokens, offset=7)
    (row,) = builder.rows(query, [document], RowOptions(max_length), 0)
    want = tokenizer(query, document, truncation="longest_first", max_length=max_length)
    assert ids(row) == want["input_ids"]
    assert types(row) == want["token_type_ids"]
    assert row.length <= max_length
    assert row.truncated == (query_tokens + document_tokens + SPECIALS > max_length)
    kept = (types(row).count(0) - 2, types(row).count(1) - 1)
    assert kept == longest_first(query_tokens, document_tokens, max_length - SPECIALS)
    if (query_tokens, document_tokens) == (200, 5):
        assert kept == (max_length - SPECIALS - 5, 5)  # more than FlagReranker's 3/4 of max_length
        assert kept[0] > max_length * 3 // 4


def test_longest_first_agrees_with_the_tokenizer_on_a_grid(
    st_dir: Path, tokenizer: Any, words: list[str]
) -> None:
    builder = load_row_builder(describe_model(str(st_dir)))
    lengths = (1, 2, 5, 9, 10, 11, 20, 29, 30, 31, 32, 45, 61, 62, 70)
    checked = 0
    for max_length in (13, 14, 20, 21, 64):
        budget = max_length - SPECIALS
        for query_tokens in lengths:
            query = text(words, query_tokens)
            for document_tokens in lengths:
                document = text(words, document_tokens, offset=3)
                want = tokenizer(query, document, truncation="longest_first", max_length=max_length)
                kept = (want["token_type_ids"].count(0) - 2, want["token_type_ids"].count(1) - 1)
                assert longest_first(query_tokens, document_tokens, budget) == kept, (
                    query_tokens,
                    document_tokens,
                    budget,
                )
                (row,) = builder.rows(query, [document], RowOptions(max_length), 0)
                assert ids(row) == want["input_ids"]
                checked += 1
    assert checked == 5 * len(lengths) ** 2


def test_truncation_none_refuses_what_longest_first_would_cut(st_dir: Path, words: list[str]) -> None:
    from rerank_server.families.base import PairTooLongError

    builder = load_row_builder(describe_model(str(st_dir)))
    with pytest.raises(PairTooLongError, match="the query needs"):
        builder.rows(text(words, 200), [text(words, 5)], RowOptions(64, Truncation.NONE), 0)
    with pytest.raises(PairTooLongError, match="document 0 needs"):
        builder.rows(text(words, 5), [text(words, 200)], RowOptions(64, Truncation.NONE), 0)
    (row,) = builder.rows(text(words, 30), [text(words, 31)], RowOptions(64, Truncation.NONE), 0)
    assert row.length == 64 and not row.truncated


# --- scores ----------------------------------------------------------------------------------------


def test_scores_equal_cross_encoder_predict(
    st_dir: Path, cross_encoder: Any, words: list[str], tokenizer: Any
) -> None:
    max_length = cross_encoder.max_seq_length
    spec = describe_model(str(st_dir))
    assert max_length == spec.default_max_length
    builder = load_row_builder(spec)
    scorer = load_scorer(spec, "cpu", "float32")
    pairs = [
        (text(words, 5), text(words, 200, offset=11)),
        (text(words, 200), text(words, 5, offset=11)),
        (text(words, 100), text(words, 120, offset=11)),
        (text(words, 100), text(words, 100, offset=11)),
        (text(words, 20), text(words, 30, offset=11)),
        ("what do giant pandas eat?", CORPUS[1]),
        ("what do giant pandas eat?", " ".join(CORPUS)),
        (" ".join(CORPUS[:8]), CORPUS[0]),
        ("Where do penguins live, and can they fly?", CORPUS[17]),
    ]
    rows = [
        row for query, document in pairs for row in builder.rows(query, [document], RowOptions(max_length), 0)
    ]
    assert len(rows) == len(pairs)
    assert len({row.length for row in rows}) > 3  # one right-padded batch of mixed lengths
    for row, (query, document) in zip(rows, pairs, strict=True):
        assert (
            ids(row)
            == tokenizer(query, document, truncation="longest_first", max_length=max_length)["input_ids"]
        )
    raw = scorer.score(pack_rows(rows, spec))
    logits = cross_encoder.predict(pairs, activation_fn=torch.nn.Identity(), show_progress_bar=False)
    assert np.ptp(logits) > 1e-3, "the tiny model must tell these pairs apart"
    np.testing.assert_allclose(raw, logits, rtol=0, atol=TOLERANCE)
    probabilities = cross_encoder.predict(pairs, show_progress_bar=False)  # its default: sigmoid
    assert isinstance(cross_encoder.activation_fn, torch.nn.Sigmoid)
    np.testing.assert_allclose(builder.normalize(raw), probabilities, rtol=0, atol=TOLERANCE)
