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
from rerank_server.models import DEFAULT_MODEL, describe_model, load_encoder, load_scorer
from rerank_server.models.base import EncodedPair, ModelSpec, PairEncoder, PairScorer, PairTooLongError
from rerank_server.scheduling.scheduler import build_batch_arrays
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


def score_rows(scorer: PairScorer, rows: list[EncodedPair], pad_token_id: int) -> np.ndarray:
    arrays = build_batch_arrays(rows, pad_token_id)
    return scorer.score(arrays.input_ids, arrays.attention_mask, arrays.token_type_ids)


@dataclass
class Served:
    spec: ModelSpec
    encoder: PairEncoder
    scorer: PairScorer


def serve(source: str | Path) -> Served:
    spec = describe_model(str(source))
    return Served(spec, load_encoder(spec), load_scorer(spec, "cpu", "float32"))


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
    rows = served.encoder.encode(query, DOCUMENTS, max_length=max_length, truncate=True)
    expected = [reference.row(query, document, max_length) for document in DOCUMENTS]
    for row, want in zip(rows, expected, strict=True):
        assert row.input_ids == want.input_ids
        if want.token_type_ids is not None:
            assert row.token_type_ids == want.token_type_ids
        assert row.truncated == want.truncated
        assert len(row.input_ids) <= max_length
    # The cases this test names are really exercised.
    assert any(want.truncated for want in expected)
    if query == LONG_QUERY:
        assert len(reference.tokens(query)) > max_length * 3 // 4
        assert all(row.truncated for row in rows)
    scores = score_rows(served.scorer, rows, served.encoder.pad_token_id)  # one padded batch
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
    rows = served.encoder.encode(SHORT_QUERY, documents, max_length=max_length, truncate=True)
    for row, document in zip(rows, documents, strict=True):
        want = reference.tokenizer(SHORT_QUERY, document, truncation="only_second", max_length=max_length)
        assert row.input_ids == want["input_ids"]
        if "token_type_ids" in want:
            assert row.token_type_ids == want["token_type_ids"]


def test_bert_scores_use_token_type_ids(cross: dict[str, tuple[Served, FlagReference]]) -> None:
    served, _ = cross["bert"]
    rows = served.encoder.encode(SHORT_QUERY, DOCUMENTS[:4], max_length=128, truncate=True)
    assert all(1 in row.token_type_ids for row in rows)
    arrays = build_batch_arrays(rows, served.encoder.pad_token_id)
    input_ids, attention_mask, token_type_ids = arrays.input_ids, arrays.attention_mask, arrays.token_type_ids
    with_types = served.scorer.score(input_ids, attention_mask, token_type_ids)
    without_types = served.scorer.score(input_ids, attention_mask, np.zeros_like(token_type_ids))
    assert np.abs(with_types - without_types).max() > 1e-3


def test_xlmr_scorer_leaves_token_type_ids_out(cross: dict[str, tuple[Served, FlagReference]]) -> None:
    served, _ = cross["xlmr"]
    rows = served.encoder.encode(SHORT_QUERY, DOCUMENTS[:4], max_length=128, truncate=True)
    arrays = build_batch_arrays(rows, served.encoder.pad_token_id)
    input_ids, attention_mask, token_type_ids = arrays.input_ids, arrays.attention_mask, arrays.token_type_ids
    # XLM-R has one token type: ids of 1 would index past its table if they were passed on.
    scores = served.scorer.score(input_ids, attention_mask, np.ones_like(token_type_ids))
    np.testing.assert_array_equal(scores, served.scorer.score(input_ids, attention_mask, token_type_ids))


@pytest.mark.parametrize("layout", ["bert", "xlmr"])
def test_cross_encoder_truncate_false_names_the_first_pair_too_long(
    cross: dict[str, tuple[Served, FlagReference]], layout: str
) -> None:
    served, reference = cross[layout]
    documents = [DOCUMENTS[0], DOCUMENTS[1], LONG_DOCUMENT, LONG_DOCUMENT]
    with pytest.raises(PairTooLongError) as raised:
        served.encoder.encode(SHORT_QUERY, documents, max_length=64, truncate=False, first_index=10)
    assert raised.value.index == 12
    assert raised.value.tokens == reference.row(SHORT_QUERY, LONG_DOCUMENT, 64).full_length
    assert raised.value.max_length == 64


@pytest.mark.parametrize("layout", ["bert", "xlmr"])
def test_cross_encoder_truncate_false_keeps_a_long_query_that_fits(
    cross: dict[str, tuple[Served, FlagReference]], layout: str
) -> None:
    served, reference = cross[layout]
    document = DOCUMENTS[0]
    fits = reference.row(LONG_QUERY, document, 512).full_length  # max_length that holds the pair exactly
    assert len(reference.tokens(LONG_QUERY)) > fits * 3 // 4  # the recipe would cut this query

    (whole,) = served.encoder.encode(LONG_QUERY, [document], max_length=fits, truncate=False)
    assert len(whole.input_ids) == fits
    assert not whole.truncated
    (cut,) = served.encoder.encode(LONG_QUERY, [document], max_length=fits, truncate=True)
    assert cut.input_ids == reference.row(LONG_QUERY, document, fits).input_ids
    assert cut.truncated
    with pytest.raises(PairTooLongError) as raised:
        served.encoder.encode(LONG_QUERY, [document], max_length=fits - 1, truncate=False)
    assert (raised.value.index, raised.value.tokens) == (0, fits)


