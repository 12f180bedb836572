"""The served models, by the name clients use; the first is the default for an empty `model` field.

Each model has its own row builder, queue, scheduler and worker processes, so a batch never mixes
models and one model's overload or crash leaves the others serving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from rerank_server.errors import ModelNotFoundError
from rerank_server.families.base import ModelSpec, RowBuilder
from rerank_server.scheduling.scheduler import Scheduler
from rerank_server.types import ModelInfo


@dataclass
class ServedModel:
    """One model as clients see it, the limits its requests are held to, and what serves it."""

    name: str
    spec: ModelSpec
    dtype: str
    devices: tuple[str, ...]
    default_max_length: int
    max_length_limit: int
    rows: RowBuilder
    scheduler: Scheduler
    ready_replicas: Callable[[], int]

    def info(self) -> ModelInfo:
        ready = self.ready_replicas()
        low, high = self.spec.cutoff_layers or (0, 0)
        return ModelInfo(
            name=self.name,
            family=self.spec.family,
            max_length=self.default_max_length,
            max_length_limit=self.max_length_limit,
            dtype=self.dtype,
            devices=list(self.devices),
            replicas=len(self.devices),
            ready_replicas=ready,
            ready=ready > 0,
            takes_instruction=self.spec.default_instruction is not None,
            default_instruction=self.spec.default_instruction or "",
            min_cutoff_layer=low,
            max_cutoff_layer=high,
        )


class ModelRegistry:
    def __init__(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise ValueError("a server needs at least one model")
        self._models = {model.name: model for model in models}
        if len(self._models) != len(models):
            raise ValueError(f"served model names repeat: {[m.name for m in models]}")
        self.default = models[0]

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def get(self, name: str) -> ServedModel:
        """The model a request names ("" = the default); NOT_FOUND lists the served names."""
        if not name:
            return self.default
        model = self._models.get(name)
        if model is None:
            served = ", ".join(repr(n) for n in self._models)
            raise ModelNotFoundError(f"model {name!r} is not served here; served: {served}")
        return model

    def all_ready(self) -> bool:
        return all(model.ready_replicas() > 0 for model in self)

    def any_ready(self) -> bool:
        return any(model.ready_replicas() > 0 for model in self)
