"""LayerwiseMiniCPM against a naive reference written here from the safetensors weights.

The reference runs one pair at a time with no padding, layer by layer with explicit matrices, and
reads every head it can after every layer; the model under test runs mixed-length, right-padded
batches and must give each row its own cutoff's score, within 1e-5 in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from layerwise_reference import naive_scores
from rerank_server.families.minicpm_layerwise_model import LayerwiseMiniCPM
from safetensors.torch import load_file, save_file
from tiny_layerwise import PROMPT, build_minicpm_layerwise
from transformers import AutoTokenizer

LAYERS, START = 6, 2
PAIRS = (
    ("what is panda?", "hi"),
    ("what is panda?", "The giant panda is a bear species endemic to China."),
    ("Where do penguins live, and can they fly?", "Whales are mammals that breathe air."),
    (
        "Why is the sky blue?",
        "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    ),
    ("zebra", ""),
)


def recipe_ids(tokenizer: AutoTokenizer, query: str, passage: str) -> list[int]:
    """The layerwise recipe's sequence (no truncation needed at these lengths):
    <s> "A: query" "\\n" "B: passage" "\\n" prompt."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    sep = ids("\n")
    return [tokenizer.bos_token_id, *ids(f"A: {query}"), *sep, *ids(f"B: {passage}"), *sep, *ids(PROMPT)]


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_minicpm_layerwise(
        tmp_path_factory.mktemp("minicpm-layerwise"), layers=LAYERS, start_layer=START, kv_heads=request.param
    )


@pytest.fixture(scope="module")
def rows(checkpoint: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    return [recipe_ids(tokenizer, query, passage) for query, passage in PAIRS]


@pytest.fixture(scope="module")
def expected(checkpoint: Path, rows: list[list[int]]) -> list[dict[int, float]]:
    return [naive_scores(checkpoint, ids) for ids in rows]


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> LayerwiseMiniCPM:
    return LayerwiseMiniCPM.load(str(checkpoint), device="cpu", dtype=torch.float32)


def right_padded(rows: list[list[int]], pad: int = 10**6) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding with a value no vocabulary holds: the pad value must not matter."""
    width = max(map(len, rows)) + 3
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    return ids, torch.tensor([len(row) for row in rows])


def test_tokenizer_is_llama_style(checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id
    assert len(tokenizer("Yes", add_special_tokens=False).input_ids) == 1
    assert (checkpoint / "tokenizer.json").is_file()


def test_scores_differ_between_inputs(expected: list[dict[int, float]]) -> None:
    finals = [scores[LAYERS] for scores in expected]
    assert min(abs(a - b) for i, a in enumerate(finals) for b in finals[i + 1 :]) > 1e-3


@pytest.mark.parametrize("cutoff", range(START, LAYERS + 1))
def test_padded_batch_matches_reference_at_every_cutoff(
    model: LayerwiseMiniCPM, rows: list[list[int]], expected: list[dict[int, float]], cutoff: int
) -> None:
    ids, lengths = right_padded(rows)
    scores = model.score(ids, lengths, torch.full((len(rows),), cutoff))
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([e[cutoff] for e in expected]), rtol=0, atol=1e-5)


def test_each_row_gets_its_own_cutoff(
    model: LayerwiseMiniCPM, rows: list[list[int]], expected: list[dict[int, float]]
) -> None:
    cutoffs = [5, START, LAYERS, 3, 5]
    ids, lengths = right_padded(rows)
    scores = model.score(ids, lengths, torch.tensor(cutoffs))
    want = torch.tensor([e[k] for e, k in zip(expected, cutoffs, strict=True)])
    torch.testing.assert_close(scores, want, rtol=0, atol=1e-5)
    # A row alone, unpadded, scores the same as inside the batch.
    alone = model.score(torch.tensor([rows[1]]), torch.tensor([len(rows[1])]), torch.tensor([cutoffs[1]]))
    torch.testing.assert_close(alone, want[1:2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cutoffs", [[START, START], [3, START], [4, 5], [LAYERS, START]])
def test_runs_only_max_cutoff_layers(
    model: LayerwiseMiniCPM, rows: list[list[int]], cutoffs: list[int]
) -> None:
    ids, lengths = right_padded(rows[:2])
    before = model.layers_run
    model.score(ids, lengths, torch.tensor(cutoffs))
    assert model.layers_run - before == max(cutoffs)


def test_refuses_cutoffs_without_a_head(model: LayerwiseMiniCPM, rows: list[list[int]]) -> None:
    ids, lengths = right_padded(rows[:1])
    for cutoff in (START - 1, LAYERS + 1):
        with pytest.raises(ValueError, match="cutoff"):
            model.score(ids, lengths, torch.tensor([cutoff]))


def test_load_refuses_a_directory_without_the_config(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"config\.json"):
        LayerwiseMiniCPM.load(str(tmp_path), device="cpu", dtype=torch.float32)
    config = json.loads((checkpoint / "config.json").read_text())
    for change, message in (
        ({"architectures": ["GemmaForCausalLM"]}, "LayerWiseMiniCPMForCausalLM"),
        ({"head_type": "raw"}, "head_type"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            LayerwiseMiniCPM.load(str(tmp_path), device="cpu", dtype=torch.float32)


def test_loads_sharded_safetensors_and_pytorch_bin(
    tmp_path: Path, checkpoint: Path, model: LayerwiseMiniCPM, rows: list[list[int]]
) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded, binary = tmp_path / "sharded", tmp_path / "bin"
    for directory in (sharded, binary):
        directory.mkdir()
        (directory / "config.json").write_text((checkpoint / "config.json").read_text())
    for file, keys in shards.items():
        save_file({key: weights[key] for key in keys}, sharded / file)
    weight_map = {key: file for file, keys in shards.items() for key in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save(weights, binary / "pytorch_model.bin")
    ids, lengths = right_padded(rows)
    cutoffs = torch.full((len(rows),), LAYERS)
    want = model.score(ids, lengths, cutoffs)
    for directory in (sharded, binary):
        loaded = LayerwiseMiniCPM.load(str(directory), device="cpu", dtype=torch.float32)
        torch.testing.assert_close(loaded.score(ids, lengths, cutoffs), want, rtol=0, atol=1e-6)
