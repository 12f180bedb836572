"""bge-reranker-v2-minicpm-layerwise: LayerWiseFlagLLMReranker's recipe, with a per-request cutoff layer.

Rows as bge-reranker-v2-gemma's (bos always first). The model has a score head on every layer from
`start_layer` to the last; a request's `cutoff_layer` picks the head, and a batch runs only as many
layers as its highest cutoff needs, so a lower cutoff is really cheaper. transformers has no class
for the model and its checkpoint's own code must not run: `minicpm_layerwise_model` implements it.
"""

from __future__ import annotations

from dataclasses import replace

from rerank_server.families.base import Family, ModelFiles, ModelSpec, ScoreArray, TokenBatch
from rerank_server.families.gemma import PromptedRows, describe_prompted
from rerank_server.families.llm import has_architecture

NAME = "minicpm-layerwise"
ARCHITECTURE = "LayerWiseMiniCPMForCausalLM"
CUTOFF = "cutoff_layer"


def describe_layerwise(files: ModelFiles) -> ModelSpec:
    layers = int(files.config["num_hidden_layers"])
    start = int(files.config.get("start_layer", layers))
    if not 0 < start <= layers:
        raise ValueError(f"{files.source!r} has start_layer {start} outside [1, {layers}]")
    spec = describe_prompted(files, NAME)
    return replace(spec, cutoff_layers=(start, layers), row_values={CUTOFF: layers})


class LayerwiseScorer:
    """The project's own implementation of the model, run up to the highest cutoff in the batch."""

    def __init__(self, spec: ModelSpec, device: str, dtype: str) -> None:
        import torch

        from rerank_server.families.minicpm_layerwise_model import LayerwiseMiniCPM

        self._device = torch.device(device)
        self._model = LayerwiseMiniCPM.load(spec.source, device=device, dtype=getattr(torch, dtype))
        self._pad_token_id = spec.pad_token_id

    def score(self, batch: TokenBatch) -> ScoreArray:
        import torch

        def tensor(values: object) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.long, device=self._device)

        with torch.inference_mode():
            scores = self._model.score(
                tensor(batch.padded("input_ids", self._pad_token_id)),
                tensor(batch.lengths),
                tensor(batch.values[CUTOFF]),
            )
        return scores.float().cpu().numpy()


FAMILY = Family(
    name=NAME,
    detect=has_architecture(ARCHITECTURE),
    describe=describe_layerwise,
    row_builder=PromptedRows,
    scorer=LayerwiseScorer,
    gpu_dtype="bfloat16",
    names=("minicpm-layerwise",),
)
