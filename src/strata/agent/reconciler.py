"""The driver of `plan`: observes the node, carries out each action, and reports what happened.

Everything here is I/O around the pure planner: downloads, staging, loading runtimes, swapping slots.
Each action either completes or leaves the node as it was; errors become remembered failures so the node
keeps serving its active models and tries again later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from strata import __version__
from strata.agent.client import ControlPlaneClient, ServerError
from strata.agent.config import GOLDEN_TIMEOUT_S
from strata.agent.elapsed import Elapsed
from strata.agent.fetch import Progress
from strata.agent.pieces import FetchReport, PackageFetcher
from strata.agent.placement import check_placement
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
    retry_at,
)
from strata.agent.probation import ProbationConfig, judge, reference_latency
from strata.agent.repository import LoadedModel, MirrorStopping, ModelRepository
from strata.agent.runtime import load_and_check, release_free_memory
from strata.agent.serving import Counted, ServingTracker
from strata.agent.state import (
    FailureRecord,
    LoadingRecord,
    NodeState,
    ProbationRecord,
    SlotRef,
    boot_id,
    died_loading,
)
from strata.agent.store import ArtifactStore
from strata.agent.supply import SupplyGuard
from strata.agent.transport import Transport
from strata.agent.vault import VaultUnavailable
from strata.core.errors import (
    Forbidden,
    MetadataError,
    ModelLoadError,
    NotFound,
    PackageError,
    SignatureError,
    StrataError,
    TransportError,
    VerificationError,
)
from strata.core.package import Manifest
from strata.core.policy import NodeFacts
from strata.core.profiles import Profile
from strata.core.wire import DesiredState, FailureKind, ModelStatus, NodeStatus, ServingCounters, Tier, VariantRef
from strata.core.words import duration

log = logging.getLogger("strata.agent")

MAX_STEPS = 64


class PlacementRefused(StrataError):
    """A package's placement policy forbids this node."""

    code = "placement_refused"
    http_status = 403


def supply_kind(exc: SignatureError | MetadataError) -> FailureKind:
    """The failure kind of a supply-chain refusal: `signature` or `tuf`."""
    return "signature" if isinstance(exc, SignatureError) else "tuf"


def load_failure_kind(exc: BaseException) -> FailureKind | None:
    """The failure kind of an error while loading a package, None for one that is no failure of the package (a
    disk error, the agent stopping)."""
    if isinstance(exc, VaultUnavailable):
        return "vault"
    if isinstance(exc, PlacementRefused):
        return "policy"
    if isinstance(exc, PackageError):
        return "package"
    if isinstance(exc, ModelLoadError):
        return "health"
    return None


