"""The models this node serves right now: one loaded runtime per model name, swapped atomically."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from strata.agent.runtime import Runtime
from strata.core.errors import StrataError
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


Commit = Callable[[], "LoadedModel | None"]  # the change in this process; returns the model it replaced


class MirrorStopping(StrataError):
    """The mirror's processes are being stopped (the agent stops): a change asked of all of them did not happen."""


class Mirror(Protocol):
    """Other processes that serve the same models (`strata.agent.processes.ServingPool`): each change is made
    there first, then here (`commit`)."""

    def put(self, model: LoadedModel, commit: Commit, *, everywhere: bool = False) -> LoadedModel | None: ...

    def remove(self, name: str, commit: Commit) -> LoadedModel | None: ...


class ModelRepository:
    """Name -> LoadedModel. Readers take a reference and keep it for the whole request, so a swap never
    changes the model under a request in flight; a replaced runtime is freed when its last request ends.
    With a `mirror`, a change reaches the node's other serving processes before this one."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self.mirror: Mirror | None = None

    def get(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def all(self) -> list[LoadedModel]:
        return sorted(self._models.values(), key=lambda m: m.name)

    def put(self, model: LoadedModel, *, everywhere: bool = False) -> LoadedModel | None:
        """Serve `model` under its name (in the mirror's processes first); return the model it replaced.

        With `everywhere`, every one of the mirror's processes must load it, or none serves it: a new version that
        one of them cannot load is that version's failure. Without (a rollback, a start), one that cannot is
        started again, serving what the others serve.

        Raises:
            ModelLoadError: `everywhere`, and a process of the mirror could not load it (nothing changed).
            MirrorStopping: `everywhere`, and the mirror's processes are being stopped (nothing changed).
        """
        if self.mirror is None:
            return self._put(model)
        return self.mirror.put(model, lambda: self._put(model), everywhere=everywhere)

    def _put(self, model: LoadedModel) -> LoadedModel | None:
        with self._lock:
            old = self._models.get(model.name)
            self._models = {**self._models, model.name: model}
        return old

    def remove(self, name: str) -> LoadedModel | None:
        """Stop serving model `name` (in the mirror's processes first); return the model it served."""
        if self.mirror is None:
            return self._remove(name)
        return self.mirror.remove(name, lambda: self._remove(name))

    def _remove(self, name: str) -> LoadedModel | None:
        with self._lock:
            models = dict(self._models)
            old = models.pop(name, None)
            self._models = models
        return old
