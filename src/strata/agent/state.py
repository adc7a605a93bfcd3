"""The node's state as plain values: the slots of each model, the failures it remembers, the activations on
probation, the package being loaded, and their JSON form in state.json. No I/O: `strata.agent.store` reads and
writes them, and the pure planners (`plan`, `probation`) and the simulator take them as they are."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from strata.core.wire import Failure


@dataclass(frozen=True)
class SlotRef:
    """A package in a slot: which digest, which model version and variant, since when."""

    digest: str
    version: str
    variant: str
    activated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "version": self.version,
            "variant": self.variant,
            "activated_at": self.activated_at,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> SlotRef:
        return cls(
            digest=str(raw["digest"]),
            version=str(raw["version"]),
            variant=str(raw["variant"]),
            activated_at=float(raw["activated_at"]),
        )


@dataclass(frozen=True)
class ModelSlots:
    active: SlotRef
    previous: SlotRef | None = None

    def to_json(self) -> dict[str, Any]:
        return {"active": self.active.to_json(), "previous": self.previous.to_json() if self.previous else None}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelSlots:
        previous = raw.get("previous")
        return cls(active=SlotRef.from_json(raw["active"]), previous=SlotRef.from_json(previous) if previous else None)


# A target that failed (download, verification, load or health check): the status report's record, kept as is in
# state.json (one shape on disk and on the wire, so every kind the agent records reaches the control plane).
FailureRecord = Failure


@dataclass(frozen=True)
class ProbationRecord:
    """A fresh activation the node is still watching, and the latency it is judged against.

    Kept in state.json, so a restart during probation carries on: with counters from the restart on, and so with its
    window from the restart on (`started_at`; time the agent was down judged nothing), and the restarts counted
    (`restarts`: a version whose inference kills the agent never counts an error, but makes it restart).
    """

    version: str
    digest: str
    started_at: float
    reference_p95_ms: float | None = None
    reference: str = "none"
    restarts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "digest": self.digest,
            "started_at": self.started_at,
            "reference_p95_ms": self.reference_p95_ms,
            "reference": self.reference,
            "restarts": self.restarts,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ProbationRecord:
        reference = raw.get("reference_p95_ms")
        return cls(
            version=str(raw["version"]),
            digest=str(raw["digest"]),
            started_at=float(raw["started_at"]),
            reference_p95_ms=float(reference) if reference is not None else None,
            reference=str(raw.get("reference", "none")),
            restarts=max(0, int(raw.get("restarts", 0))),
        )


@dataclass(frozen=True)
class LoadingRecord:
    """The package the agent is loading: written to state.json (fsynced) before the load starts and cleared once it
    succeeded or failed, so one found there at start-up is a load the agent died in (killed for its memory, a crash
    in the runtime, a stop it did not wait out, a power cut) and is judged by `died_loading`.

    `boot` is the kernel's boot id when the load began ("" where there is none); `startup`: a start-up load of a
    version in the slots (one the node served), not an activation; `deaths` counts the start-up loads of this package
    the agent died in just before this one."""

    model: str
    version: str
    variant: str
    digest: str
    started_at: float
    boot: str = ""
    startup: bool = False
    deaths: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "variant": self.variant,
            "digest": self.digest,
            "started_at": self.started_at,
            "boot": self.boot,
            "startup": self.startup,
            "deaths": self.deaths,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LoadingRecord:
        return cls(
            model=str(raw["model"]),
            version=str(raw["version"]),
            variant=str(raw["variant"]),
            digest=str(raw["digest"]),
            started_at=float(raw["started_at"]),
            boot=str(raw.get("boot", "")),
            startup=raw.get("startup") is True,
            deaths=max(0, int(raw.get("deaths", 0))),
        )


DiedLoading = Literal["rebooted", "again", "failed"]
MAX_LOAD_DEATHS: Final = 3  # loads of one package in a row that ended the agent or the machine: its failure


def died_loading(record: LoadingRecord, boot: str) -> DiedLoading:
    """What a load the agent died in (its record left in the state) means at the next start.

    - "rebooted": the machine restarted since the load began (another boot id): a power cut or a reboot, as likely
      not the package's doing; it is loaded again (its deaths counted).
    - "again": a start-up load of a version the node served (`startup`) that the agent died in once in this boot: a
      stop that did not wait for the load (a service manager's kill), or something else taking the memory, as likely
      as the package; loaded once more, and a second death in its load is its failure.
    - "failed": a new version's activation the agent died in within one boot, a second death in a start-up load, or
      `MAX_LOAD_DEATHS` loads in a row ended whatever the boots (a load that panics or hangs the machine until its
      watchdog resets it would otherwise reboot it for ever): the version's failure (rolled back from, reported,
      tried again only after its back-off), so a package that kills the agent is not loaded again at every start.
    """
    if record.deaths + 1 >= MAX_LOAD_DEATHS:
        return "failed"
    if record.boot and boot and record.boot != boot:
        return "rebooted"
    if record.startup and record.deaths == 0:
        return "again"
    return "failed"


def boot_id() -> str:
    """This boot's id (Linux), or an empty string elsewhere."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class NodeState:
    """What survives a restart: the slots of every model, the failures still remembered, the activations still on
    probation, and the package being loaded (if any)."""

    models: Mapping[str, ModelSlots] = field(default_factory=dict)
    failures: Mapping[str, FailureRecord] = field(default_factory=dict)
    probation: Mapping[str, ProbationRecord] = field(default_factory=dict)
    loading: LoadingRecord | None = None

    def to_json(self) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "models": {name: slots.to_json() for name, slots in sorted(self.models.items())},
            "failures": {key: record.to_json() for key, record in sorted(self.failures.items())},
            "probation": {name: record.to_json() for name, record in sorted(self.probation.items())},
        }
        if self.loading is not None:
            raw["loading"] = self.loading.to_json()
        return raw

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> NodeState:
        loading = raw.get("loading")
        return cls(
            models={name: ModelSlots.from_json(s) for name, s in raw.get("models", {}).items()},
            failures={key: Failure.from_json(f) for key, f in raw.get("failures", {}).items()},
            probation={name: ProbationRecord.from_json(p) for name, p in raw.get("probation", {}).items()},
            loading=LoadingRecord.from_json(loading) if loading else None,
        )

    def with_active(self, model: str, slot: SlotRef) -> NodeState:
        """Slots after activating `slot`: the old active becomes previous (unless it is the same package), except
        an old active still on probation when a version before it passed: the one that proved itself stays the
        version to go back to, and the one never judged is given up (a rollback to it would serve it unjudged)."""
        current = self.models.get(model)
        previous = current.active if current and current.active.digest != slot.digest else None
        if previous is None and current is not None:
            previous = current.previous
        watched = self.probation.get(model)
        if (
            current is not None
            and current.previous is not None
            and current.previous.digest != slot.digest
            and watched is not None
            and watched.digest == current.active.digest
        ):
            previous = current.previous
        models = {**self.models, model: ModelSlots(active=slot, previous=previous)}
        failures = {k: v for k, v in self.failures.items() if k != slot.digest}
        probation = {k: v for k, v in self.probation.items() if k != model}
        return replace(self, models=models, failures=failures, probation=probation)

    def without_model(self, model: str) -> NodeState:
        return replace(
            self,
            models={k: v for k, v in self.models.items() if k != model},
            probation={k: v for k, v in self.probation.items() if k != model},
        )

    def rolled_back(self, model: str) -> NodeState:
        """Slots after giving up the active package: the previous one is active again (and no longer previous).

        Raises:
            KeyError: the model has no previous slot to go back to.
        """
        slots = self.models[model]
        if slots.previous is None:
            raise KeyError(f"{model} has no previous slot")
        models = {**self.models, model: ModelSlots(active=slots.previous, previous=None)}
        return replace(self, models=models, probation={k: v for k, v in self.probation.items() if k != model})

    def with_probation(self, model: str, record: ProbationRecord) -> NodeState:
        return replace(self, probation={**self.probation, model: record})

    def without_probation(self, model: str) -> NodeState:
        return replace(self, probation={k: v for k, v in self.probation.items() if k != model})

    def with_failure(self, key: str, record: FailureRecord) -> NodeState:
        return replace(self, failures={**self.failures, key: record})

    def with_loading(self, record: LoadingRecord | None) -> NodeState:
        """The state with `record` as the package being loaded (None: no load in progress)."""
        return replace(self, loading=record)

    def without_failures(self, keys: set[str]) -> NodeState:
        return replace(self, failures={k: v for k, v in self.failures.items() if k not in keys})