@pytest.mark.parametrize("layout", ["bert", "xlmr"])
def test_cross_encoder_batch_scores_equal_single_row_scores(
    cross: dict[str, tuple[Served, FlagReference]], layout: str
) -> None:
    served, _ = cross[layout]
    rows = served.encoder.encode(SHORT_QUERY, DOCUMENTS, max_length=256, truncate=True)
    rows += served.encoder.encode(LONG_QUERY, DOCUMENTS[:2], max_length=256, truncate=True)
    assert len({len(row.input_ids) for row in rows}) > 3  # a batch that really needs padding
    pad = served.encoder.pad_token_id
    alone = [score_rows(served.scorer, [row], pad)[0] for row in rows]
    np.testing.assert_allclose(score_rows(served.scorer, rows, pad), alone, rtol=0, atol=TOLERANCE)


def test_cross_encoder_runs_in_half_precision(cross: dict[str, tuple[Served, FlagReference]]) -> None:
    served, _ = cross["bert"]
    rows = served.encoder.encode(SHORT_QUERY, DOCUMENTS, max_length=128, truncate=True)
    full = score_rows(served.scorer, rows, served.encoder.pad_token_id)
    half = score_rows(load_scorer(served.spec, "cpu", "bfloat16"), rows, served.encoder.pad_token_id)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, rtol=0, atol=0.05 * np.abs(full).max())


def test_long_pairs_encode_in_linear_time(cross: dict[str, tuple[Served, FlagReference]]) -> None:
    """post_process on truncated encodings combines every overflow piece of the query with every one
    of the document: seconds per pair at this size. The encoder must not go that way."""
    served, _ = cross["bert"]
    started = time.perf_counter()
    rows = served.encoder.encode(LONG_DOCUMENT * 10, [LONG_DOCUMENT * 10] * 3, max_length=512, truncate=True)
    assert time.perf_counter() - started < 3.0
    assert all(len(row.input_ids) == 512 and row.truncated for row in rows)


def test_cross_encoder_normalize_is_a_stable_sigmoid(cross: dict[str, tuple[Served, FlagReference]]) -> None:
    encoder = cross["bert"][0].encoder
    assert encoder.normalize(0.0) == 0.5
    assert encoder.normalize(2.0) == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert encoder.normalize(-2.0) == pytest.approx(1 / (1 + np.exp(2.0)))
    assert encoder.normalize(-1000.0) == 0.0
    assert encoder.normalize(1000.0) == 1.0


# --- bi-encoder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("query", [SHORT_QUERY, LONG_DOCUMENT], ids=["short-query", "long-query"])
def test_bi_encoder_matches_sentence_transformers(
    minilm: tuple[Served, SentenceTransformer], query: str
) -> None:
    served, model = minilm
    assert model.max_seq_length == served.spec.default_max_length
    rows = served.encoder.encode(query, DOCUMENTS, max_length=served.spec.default_max_length, truncate=True)
    for row, document in zip(rows, DOCUMENTS, strict=True):
        length = len(model.tokenizer(document)["input_ids"])  # with specials, nothing cut
        assert row.truncated == (length > model.max_seq_length or query == LONG_DOCUMENT)
    assert any(row.truncated for row in rows)
    scores = score_rows(served.scorer, rows, served.encoder.pad_token_id)
    np.testing.assert_allclose(scores, st_scores(model, query, DOCUMENTS), rtol=0, atol=TOLERANCE)


def test_bi_encoder_rows_split_into_the_tokenizers_encodings(
    minilm: tuple[Served, SentenceTransformer],
) -> None:
    served, model = minilm
    rows = served.encoder.encode(SHORT_QUERY, DOCUMENTS[:4], max_length=256, truncate=True)
    query = model.tokenizer(SHORT_QUERY)["input_ids"]
    for row, document in zip(rows, DOCUMENTS[:4], strict=True):
        types = np.asarray(row.token_type_ids)
        ids = np.asarray(row.input_ids)
        assert ids[types == 0].tolist() == query
        assert ids[types == 1].tolist() == model.tokenizer(document)["input_ids"]
        assert row.token_type_ids == sorted(row.token_type_ids)  # query part first


def test_bi_encoder_keeps_200_tokens_despite_the_tokenizer_json_cap_of_128(
    minilm: tuple[Served, SentenceTransformer],
) -> None:
    served, model = minilm
    document = " ".join(["panda"] * 200)
    assert len(model.tokenizer(document, add_special_tokens=False)["input_ids"]) == 200
    (row,) = served.encoder.encode("pandas", [document], max_length=256, truncate=False)
    assert row.token_type_ids.count(1) == 202  # [CLS] 200 tokens [SEP], neither cut nor padded to 128
    assert row.token_type_ids.count(0) == len(model.tokenizer("pandas")["input_ids"])
    assert not row.truncated
    score = score_rows(served.scorer, [row], served.encoder.pad_token_id)
    np.testing.assert_allclose(score, st_scores(model, "pandas", [document]), rtol=0, atol=TOLERANCE)


