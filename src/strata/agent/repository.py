"""The models this node serves right now: one loaded runtime per model name, swapped atomically."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from strata.agent.runtime import Runtime
from strata.core.package import Manifest


@dataclass(frozen=True)
class LoadedModel:
    """A model that passed its health check and serves requests."""

    manifest: Manifest
    digest: str
    runtime: Runtime
    activated_at: float

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version


class ModelRepository:
    """Name -> LoadedModel. Readers take a reference and keep it for the whole request, so a swap never
    changes the model under a request in flight; a replaced runtime is freed when its last request ends."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def all(self) -> list[LoadedModel]:
        return sorted(self._models.values(), key=lambda m: m.name)

    def put(self, model: LoadedModel) -> LoadedModel | None:
        """Serve `model` under its name; return the model it replaced."""
        with self._lock:
            old = self._models.get(model.name)
            self._models = {**self._models, model.name: model}
        return old

    def remove(self, name: str) -> LoadedModel | None:
        with self._lock:
            models = dict(self._models)
            old = models.pop(name, None)
            self._models = models
        return old
