"""The driver of `plan`: observes the node, carries out each action, and reports what happened.

Everything here is I/O around the pure planner: downloads, staging, loading runtimes, swapping slots.
Each action either completes or leaves the node as it was; errors become remembered failures so the node
keeps serving its active models and tries again later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from strata import __version__
from strata.agent.client import ControlPlaneClient
from strata.agent.fetch import Progress
from strata.agent.pieces import FetchReport, PackageFetcher
from strata.agent.plan import (
    Action,
    Activate,
    CollectGarbage,
    Download,
    ForgetFailures,
    Observed,
    RecordFailure,
    Stage,
    Unload,
    plan,
)
from strata.agent.repository import LoadedModel, ModelRepository
from strata.agent.runtime import load_and_check
from strata.agent.store import ArtifactStore, FailureRecord, NodeState, SlotRef
from strata.core.errors import ModelLoadError, PackageError, StrataError, TransportError
from strata.core.profiles import Profile
from strata.core.wire import DesiredState, Failure, ModelStatus, NodeStatus

log = logging.getLogger("strata.agent")

MAX_STEPS = 64


@dataclass(frozen=True)
class NodeIdentity:
    """Who this node says it is in every status report."""

    tier: str
    labels: dict[str, str]
    profile: Profile
    emulated: bool
    serve_url: str | None


class Reconciler:
    """Moves the node toward its desired state and keeps the model repository in step with the slots."""

    def __init__(
        self,
        store: ArtifactStore,
        repository: ModelRepository,
        client: ControlPlaneClient,
        identity: NodeIdentity,
        runtimes: frozenset[str],
        *,
        inference_threads: int | None = None,
        rate_limit: int | None = None,
        clock: Callable[[], float] = time.time,
        progress: Progress | None = None,
        relays: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        self.store = store
        self.repository = repository
        self.client = client
        self.identity = identity
        self.runtimes = runtimes
        self.inference_threads = inference_threads
        self.rate_limit = rate_limit
        self.clock = clock
        self.progress = progress
        self.state = store.load_state()
        self.fetcher = PackageFetcher(client, store, relays, rate_limit=rate_limit, progress=progress)
        self.fetched = FetchReport()

    # --- start-up ---------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Load every model whose slots say it is active, before any network call.

        A package that no longer verifies or loads is replaced by its previous slot when that one is good;
        otherwise the model is dropped from the slots and the failure remembered.
        """
        state = self.state
        for name, slots in sorted(state.models.items()):
            for slot in (slots.active, slots.previous):
                if slot is None:
                    continue
                try:
                    self._load(name, slot)
                except StrataError as exc:
                    log.error("model %s %s (%s) cannot be served: %s", name, slot.version, slot.digest[:19], exc)
                    state = state.with_failure(slot.digest, self._failure(name, slot.version, slot.variant, str(exc)))
                    continue
                if slot is not slots.active:
                    state = state.with_active(name, slot)
                    log.warning("model %s rolled back to %s at start-up", name, slot.version)
                break
            else:
                state = state.without_model(name)
        self._commit(state)

    def _load(self, name: str, slot: SlotRef) -> None:
        package = self.store.package(slot.digest)
        runtime = load_and_check(package, self.inference_threads)
        self.repository.put(
            LoadedModel(manifest=package.manifest, digest=slot.digest, runtime=runtime, activated_at=slot.activated_at)
        )

    # --- planning and acting ----------------------------------------------------------------------------

    def observe(self) -> Observed:
        return Observed(
            profile=self.identity.profile,
            runtimes=self.runtimes,
            slots=self.state.models,
            staged=self.store.staged_digests(),
            downloaded=self.store.downloaded_blobs(),
            failures=self.state.failures,
        )

    def converge(self, desired: DesiredState | None) -> int:
        """Plan and act until the plan is empty (or MAX_STEPS); return how many actions ran.

        Raises:
            TransportError: the server became unreachable during a download (the caller backs off; the
                partial download is kept and resumes).
        """
        steps = 0
        while steps < MAX_STEPS:
            actions = plan(desired, self.observe(), self.clock())
            if not actions:
                break
            self.execute(actions[0])
            steps += 1
        return steps

    def execute(self, action: Action) -> None:
        """Carry out one action. Failures of the target are remembered, not raised, except transport errors."""
        match action:
            case Download(model, version, variant):
                log.info("fetching %s %s (%s)", model, version, variant.id)
                try:
                    report = self.fetcher.fetch(variant)
                except TransportError:
                    raise
                except StrataError as exc:
                    self._fail(variant.digest, model, version, variant.id, f"download failed: {exc}")
                    return
                self.fetched.relay_bytes += report.relay_bytes
                self.fetched.server_bytes += report.server_bytes
                self.fetched.reused_bytes += report.reused_bytes
                log.info(
                    "fetched %s %s: %d pieces, %d bytes from the relay, %d from the control plane, %d reused",
                    model, version, report.pieces, report.relay_bytes, report.server_bytes, report.reused_bytes,
                )  # fmt: skip
            case Stage(model, version, variant):
                try:
                    self.store.assemble(variant.blob, variant.digest)
                except PackageError as exc:
                    self._fail(variant.digest, model, version, variant.id, f"package rejected: {exc}")
            case Activate(model, version, variant):
                self._activate(model, version, variant.id, variant.digest)
            case Unload(model):
                log.info("model %s is no longer deployed here; unloading", model)
                self._commit(self.state.without_model(model))
                self.repository.remove(model)
            case RecordFailure(key, model, version, reason):
                log.error("%s", reason)
                self._commit(self.state.with_failure(key, self._failure(model, version, None, reason)))
            case ForgetFailures(keys):
                self._commit(self.state.without_failures(set(keys)))
            case CollectGarbage(keep, keep_blobs):
                removed = self.store.collect_garbage(keep, keep_blobs)
                if removed:
                    log.info("removed %d unused packages", len(removed))

    def _activate(self, model: str, version: str, variant: str, digest: str) -> None:
        try:
            package = self.store.package(digest)
            manifest = package.manifest
            if (manifest.name, manifest.version, manifest.variant) != (model, version, variant):
                raise PackageError(
                    f"package is {manifest.name} {manifest.version} ({manifest.variant}); "
                    f"the desired state promised {model} {version} ({variant})"
                )
            runtime = load_and_check(package, self.inference_threads)
        except PackageError as exc:
            self.store.discard(digest)  # it no longer verifies: fetch it again when retried
            self._fail(digest, model, version, variant, str(exc))
            return
        except ModelLoadError as exc:
            self._fail(digest, model, version, variant, str(exc))
            return
        now = self.clock()
        slot = SlotRef(digest=digest, version=version, variant=variant, activated_at=now)
        self._commit(self.state.with_active(model, slot))
        self.repository.put(LoadedModel(manifest=manifest, digest=digest, runtime=runtime, activated_at=now))
        log.info("activated %s %s (%s)", model, version, variant)

    def _failure(self, model: str, version: str, variant: str | None, reason: str) -> FailureRecord:
        return FailureRecord(model=model, version=version, variant=variant, reason=reason, at=self.clock(), attempts=1)

    def _fail(self, key: str, model: str, version: str, variant: str | None, reason: str) -> None:
        previous = self.state.failures.get(key)
        attempts = previous.attempts + 1 if previous else 1
        log.error("%s %s (%s) failed, keeping what is active: %s", model, version, variant, reason)
        record = FailureRecord(
            model=model, version=version, variant=variant, reason=reason, at=self.clock(), attempts=attempts
        )
        self._commit(self.state.with_failure(key, record))

    def _commit(self, state: NodeState) -> None:
        if state != self.state:
            self.store.save_state(state)
        self.state = state

    # --- reporting --------------------------------------------------------------------------------------

    def status(self, desired_etag: str | None) -> NodeStatus:
        """The observed state to report, built from the slots (what will survive a restart)."""
        models = []
        for name, slots in sorted(self.state.models.items()):
            models.append(
                ModelStatus(
                    name=name,
                    version=slots.active.version,
                    variant=slots.active.variant,
                    digest=slots.active.digest,
                    activated_at=slots.active.activated_at,
                    previous_version=slots.previous.version if slots.previous else None,
                    previous_digest=slots.previous.digest if slots.previous else None,
                )
            )
        failures = [
            Failure(model=r.model, version=r.version, variant=r.variant, reason=r.reason, at=r.at, attempts=r.attempts)
            for _, r in sorted(self.state.failures.items())
        ]
        return NodeStatus(
            tier=self.identity.tier,
            labels=self.identity.labels,
            profile=self.identity.profile.id,
            emulated=self.identity.emulated,
            agent_version=__version__,
            models=tuple(models),
            failures=tuple(failures),
            desired_etag=desired_etag,
            serve_url=self.identity.serve_url,
        )