def test_bi_encoder_batch_of_several_queries(minilm: tuple[Served, SentenceTransformer]) -> None:
    served, model = minilm
    queries = [SHORT_QUERY, "which city is the capital of France?", SHORT_QUERY]
    rows: list[EncodedPair] = []
    expected: list[float] = []
    for query in queries:
        rows += served.encoder.encode(query, DOCUMENTS[:4], max_length=256, truncate=True)
        expected += st_scores(model, query, DOCUMENTS[:4]).tolist()
    pad = served.encoder.pad_token_id
    batch = score_rows(served.scorer, rows, pad)
    np.testing.assert_allclose(batch, expected, rtol=0, atol=TOLERANCE)
    alone = [score_rows(served.scorer, [row], pad)[0] for row in rows]
    np.testing.assert_allclose(batch, alone, rtol=0, atol=TOLERANCE)


def test_bi_encoder_row_without_a_document_part_scores_zero(
    minilm: tuple[Served, SentenceTransformer],
) -> None:
    """Rows not made by the encoder (a worker's warm-up batch) may carry no token of type 1."""
    served, _ = minilm
    input_ids = np.full((2, 8), 2000, dtype=np.int32)
    token_type_ids = np.zeros((2, 8), dtype=np.int8)
    token_type_ids[1, 4:] = 1
    scores = served.scorer.score(input_ids, np.ones((2, 8), dtype=np.int8), token_type_ids)
    assert scores[0] == 0.0
    assert scores[1] == pytest.approx(1.0, abs=TOLERANCE)  # the same tokens on both sides


def test_bi_encoder_truncate_false(minilm: tuple[Served, SentenceTransformer]) -> None:
    served, model = minilm
    with pytest.raises(PairTooLongError) as raised:
        served.encoder.encode(
            SHORT_QUERY, [DOCUMENTS[0], LONG_DOCUMENT], max_length=256, truncate=False, first_index=3
        )
    assert raised.value.index == 4
    assert raised.value.tokens == len(model.tokenizer(LONG_DOCUMENT)["input_ids"])
    with pytest.raises(PairTooLongError) as raised:
        served.encoder.encode(LONG_DOCUMENT, [DOCUMENTS[0]], max_length=256, truncate=False, first_index=3)
    assert raised.value.index == 3


def test_bi_encoder_normalize_maps_cosine_onto_0_1(minilm: tuple[Served, SentenceTransformer]) -> None:
    encoder = minilm[0].encoder
    assert [encoder.normalize(x) for x in (-1.0, 0.0, 1.0)] == [0.0, 0.5, 1.0]
    assert encoder.normalize(1.0000002) == 1.0
    assert encoder.normalize(-1.0000002) == 0.0


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
    (row,) = served.encoder.encode(LONG_QUERY, [LONG_DOCUMENT], max_length=least, truncate=True)
    assert row.input_ids == reference.row(LONG_QUERY, LONG_DOCUMENT, least).input_ids
    specials = len(reference.row("", "", least).input_ids)
    assert least - specials - least * 3 // 4 >= 1  # the document keeps a token
    below = least - 1
    assert below - specials - below * 3 // 4 < 1  # one less and it would not
    with pytest.raises(ValueError, match="max_length"):
        served.encoder.encode(SHORT_QUERY, [DOCUMENTS[0]], max_length=below, truncate=True)
    with pytest.raises(ValueError, match="max_length"):
        served.encoder.encode(SHORT_QUERY, [DOCUMENTS[0]], max_length=513, truncate=True)


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
        ({}, {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "not supported yet"),
        ({}, {"architectures": ["GPT2Model"], "model_type": "gpt2"}, "not supported yet"),
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
    """A hub id is not a path: describe_model, load_encoder and load_scorer find it in the hub cache."""
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
    rows = load_encoder(spec).encode(SHORT_QUERY, DOCUMENTS, max_length=64, truncate=True)
    assert rows == local.encoder.encode(SHORT_QUERY, DOCUMENTS, max_length=64, truncate=True)
    pad = local.encoder.pad_token_id
    np.testing.assert_array_equal(
        score_rows(load_scorer(spec, "cpu", "float32"), rows, pad), score_rows(local.scorer, rows, pad)
    )
    with pytest.raises(FileNotFoundError):  # offline and never cached
        describe_model("tiny/not-cached")


def test_front_end_half_does_not_import_torch(bert_cross_encoder_dir: Path) -> None:
    code = (
        "import sys\n"
        "from rerank_server.models import DEFAULT_MODEL, describe_model, load_encoder\n"
        f"for source in (DEFAULT_MODEL, {str(bert_cross_encoder_dir)!r}):\n"
        "    load_encoder(describe_model(source)).encode('q', ['d'], max_length=64, truncate=True)\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
