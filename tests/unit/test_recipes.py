"""Each family scores exactly as its reference implementation does on the same inputs.

Cross-encoders are checked against FlagReranker's recipe written here with transformers directly
(transformers 5 has no `prepare_for_model`, so the pair layout is built from the tokenizer's special
token ids as the model families document it), run one pair at a time with no padding. The
bi-encoder is checked against sentence-transformers on the real all-MiniLM-L6-v2 weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from reference import FlagReference, st_scores
from rerank_server.families import DEFAULT_MODEL, describe_model, load_row_builder, load_scorer
from rerank_server.families.base import (
    ModelSpec,
    PairTooLongError,
    Row,
    RowBuilder,
    RowOptions,
    Scorer,
    TokenBatch,
    pack_rows,
)
from rerank_server.types import Truncation
from tiny_models import CORPUS

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

TOLERANCE = 1e-5
SHORT_QUERY = "what do giant pandas eat?"
LONG_QUERY = " ".join(CORPUS[:12])  # well over 3/4 of 64 tokens, under 512
LONG_DOCUMENT = " ".join(CORPUS * 3)  # over 512 tokens for every tokenizer here
DOCUMENTS = [
    "Pandas eat bamboo for most of the day.",
    "",
    "Le panda géant — 大熊猫 — mange du bambou 🐼 naïve café",
    "The train to London leaves from platform four every hour, and the museum displays paintings.",
    LONG_DOCUMENT,
]


@dataclass
class Served:
    spec: ModelSpec
    builder: RowBuilder
    scorer: Scorer

    def encode(
        self,
        query: str,
        documents: list[str],
        max_length: int,
        truncation: Truncation = Truncation.END,
        first: int = 0,
    ) -> list[Row]:
        return self.builder.rows(query, documents, RowOptions(max_length, truncation), first)

    def score(self, rows: list[Row]) -> np.ndarray:
        """Scores of the rows as one padded batch."""
        return self.scorer.score(pack_rows(rows, self.spec))


def serve(source: str | Path) -> Served:
    spec = describe_model(str(source))
    return Served(spec, load_row_builder(spec), load_scorer(spec, "cpu", "float32"))


def ids(row: Row) -> list[int]:
    return row.tokens["input_ids"].tolist()


def types(row: Row) -> list[int]:
    return row.tokens["token_type_ids"].tolist()


@pytest.fixture(scope="module")
def cross(
    bert_cross_encoder_dir: Path, xlmr_cross_encoder_dir: Path
) -> dict[str, tuple[Served, FlagReference]]:
    return {
        "bert": (serve(bert_cross_encoder_dir), FlagReference(bert_cross_encoder_dir, "bert")),
        "xlmr": (serve(xlmr_cross_encoder_dir), FlagReference(xlmr_cross_encoder_dir, "xlmr")),
    }


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> tuple[Served, SentenceTransformer]:
    from sentence_transformers import SentenceTransformer

    return serve(DEFAULT_MODEL), SentenceTransformer(str(minilm_dir), device="cpu")


# --- cross-encoders -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bert", "xlmr"])
@pytest.mark.parametrize(
    ("query", "max_length"),
    [(SHORT_QUERY, 512), (SHORT_QUERY, 64), (LONG_QUERY, 64)],
    ids=["short-query-512", "short-query-64", "long-query-64"],
)
def test_cross_encoder_matches_flag_reranker(
    cross: dict[str, tuple[Served, FlagReference]], layout: str, query: str, max_length: int
) -> None:
    served, reference = cross[layout]
    rows = served.encode(query, DOCUMENTS, max_length)
    expected = [reference.row(query, document, max_length) for document in DOCUMENTS]
    for row, want in zip(rows, expected, strict=True):
        assert ids(row) == want.input_ids
        if want.token_type_ids is not None:
            assert types(row) == want.token_type_ids
        assert row.truncated == want.truncated
        assert row.length <= max_length
    # The cases this test names are really exercised.
    assert any(want.truncated for want in expected)
    if query == LONG_QUERY:
        assert len(reference.tokens(query)) > max_length * 3 // 4
        assert all(row.truncated for row in rows)
    scores = served.score(rows)  # one padded batch
    want_scores = [reference.score(want) for want in expected]  # one pair at a time
    assert np.ptp(want_scores) > 1e-3, "the tiny model must tell these inputs apart"
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("layout", ["bert", "xlmr"])
@pytest.mark.parametrize("max_length", [512, 64, 20])
def test_short_query_rows_equal_the_tokenizers_only_second_pair(
    cross: dict[str, tuple[Served, FlagReference]], layout: str, max_length: int
) -> None:
    served, reference = cross[layout]
    # Not the empty document: transformers 5 takes an empty text_pair for no pair at all and leaves
    # out the closing separator that FlagReranker's prepare_for_model (and the encoder) puts there.
    documents = [document for document in DOCUMENTS if document]
    rows = served.encode(SHORT_QUERY, documents, max_length)
    for row, document in zip(rows, documents, strict=True):
        want = reference.tokenizer(SHORT_QUERY, document, truncation="only_second", max_length=max_length)
        assert ids(row) == want["input_ids"]
        if "token_type_ids" in want:
            assert types(row) == want["token_type_ids"]


def test_bert_scores_use_token_type_ids(cross: dict[str, tuple[Served, FlagReference]]) -> None:
    served, _ = cross["bert"]
    rows = served.encode(SHORT_QUERY, DOCUMENTS[:4], 128)
    assert all(1 in types(row) for row in rows)
    batch = pack_rows(rows, served.spec)
    untyped = TokenBatch(
        batch.lengths, {**batch.tokens, "token_type_ids": np.zeros_like(batch.tokens["token_type_ids"])}, {}
    )
    assert np.abs(served.scorer.score(batch) - served.scorer.score(untyped)).max() > 1e-3


def test_xlmr_rows_carry_no_token_type_ids(cross: dict[str, tuple[Served, FlagReference]]) -> None:
    """XLM-R has one token type: its rows and batches carry input_ids alone."""
    served, _ = cross["xlmr"]
    assert served.spec.token_columns == ()
    (row,) = served.encode(SHORT_QUERY, DOCUMENTS[:1], 128)
    assert set(row.tokens) == {"input_ids"}


@pytest.mark.parametrize("layout", ["bert", "xlmr"])
def test_cross_encoder_truncation_none_names_the_first_pair_too_long(
    cross: dict[str, tuple[Served, FlagReference]], layout: str
) -> None:
    served, _ = cross[layout]
    documents = [DOCUMENTS[0], DOCUMENTS[1], LONG_DOCUMENT, LONG_DOCUMENT]
    with pytest.raises(PairTooLongError, match=r"document 12 needs \d+ tokens; \d+ fit .* max_length 64"):
        served.encode(SHORT_QUERY, documents, 64, Truncation.NONE, first=10)


@pytest.mark.parametrize("layout", ["bert", "xlmr"])
def test_cross_encoder_truncation_none_refuses_what_the_recipe_would_cut(
    cross: dict[str, tuple[Served, FlagReference]], layout: str
) -> None:
    """The recipe cuts a query over 3/4 of max_length even when the pair would fit whole: NONE refuses
    it rather than score a row the reference never would."""
    served, reference = cross[layout]
    document = DOCUMENTS[0]
    fits = reference.row(LONG_QUERY, document, 512).full_length  # max_length that holds the pair exactly
    assert len(reference.tokens(LONG_QUERY)) > fits * 3 // 4  # the recipe would cut this query
    with pytest.raises(PairTooLongError, match="the query needs"):
        served.encode(LONG_QUERY, [document], fits, Truncation.NONE)
    (cut,) = served.encode(LONG_QUERY, [document], fits)
    assert ids(cut) == reference.row(LONG_QUERY, document, fits).input_ids
    assert cut.truncated
    (whole,) = served.encode(SHORT_QUERY, [document], 64, Truncation.NONE)
    assert ids(whole) == reference.row(SHORT_QUERY, document, 64).input_ids
    assert not whole.truncated


@pytest.mark.parametrize("layout", ["bert", "xlmr"])
def test_cross_encoder_batch_scores_equal_single_row_scores(
    cross: dict[str, tuple[Served, FlagReference]], layout: str
) -> None:
    served, _ = cross[layout]
    rows = served.encode(SHORT_QUERY, DOCUMENTS, 256)
    rows += served.encode(LONG_QUERY, DOCUMENTS[:2], 256)
    assert len({row.length for row in rows}) > 3  # a batch that really needs padding
    alone = [served.score([row])[0] for row in rows]
    np.testing.assert_allclose(served.score(rows), alone, rtol=0, atol=TOLERANCE)


def test_cross_encoder_runs_in_half_precision(cross: dict[str, tuple[Served, FlagReference]]) -> None:
    served, _ = cross["bert"]
    rows = served.encode(SHORT_QUERY, DOCUMENTS, 128)
    full = served.score(rows)
    half = load_scorer(served.spec, "cpu", "bfloat16").score(pack_rows(rows, served.spec))
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, rtol=0, atol=0.05 * np.abs(full).max())


def test_long_pairs_encode_in_linear_time(cross: dict[str, tuple[Served, FlagReference]]) -> None:
    """post_process on truncated encodings combines every overflow piece of the query with every one
    of the document: seconds per pair at this size. The row builder must not go that way."""
    served, _ = cross["bert"]
    started = time.perf_counter()
    rows = served.encode(LONG_DOCUMENT * 10, [LONG_DOCUMENT * 10] * 3, 512)
    assert time.perf_counter() - started < 3.0
    assert all(row.length == 512 and row.truncated for row in rows)


def test_cross_encoder_normalize_is_a_stable_sigmoid(cross: dict[str, tuple[Served, FlagReference]]) -> None:
    normalize = cross["bert"][0].builder.normalize
    raw = np.array([0.0, 2.0, -2.0, -1000.0, 1000.0], dtype=np.float32)
    expected = [0.5, 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0)), 0.0, 1.0]
    np.testing.assert_allclose(normalize(raw), expected, rtol=1e-6, atol=0)


def test_user_text_that_spells_special_tokens_stays_text(
    cross: dict[str, tuple[Served, FlagReference]],
) -> None:
    served, reference = cross["bert"]
    (row,) = served.encode("pandas [SEP] bamboo", ["[CLS] eat [SEP] [PAD]"], 64)
    tokenizer = reference.tokenizer
    specials = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    inner = ids(row)[1:-1]
    assert sum(token in specials for token in inner) == 1  # the one [SEP] between query and document


# --- bi-encoder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("query", [SHORT_QUERY, LONG_DOCUMENT], ids=["short-query", "long-query"])
def test_bi_encoder_matches_sentence_transformers(
    minilm: tuple[Served, SentenceTransformer], query: str
) -> None:
    served, model = minilm
    assert model.max_seq_length == served.spec.default_max_length
    rows = served.encode(query, DOCUMENTS, served.spec.default_max_length)
    for row, document in zip(rows, DOCUMENTS, strict=True):
        length = len(model.tokenizer(document)["input_ids"])  # with specials, nothing cut
        assert row.truncated == (length > model.max_seq_length or query == LONG_DOCUMENT)
    assert any(row.truncated for row in rows)
    np.testing.assert_allclose(served.score(rows), st_scores(model, query, DOCUMENTS), rtol=0, atol=TOLERANCE)


def test_bi_encoder_rows_split_into_the_tokenizers_encodings(
    minilm: tuple[Served, SentenceTransformer],
) -> None:
    served, model = minilm
    rows = served.encode(SHORT_QUERY, DOCUMENTS[:4], 256)
    query = model.tokenizer(SHORT_QUERY)["input_ids"]
    for row, document in zip(rows, DOCUMENTS[:4], strict=True):
        row_types = np.asarray(types(row))
        row_ids = np.asarray(ids(row))
        assert row_ids[row_types == 0].tolist() == query
        assert row_ids[row_types == 1].tolist() == model.tokenizer(document)["input_ids"]
        assert types(row) == sorted(types(row))  # query part first


def test_bi_encoder_keeps_200_tokens_despite_the_tokenizer_json_cap_of_128(
    minilm: tuple[Served, SentenceTransformer],
) -> None:
    served, model = minilm
    document = " ".join(["panda"] * 200)
    assert len(model.tokenizer(document, add_special_tokens=False)["input_ids"]) == 200
    (row,) = served.encode("pandas", [document], 256, Truncation.NONE)
    assert types(row).count(1) == 202  # [CLS] 200 tokens [SEP], neither cut nor padded to 128
    assert types(row).count(0) == len(model.tokenizer("pandas")["input_ids"])
    assert not row.truncated
    np.testing.assert_allclose(
        served.score([row]), st_scores(model, "pandas", [document]), rtol=0, atol=TOLERANCE
    )


def test_bi_encoder_batch_of_several_queries(minilm: tuple[Served, SentenceTransformer]) -> None:
    served, model = minilm
    queries = [SHORT_QUERY, "which city is the capital of France?", SHORT_QUERY]
    rows: list[Row] = []
    expected: list[float] = []
    for query in queries:
        rows += served.encode(query, DOCUMENTS[:4], 256)
        expected += st_scores(model, query, DOCUMENTS[:4]).tolist()
    batch = served.score(rows)
    np.testing.assert_allclose(batch, expected, rtol=0, atol=TOLERANCE)
    alone = [served.score([row])[0] for row in rows]
    np.testing.assert_allclose(batch, alone, rtol=0, atol=TOLERANCE)


def test_bi_encoder_row_without_a_document_part_scores_zero(
    minilm: tuple[Served, SentenceTransformer],
) -> None:
    """Rows not made by the row builder (a worker's warm-up batch) may carry no token of type 1."""
    served, _ = minilm
    token_types = np.zeros(16, dtype=np.int32)
    token_types[12:] = 1
    batch = TokenBatch(
        np.array([8, 8], dtype=np.int32),
        {"input_ids": np.full(16, 2000, dtype=np.int32), "token_type_ids": token_types},
        {},
    )
    scores = served.scorer.score(batch)
    assert scores[0] == 0.0
    assert scores[1] == pytest.approx(1.0, abs=TOLERANCE)  # the same tokens on both sides


def test_bi_encoder_truncation_none(minilm: tuple[Served, SentenceTransformer]) -> None:
    served, _ = minilm
    with pytest.raises(PairTooLongError, match="document 4 needs"):
        served.encode(SHORT_QUERY, [DOCUMENTS[0], LONG_DOCUMENT], 256, Truncation.NONE, first=3)
    with pytest.raises(PairTooLongError, match="the query needs"):
        served.encode(LONG_DOCUMENT, [DOCUMENTS[0]], 256, Truncation.NONE, first=3)


def test_bi_encoder_normalize_maps_cosine_onto_0_1(minilm: tuple[Served, SentenceTransformer]) -> None:
    normalize = minilm[0].builder.normalize
    raw = np.array([-1.0, 0.0, 1.0, 1.0000002, -1.0000002], dtype=np.float32)
    assert normalize(raw).tolist() == [0.0, 0.5, 1.0, 1.0, 0.0]


# --- describe_model -------------------------------------------------------------------------------


def config_of(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def variant(source: Path, target: Path, files: dict[str, Any], **config: Any) -> Path:
    """A copy of a model's config and tokenizer (no weights: describe_model never reads them) with
    config keys changed and extra JSON files added."""
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)
    (target / "config.json").write_text(json.dumps({**config_of(source), **config}))
    for name, content in files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(json.dumps(content))
    return target


def test_describe_tiny_cross_encoders(
    cross: dict[str, tuple[Served, FlagReference]], bert_cross_encoder_dir: Path, xlmr_cross_encoder_dir: Path
) -> None:
    bert, xlmr = cross["bert"][0].spec, cross["xlmr"][0].spec
    assert (bert.family, bert.source) == ("cross-encoder", str(bert_cross_encoder_dir))
    assert bert.max_length_limit == config_of(bert_cross_encoder_dir)["max_position_embeddings"] == 512
    assert xlmr.family == "cross-encoder"
    config = config_of(xlmr_cross_encoder_dir)
    assert xlmr.max_length_limit == config["max_position_embeddings"] - config["pad_token_id"] - 1 == 512
    assert bert.default_max_length == xlmr.default_max_length == 512


@pytest.mark.parametrize("layout", ["bert", "xlmr"])
def test_min_max_length_is_the_least_that_leaves_the_document_a_token(
    cross: dict[str, tuple[Served, FlagReference]], layout: str
) -> None:
    served, reference = cross[layout]
    least = served.spec.min_max_length
    (row,) = served.encode(LONG_QUERY, [LONG_DOCUMENT], least)
    assert ids(row) == reference.row(LONG_QUERY, LONG_DOCUMENT, least).input_ids
    specials = len(reference.row("", "", least).input_ids)
    assert least - specials - least * 3 // 4 >= 1  # the document keeps a token
    below = least - 1
    assert below - specials - below * 3 // 4 < 1  # one less and it would not


def test_describe_default_model_uses_the_packaged_weights(
    minilm: tuple[Served, SentenceTransformer], minilm_dir: Path
) -> None:
    spec = minilm[0].spec
    assert spec == describe_model(str(minilm_dir))
    assert spec.source == str(minilm_dir)
    assert spec.family == "bi-encoder"
    assert (
        spec.default_max_length
        == json.loads((minilm_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    )
    assert spec.max_length_limit == config_of(minilm_dir)["max_position_embeddings"]
    # [CLS] and [SEP] on each side, plus one token of text.
    assert spec.min_max_length == len(minilm[1].tokenizer("")["input_ids"]) + 1


def test_describe_v2_m3_sized_positions(xlmr_cross_encoder_dir: Path, tmp_path: Path) -> None:
    path = variant(xlmr_cross_encoder_dir, tmp_path / "m3", {}, max_position_embeddings=8194)
    spec = describe_model(str(path))
    assert (spec.max_length_limit, spec.default_max_length) == (8192, 512)


def test_describe_explicit_family_overrides_detection(bert_cross_encoder_dir: Path) -> None:
    spec = describe_model(str(bert_cross_encoder_dir), "bi-encoder")
    assert (spec.family, spec.default_max_length, spec.min_max_length) == ("bi-encoder", 512, 3)
    assert describe_model(str(bert_cross_encoder_dir), "cross-encoder").family == "cross-encoder"


def test_describe_bare_and_sentence_transformers_encoders(
    bert_cross_encoder_dir: Path, tmp_path: Path
) -> None:
    bare = variant(bert_cross_encoder_dir, tmp_path / "bare", {}, architectures=["BertModel"])
    assert describe_model(str(bare)).family == "bi-encoder"
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": "",
            "type": "sentence_transformers.base.modules.transformer.Transformer",
        },
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    newer = variant(
        bert_cross_encoder_dir,
        tmp_path / "newer",
        {"modules.json": modules, "1_Pooling/config.json": {"pooling_mode": "mean"}},
        architectures=["BertModel"],
    )
    tokenizer_config = json.loads((newer / "tokenizer_config.json").read_text())
    (newer / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 128}))
    spec = describe_model(str(newer))
    assert (spec.family, spec.default_max_length) == ("bi-encoder", 128)