@dataclass(frozen=True)
class NodeIdentity:
    """Who this node says it is in every status report."""

    tier: Tier
    labels: dict[str, str]
    profile: Profile
    emulated: bool
    serve_url: str | None
    name: str = ""
    attestation: str = ""  # the level the control plane's last verdict on this node's report gave

    @property
    def facts(self) -> NodeFacts:
        """What a placement policy may know about this node."""
        return NodeFacts.of(self.name, self.tier, self.profile.id, self.labels, self.attestation)


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
        golden_timeout_s: float = GOLDEN_TIMEOUT_S,
        rate_limit: int | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        progress: Progress | None = None,
        relays: Callable[[], Sequence[str]] = tuple,
        relay_transport: Transport | None = None,
        relay_min_rate: int | None = None,
        serving: ServingTracker | None = None,
        probation: ProbationConfig | None = None,
        report_interval_s: float = 0.0,
        supply: SupplyGuard | None = None,
        boot: str | None = None,
    ) -> None:
        """`supply` checks release signatures and TUF metadata before a package is downloaded, staged and activated
        (when the node pinned release keys); None skips those checks (tests of the other parts). `boot`: the kernel's
        boot id (None: read it), kept in each loading record (`died_loading`). `clock` dates what is recorded and
        reported (activations, failures); `monotonic` measures every wait (a failure's retry, a probation, the
        report interval), so that the wall clock stepping neither ends nor stretches one (`Elapsed`)."""
        self.boot = boot_id() if boot is None else boot
        self.supply = supply
        # Packages TUF vouched for in this converge pass (before their download): their activation in the same
        # pass needs no second check. A new pass (a new poll, a new desired state) checks again.
        self._vouched: set[str] = set()
        self.store = store
        self.repository = repository
        self.client = client
        self.identity = identity
        self.runtimes = runtimes
        self.inference_threads = inference_threads
        self.golden_timeout_s = golden_timeout_s
        self.rate_limit = rate_limit
        self.clock = clock
        self.monotonic = monotonic
        self._elapsed = Elapsed(clock, monotonic)
        self.progress = progress
        self.serving = serving if serving is not None else ServingTracker(clock=clock)
        self.probation = probation if probation is not None else ProbationConfig()
        self.report_interval_s = report_interval_s
        self._snapshots: dict[tuple[str, str], tuple[float, ServingCounters | None]] = {}
        self.state = store.load_state()
        self.fetcher = PackageFetcher(
            client,
            store,
            relays,
            rate_limit=rate_limit,
            progress=progress,
            relay_transport=relay_transport,
            relay_min_rate=relay_min_rate,
        )
        self.fetched = FetchReport()
        # The activation under way in the loop's thread, and whether the agent is stopping (no load starts then).
        # Both change under one lock: a stopping agent must see a load that has begun before its loading record
        # reaches the state (in memory or on disk), or it stops in its middle and the next start counts a failure.
        self._loads = threading.Lock()
        self._activating: LoadingRecord | None = None
        self._stopping = False
        # Loads of a package the agent or the machine died in just before, in a row (`died_loading`), by digest: kept
        # from the record judged at start-up for the record of its next load.
        self._died_before: dict[str, int] = {}

    @property
    def activating(self) -> LoadingRecord | None:
        """The load under way (None: none), from before its loading record is written until it is cleared."""
        return self._activating

    def refuse_loads(self) -> LoadingRecord | None:
        """The agent is stopping: start no load from now on; return the one under way (None: none), which the
        caller may wait for (`activating` turns None when it is done)."""
        with self._loads:
            self._stopping = True
            return self._activating

    # --- start-up ---------------------------------------------------------------------------------------

    def restore(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Load every model whose slots say it is active, before any network call.

        A package that no longer verifies or loads is replaced by its previous slot when that one is good;
        otherwise the model is dropped from the slots and the failure remembered. A load the agent died in last
        time (its loading record is still in the state) is judged by `died_loading`: a version's failure is not
        loaded again now; a reboot, or a first death in a version the node served, is loaded again. A disk that
        refuses the state file's writes (full, remounted read-only) does not keep the node from serving what it
        has: the state is kept in memory and written by a later change. `stopping` is asked between models: the
        agent was told to stop, and loads no more.
        """
        died = self._judge_died_loading()
        for name, slots in sorted(self.state.models.items()):
            if stopping():
                return
            for slot in (slots.active, slots.previous):
                if slot is None or slot.digest == died:
                    continue
                record = LoadingRecord(
                    name,
                    slot.version,
                    slot.variant,
                    slot.digest,
                    self.clock(),
                    boot=self.boot,
                    startup=True,
                    deaths=self._died_before.pop(slot.digest, 0),  # the record carries them from here
                )
                self._mark_loading(record)
                try:
                    self._load(name, slot)
                except VaultUnavailable:
                    self._keep(self.state.with_loading(None))
                    raise  # nothing can be opened: keep the slots as they are and say why the agent stops
                except StrataError as exc:
                    log.error("model %s %s (%s) cannot be served: %s", name, slot.version, slot.digest[:19], exc)
                    kind: FailureKind = "policy" if isinstance(exc, PlacementRefused) else "health"
                    failure = self._failure(name, slot.version, slot.variant, str(exc), kind)
                    self._keep(self.state.with_loading(None).with_failure(slot.digest, failure))
                    continue
                state = self.state.with_loading(None)
                if slot is not slots.active:
                    state = state.with_active(name, slot)
                    log.warning("model %s rolled back to %s at start-up", name, slot.version)
                elif (watched := state.probation.get(name)) is not None and watched.digest == slot.digest:
                    # Its counters start again from zero: so does its window, and the restart is counted.
                    resumed = replace(watched, started_at=self.clock(), restarts=watched.restarts + 1)
                    state = state.with_probation(name, resumed)
                    self._elapsed.since(("probation", name), resumed.started_at)
                self._keep(state)
                break
            else:
                self._keep(self.state.without_model(name))

    def _keep(self, state: NodeState) -> None:
        """Commit a change that has happened (a start-up's, a rollback's), or keep it in memory when the disk refuses
        it (a later commit writes it)."""
        try:
            self._commit(state)
        except OSError as exc:
            log.warning("cannot write the node's state file (%s); serving on, it is written at the next change", exc)
            self.state = state

    def _mark_loading(self, record: LoadingRecord) -> None:
        """Write the loading record before a start-up load; a disk that refuses the write (full, read-only) does not
        keep the node from serving what it has: the record only lets the next start tell a load it died in."""
        try:
            self._commit(self.state.with_loading(record))
        except OSError as exc:
            log.warning(
                "cannot note the load of %s %s in the state file (%s); loading it", record.model, record.version, exc
            )

    def _judge_died_loading(self) -> str | None:
        """Judge a loading record left in the state (`died_loading`): a failure of that version (with the attempts
        and retry time of any earlier failure, so it is reported and not loaded again at once) returns its digest;
        a version loaded again has its deaths in a row kept (`_died_before`), for the record of its next load (at
        start-up, or its activation)."""
        loading = self.state.loading
        if loading is None:
            return None
        verdict = died_loading(loading, self.boot)
        if verdict == "rebooted":
            log.warning(
                "the machine restarted while the agent loaded %s %s (a power cut or a reboot): loading it again",
                loading.model,
                loading.version,
            )
        elif verdict == "again":
            log.warning(
                "the agent ended while loading %s %s at its last start (stopped or killed): loading it once more;"
                " ending in its load again makes it a failed version",
                loading.model,
                loading.version,
            )
        if verdict != "failed":
            self._died_before[loading.digest] = loading.deaths + 1
            self._keep(self.state.with_loading(None))
            return None
        reason = "the agent died while loading this package (killed: out of memory? a crash in its runtime?)"
        self._keep(self._failed(loading.digest, loading.model, loading.version, loading.variant, reason, "health"))
        return loading.digest

    def _load(self, name: str, slot: SlotRef) -> None:
        """Load a slot's package and serve it.

        Raises:
            PackageError, VerificationError: the package is missing or changed on disk.
            VaultUnavailable: the vault worker cannot start.
            PlacementRefused: its policy forbids this node (labels changed since it was activated, say).
            ModelLoadError: it does not load or fails its golden check.
        """
        package, files = self.store.open(slot.digest)
        self._check_placement(package.manifest)
        runtime = load_and_check(package, self.inference_threads, files=files, check_timeout_s=self.golden_timeout_s)
        self.repository.put(
            LoadedModel(manifest=package.manifest, digest=slot.digest, runtime=runtime, activated_at=slot.activated_at)
        )

    def _check_placement(self, manifest: Manifest) -> None:
        """Raises:
        PlacementRefused: the package's policy forbids this node.
        """
        decision = check_placement(manifest, self.identity.facts)
        if not decision.allowed:
            raise PlacementRefused(f"refused by placement policy ({decision.rule}): {decision.reason}")

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

    def _observe_monotonic(self) -> Observed:
        """What `observe` says, with the failures' dates on the monotonic clock: how long ago each failed is
        measured there (`Elapsed`), so that `plan` given `monotonic()` for its time retries each when it is due
        whatever the wall clock did meanwhile."""
        return replace(self.observe(), failures=self._failures_monotonic())

    def _failures_monotonic(self) -> dict[str, FailureRecord]:
        """The remembered failures (`state.failures`, what `observe` reports), their dates on the monotonic clock."""
        now = self.monotonic()
        failures = {
            key: replace(record, at=now - self._elapsed.since(("failure", key), record.at))
            for key, record in self.state.failures.items()
        }
        self._elapsed.keep({("failure", key) for key in failures} | {("probation", m) for m in self.state.probation})
        return failures

    def next_retry_s(self) -> float | None:
        """Seconds until the first remembered failure may be tried again (0: now), None with none remembered: from
        the state alone (each poll asks; `observe` would list the package folders too)."""
        failures = self._failures_monotonic()
        if not failures:
            return None
        now = self.monotonic()
        return max(0.0, min(retry_at(record) for record in failures.values()) - now)

    def converge(self, desired: DesiredState | None) -> int:
        """Plan and act until the plan is empty (or MAX_STEPS); return how many actions ran.

        Raises:
            TransportError: the server became unreachable during a download (the caller backs off; the
                partial download is kept and resumes).
        """
        self.check_probation()
        self._vouched.clear()
        steps = 0
        try:
            while steps < MAX_STEPS and not self._stopping:
                actions = plan(desired, self._observe_monotonic(), self.monotonic())
                if not actions:
                    break
                self.execute(actions[0])
                steps += 1
        finally:
            if steps:
                # Downloads, sealing and loading held whole files in memory (decrypted models among them): give
                # the freed heap back, or the node stays as large as its busiest update.
                release_free_memory()
        return steps

    def execute(self, action: Action) -> None:
        """Carry out one action. Failures of the target are remembered, not raised, except transport errors."""
        match action:
            case Download(model, version, variant):
                limit, guard = None, self._guard()
                if guard is not None:
                    try:
                        limit = guard.check_target(model, version, variant).length
                    except (SignatureError, MetadataError) as exc:
                        self._fail(variant.digest, model, version, variant.id, f"refused: {exc}", supply_kind(exc))
                        return
                    self._vouched.add(variant.digest)
                log.info("fetching %s %s (%s)", model, version, variant.id)
                try:
                    report = self.fetcher.fetch(variant, manifest_limit=limit)
                except TransportError:
                    raise
                except VerificationError as exc:
                    reason = f"download refused, bytes changed at the source or on the way: {exc}"
                    self._fail(variant.digest, model, version, variant.id, reason, "download")
                    return
                except StrataError as exc:
                    self._fail(variant.digest, model, version, variant.id, f"download failed: {exc}", "download")
                    return
                self.fetched.relay_bytes += report.relay_bytes
                self.fetched.server_bytes += report.server_bytes
                self.fetched.reused_bytes += report.reused_bytes
                log.info(
                    "fetched %s %s: %d pieces, %d bytes from the relay, %d from the control plane, %d reused",
                    model, version, report.pieces, report.relay_bytes, report.server_bytes, report.reused_bytes,
                )  # fmt: skip
            case Stage(model, version, variant):
                self._stage(model, version, variant)
            case Activate(model, version, variant):
                self._activate(model, version, variant)
            case Unload(model):
                log.info("model %s is no longer deployed here; unloading", model)
                self._commit(self.state.without_model(model))
                self.repository.remove(model)
                self.serving.forget(model)
            case RecordFailure(key, model, version, reason):
                log.error("%s", reason)
                self._commit(self.state.with_failure(key, self._failure(model, version, None, reason, "no-variant")))
            case ForgetFailures(keys):
                self._commit(self.state.without_failures(set(keys)))
            case CollectGarbage(keep, keep_blobs):
                removed = self.store.collect_garbage(keep, keep_blobs)
                if removed:
                    log.info("removed %d unused packages", len(removed))

    def _guard(self) -> SupplyGuard | None:
        """The supply guard when packages must be signed and vouched for by TUF (the node pinned release keys)."""
        if self.supply is None:
            return None
        self.supply.warn_if_unverified()
        return self.supply if self.supply.pinned else None

    def _stage(self, model: str, version: str, variant: VariantRef) -> None:
        """Assemble and verify a downloaded package; with pinned release keys, its release signature is checked on
        the assembled folder before it joins the staged packages (a refused one is discarded, pieces and all)."""
        check, guard = None, self._guard()
        try:
            if guard is not None:
                bundle = guard.fetch_bundle(variant)

                def check(folder: Path, hashes: Mapping[str, str] | None) -> None:
                    guard.check_package(folder, bundle, variant.digest, hashes)

            self.store.assemble(variant.blob, variant.digest, check=check)
        except VaultUnavailable as exc:
            self._fail(variant.digest, model, version, variant.id, str(exc), "vault")
        except (SignatureError, MetadataError) as exc:
            self._fail(variant.digest, model, version, variant.id, f"refused: {exc}", supply_kind(exc))
        except PackageError as exc:
            self._fail(variant.digest, model, version, variant.id, f"package rejected: {exc}", "package")
        except (ServerError, NotFound, Forbidden) as exc:
            reason = f"cannot fetch the release signature: {exc}"
            self._fail(variant.digest, model, version, variant.id, reason, "signature")

    def _activate(self, model: str, version: str, ref: VariantRef) -> None:
        variant, digest = ref.id, ref.digest
        guard = self._guard()
        if guard is not None and digest not in self._vouched:
            # Again at activation, unless it was checked before its download in this same pass: a package still on
            # disk (the previous slot) is not trusted again just because the desired state names it; TUF must still
            # say this node should run it (a server restored from an old backup does not).
            try:
                guard.check_target(model, version, ref)
            except (SignatureError, MetadataError) as exc:
                self._fail(digest, model, version, variant, f"refused: {exc}", supply_kind(exc))
                return
        record = LoadingRecord(
            model, version, variant, digest, self.clock(), boot=self.boot, deaths=self._died_before.pop(digest, 0)
        )
        with self._loads:
            if self._stopping:
                log.info("not loading %s %s (%s): the agent is stopping", model, version, variant)
                return
            self._activating = record
        try:
            log.info("loading %s %s (%s)", model, version, variant)
            self._commit(self.state.with_loading(record))
            try:
                self._load_new(model, version, ref)
            finally:
                if self.state.loading is not None:  # loaded, or an error that is no failure of the package (disk)
                    try:
                        self._commit(self.state.with_loading(None))
                    except OSError:  # not on disk, but not in memory either, for a later commit to write back
                        self.state = self.state.with_loading(None)
        finally:
            with self._loads:
                self._activating = None

    def _load_new(self, model: str, version: str, ref: VariantRef) -> None:
        """Load a staged package and serve it in place of the model's active one, or remember why not."""
        variant, digest = ref.id, ref.digest
        try:
            package, files = self.store.open(digest)
            manifest = package.manifest
            if (manifest.name, manifest.version, manifest.variant) != (model, version, variant):
                raise PackageError(
                    f"package is {manifest.name} {manifest.version} ({manifest.variant}); "
                    f"the desired state promised {model} {version} ({variant})"
                )
            self._check_placement(manifest)
            runtime = load_and_check(
                package, self.inference_threads, files=files, check_timeout_s=self.golden_timeout_s
            )
            del files  # the decrypted bytes live on only inside the runtime
        except (VaultUnavailable, PlacementRefused, PackageError, ModelLoadError) as exc:
            self._fail_load(exc, ref, model, version)
            return
        now = self.clock()
        probation = self._probation_record(model, version, digest, manifest, now)
        slot = SlotRef(digest=digest, version=version, variant=variant, activated_at=now)
        # The loading record stays until the node's other serving processes have loaded it too: the agent dying
        # meanwhile (their copies took the machine's memory, say) is the same failure, and the next start goes back
        # to the previous slot.
        before = self.state
        state = self.state.with_active(model, slot)
        if probation is not None:
            state = state.with_probation(model, probation)
        self._commit(state)
        if probation is not None:
            self._elapsed.since(("probation", model), probation.started_at)  # its time counts from here
        counted = self.serving.reset(model, version, now)
        # The loading record is cleared once this returns (`_activate`): after the other serving processes loaded it.
        # Should they not take it, nothing changes: the slots as they were (`_fail` writes them, with the failure).
        try:
            self.repository.put(
                LoadedModel(manifest=manifest, digest=digest, runtime=runtime, activated_at=now), everywhere=True
            )
        except BaseException as exc:  # another serving process could not load it (or open it): none serves it
            self._undo(before, model, version, counted)
            if isinstance(exc, MirrorStopping):  # the agent stops: no failure; the next start loads it again
                log.info("%s %s not activated: %s", model, version, exc)
                return
            if not self._fail_load(exc, ref, model, version):  # a disk error, say: not the package's failure
                raise
            return
        self.serving.forget(model, keep_version=version)  # a node that runs for months sees many versions
        self._drop_snapshots(model)
        log.info(
            "activated %s %s (%s)%s",
            model,
            version,
            variant,
            f"; on probation for {duration(self.probation.duration_s)}" if probation is not None else "",
        )

    def _fail_load(self, exc: BaseException, ref: VariantRef, model: str, version: str) -> bool:
        """Remember why a package did not load (`load_failure_kind`; a package that no longer verifies is discarded,
        to be fetched again when retried); False for an error that is no failure of the package."""
        kind = load_failure_kind(exc)
        if kind is None:
            return False
        if kind == "package":
            self.store.discard(ref.digest)
        self._fail(ref.digest, model, version, ref.id, str(exc), kind)
        return True

    def _undo(self, before: NodeState, model: str, version: str, counted: Counted) -> None:
        """Go back to the slots of `before` (still loading: `_activate` clears that) after an activation that the
        node's other serving processes did not take, and to the serving counts `reset` replaced."""
        self.serving.restore(model, version, counted)
        try:
            self._commit(before)
        except OSError:  # not on disk, but in memory: the next commit writes it
            self.state = before

    def _probation_record(
        self, model: str, version: str, digest: str, manifest: Manifest, now: float
    ) -> ProbationRecord | None:
        """The probation a fresh activation starts, with its latency reference (None: probation is off)."""
        if not self.probation.enabled:
            return None
        recorded = reference_latency(manifest.metrics)
        if recorded is not None:
            return ProbationRecord(version, digest, now, recorded, "the package's recorded p95")
        current = self.state.models.get(model)
        if current is not None and current.active.digest != digest:
            counters = self.serving.counters(model, current.active.version)
            if (
                counters is not None
                and counters.latency_p95_ms is not None
                and self.serving.samples(model, current.active.version) >= self.probation.min_requests
            ):
                return ProbationRecord(
                    version, digest, now, counters.latency_p95_ms, f"{current.active.version} on this node"
                )
        return ProbationRecord(version, digest, now, None, "none")

    # --- probation --------------------------------------------------------------------------------------

    def probation_due(self) -> float | None:
        """Seconds until the next probation check, None when no activation is on probation."""
        if not self.state.probation:
            return None
        return self.probation.check_interval_s

    def check_probation(self) -> None:
        """Judge every activation on probation; a failed one goes back to its previous slot by itself. Its time on
        probation is measured on the monotonic clock, from its activation or the agent's last restart (`Elapsed`)."""
        for model, record in sorted(self.state.probation.items()):
            slots = self.state.models.get(model)
            if slots is None or slots.active.digest != record.digest:
                self._commit(self.state.without_probation(model))
                continue
            served_s = self._elapsed.since(("probation", model), record.started_at)
            verdict = judge(record, self.serving.counters(model, record.version), self.probation, served_s)
            if verdict.outcome == "passed":
                log.info("%s %s passed probation: %s", model, record.version, verdict.reason)
                self._commit(self.state.without_probation(model))
                self._drop_snapshots(model)
            elif verdict.failed:
                self._roll_back(model, record, f"probation failed: {verdict.reason}")

    def _roll_back(self, model: str, record: ProbationRecord, reason: str) -> None:
        """Give up the active package of `model` for its previous slot (or nothing), and remember why."""
        slots = self.state.models[model]
        active = slots.active
        failure_key = record.digest
        previous = slots.previous
        state = self.state
        restored = False
        if previous is not None:
            try:
                self._load(model, previous)
                state = state.rolled_back(model)
                restored = True
            except StrataError as exc:
                log.error("previous %s %s cannot be served either: %s", model, previous.version, exc)
        if not restored:
            state = state.without_model(model)
            self.repository.remove(model)
        previous_failure = state.failures.get(failure_key)
        attempts = previous_failure.attempts + 1 if previous_failure else 1
        failure = FailureRecord(model, record.version, active.variant, reason, self.clock(), attempts, "probation")
        # Kept in memory if the disk refuses it: the repository serves the previous version already, and slots that
        # still said otherwise would have the next check roll back (and load it) again, every few seconds.
        self._keep(state.with_failure(failure_key, failure))
        if restored and previous is not None:
            self.serving.reset(model, previous.version, self.clock())
        self.serving.forget(model, keep_version=previous.version if restored and previous is not None else None)
        self._drop_snapshots(model)
        log.error(
            "%s %s %s; %s",
            model,
            record.version,
            reason,
            f"rolled back to {previous.version}" if restored and previous else "model unloaded (nothing to go back to)",
        )

    def _drop_snapshots(self, model: str) -> None:
        self._snapshots = {k: v for k, v in self._snapshots.items() if k[0] != model}

    def _failure(self, model: str, version: str, variant: str | None, reason: str, kind: FailureKind) -> FailureRecord:
        return FailureRecord(
            model=model, version=version, variant=variant, reason=reason, at=self.clock(), attempts=1, kind=kind
        )

    def _fail(self, key: str, model: str, version: str, variant: str | None, reason: str, kind: FailureKind) -> None:
        self._commit(self._failed(key, model, version, variant, reason, kind))

    def _failed(
        self, key: str, model: str, version: str, variant: str | None, reason: str, kind: FailureKind
    ) -> NodeState:
        """The state with that version's failure (its attempts counted on from any earlier one) and no load under
        way; said in the log."""
        previous = self.state.failures.get(key)
        attempts = previous.attempts + 1 if previous else 1
        log.error("%s %s (%s) failed, keeping what is active: %s", model, version, variant, reason)
        record = FailureRecord(
            model=model, version=version, variant=variant, reason=reason, at=self.clock(), attempts=attempts, kind=kind
        )
        return self.state.with_loading(None).with_failure(key, record)

    def _commit(self, state: NodeState) -> None:
        if state != self.state:
            self.store.save_state(state)
        self.state = state

    # --- reporting --------------------------------------------------------------------------------------

    def _counters(self, model: str, version: str, now: float) -> ServingCounters | None:
        """The serving counters to report, refreshed at most every `report_interval_s` (each change of them
        changes the status, and a changed status is sent and stored)."""
        key = (model, version)
        cached = self._snapshots.get(key)
        if cached is not None and now - cached[0] < self.report_interval_s:
            return cached[1]
        counters = self.serving.counters(model, version)
        self._snapshots[key] = (now, counters)
        return counters

    def status(self, desired_etag: str | None) -> NodeStatus:
        """The observed state to report, built from the slots (what will survive a restart)."""
        now = self.monotonic()  # for the report interval only
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
                    serving=self._counters(name, slots.active.version, now),
                    probation="running" if name in self.state.probation else "passed",
                )
            )
        return NodeStatus(
            tier=self.identity.tier,
            labels=self.identity.labels,
            profile=self.identity.profile.id,
            emulated=self.identity.emulated,
            agent_version=__version__,
            models=tuple(models),
            failures=tuple(record for _, record in sorted(self.state.failures.items())),
            desired_etag=desired_etag,
            serve_url=self.identity.serve_url,
            supply=self.supply.mode if self.supply is not None else None,
        )