@pytest.mark.parametrize(
    ("files", "config", "message"),
    [
        ({}, {"id2label": {"0": "NO", "1": "YES"}, "label2id": {"NO": 0, "YES": 1}}, "2 labels"),
        ({}, {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "not a supported reranker"),
        ({}, {"architectures": ["GPT2Model"], "model_type": "gpt2"}, "not a supported reranker"),
        (
            {
                "modules.json": [{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}],
                "1_Pooling/config.json": {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
            },
            {"architectures": ["BertModel"]},
            "mean pooling",
        ),
        (
            {"modules.json": [{"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]},
            {"architectures": ["BertModel"]},
            "Dense",
        ),
    ],
)
def test_describe_rejects_what_no_family_can_score(
    bert_cross_encoder_dir: Path, tmp_path: Path, files: dict[str, Any], config: dict[str, Any], message: str
) -> None:
    path = variant(bert_cross_encoder_dir, tmp_path / "model", files, **config)
    with pytest.raises(ValueError, match=message):
        describe_model(str(path))


def test_describe_rejects_bad_arguments(bert_cross_encoder_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model family"):
        describe_model(str(bert_cross_encoder_dir), "llm")
    two_labels = variant(bert_cross_encoder_dir, tmp_path / "two", {}, id2label={"0": "NO", "1": "YES"})
    with pytest.raises(ValueError, match="exactly one logit"):
        describe_model(str(two_labels), "cross-encoder")
    with pytest.raises(FileNotFoundError):
        describe_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        describe_model(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        load_scorer(describe_model(str(bert_cross_encoder_dir)), "cpu", "int8")


def test_hub_ids_load_through_the_hub_cache(
    cross: dict[str, tuple[Served, FlagReference]],
    bert_cross_encoder_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hub id is not a path: describe_model, the row builder and the scorer find it in the hub cache."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny--bert-reranker"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(bert_cross_encoder_dir, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    spec = describe_model("tiny/bert-reranker")
    local = cross["bert"][0]
    assert spec == replace(local.spec, source="tiny/bert-reranker")
    rows = load_row_builder(spec).rows(SHORT_QUERY, DOCUMENTS, RowOptions(64), 0)
    assert [ids(row) for row in rows] == [ids(row) for row in local.encode(SHORT_QUERY, DOCUMENTS, 64)]
    batch = pack_rows(rows, spec)
    np.testing.assert_array_equal(load_scorer(spec, "cpu", "float32").score(batch), local.scorer.score(batch))
    with pytest.raises(FileNotFoundError):  # offline and never cached
        describe_model("tiny/not-cached")


def test_front_end_half_does_not_import_torch(bert_cross_encoder_dir: Path) -> None:
    code = (
        "import sys\n"
        "from rerank_server.families import DEFAULT_MODEL, describe_model, load_row_builder\n"
        "from rerank_server.families.base import RowOptions\n"
        f"for source in (DEFAULT_MODEL, {str(bert_cross_encoder_dir)!r}):\n"
        "    load_row_builder(describe_model(source)).rows('q', ['d'], RowOptions(64), 0)\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
