"""The agent's reconcile decision: `plan(desired, observed, now) -> actions`, a pure function.

Given what the control plane wants (or the last desired state kept on disk), what this node has (slots,
staged packages, downloaded blobs, remembered failures) and the time, return the next steps. A thin driver
carries them out, observes again and plans again until nothing is left to do. The simulator runs this same
code against a virtual clock.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from strata.agent.state import FailureRecord, ModelSlots
from strata.core.profiles import Profile, VariantChoice, rank_variants
from strata.core.wire import DesiredModel, DesiredState, VariantRef

RETRY_BASE_S = 30.0
RETRY_MAX_S = 3600.0
# A version that failed its probation, that this node's policy forbids, or whose signature is not by a release key
# this node trusts, will not get better in half a minute: it is tried again after ten minutes, then less often.
SLOW_RETRY_KINDS = frozenset({"probation", "policy", "signature"})
SLOW_RETRY_BASE_S = 600.0


@dataclass(frozen=True)
class Observed:
    """What the node has, as the planner needs it."""

    profile: Profile
    runtimes: frozenset[str]
    slots: Mapping[str, ModelSlots] = field(default_factory=dict)
    staged: frozenset[str] = frozenset()
    downloaded: frozenset[str] = frozenset()
    failures: Mapping[str, FailureRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class Download:
    model: str
    version: str
    variant: VariantRef


@dataclass(frozen=True)
class Stage:
    model: str
    version: str
    variant: VariantRef


@dataclass(frozen=True)
class Activate:
    model: str
    version: str
    variant: VariantRef


@dataclass(frozen=True)
class Unload:
    model: str


@dataclass(frozen=True)
class RecordFailure:
    """Remember that a desired model cannot be served here (no variant fits this profile, say)."""

    key: str
    model: str
    version: str
    reason: str


@dataclass(frozen=True)
class ForgetFailures:
    """Failures about versions no longer desired are dropped, so they are no longer reported."""

    keys: frozenset[str]


@dataclass(frozen=True)
class CollectGarbage:
    keep: frozenset[str]
    keep_blobs: frozenset[str]


Action = Download | Stage | Activate | Unload | RecordFailure | ForgetFailures | CollectGarbage


def retry_at(record: FailureRecord) -> float:
    """When a failed target may be tried again: exponential backoff from 30 s (10 min after a failed probation
    or a policy refusal), capped at an hour."""
    base = SLOW_RETRY_BASE_S if record.kind in SLOW_RETRY_KINDS else RETRY_BASE_S
    return record.at + min(math.ldexp(base, min(max(record.attempts - 1, 0), 32)), RETRY_MAX_S)


def no_variant_key(model: str, version: str) -> str:
    return f"{model}@{version}:no-variant"


def _candidates(desired: DesiredModel, observed: Observed) -> list[VariantRef]:
    return list(_ranked(desired.variants, observed.profile, observed.runtimes))


@functools.lru_cache(maxsize=64)
def _ranked(variants: tuple[VariantRef, ...], profile: Profile, runtimes: frozenset[str]) -> tuple[VariantRef, ...]:
    """The variants this node can run, best first. Cached: a node asks about the same few variants at every round
    (and the simulator's nodes, tens of thousands of them, about the same few)."""
    by_id = {v.id: v for v in variants}
    choices = [VariantChoice(id=v.id, profile=v.profile, runtime=v.runtime, precision=v.precision) for v in variants]
    return tuple(by_id[c.id] for c in rank_variants(profile, choices, runtimes))


def choose_target(desired: DesiredModel, observed: Observed, now: float) -> VariantRef | None:
    """The variant to run for `desired`: the best one this node can run that is not waiting out a failure.

    If the best variant failed its health check here, the next compatible one is used (falling back from a
    profile-specific build to a generic one, say) until the failure's retry time comes.
    """
    for variant in _candidates(desired, observed):
        record = observed.failures.get(variant.digest)
        if record is None or now >= retry_at(record):
            return variant
    return None


def plan(desired: DesiredState | None, observed: Observed, now: float) -> list[Action]:
    """The next actions that move this node toward `desired`. An empty list means converged (or waiting).

    With no desired state (never reached the server, nothing on disk) nothing changes: the node keeps
    serving what its slots hold.
    """
    if desired is None:
        return []
    actions: list[Action] = []
    keep: set[str] = set()
    keep_blobs: set[str] = set()
    for slots in observed.slots.values():
        keep.add(slots.active.digest)
        if slots.previous is not None:
            keep.add(slots.previous.digest)

    for model in desired.models:
        if not _candidates(model, observed):
            key = no_variant_key(model.name, model.version)
            if key not in observed.failures:
                offered = ", ".join(sorted({f"{v.profile}/{v.runtime}" for v in model.variants})) or "none"
                actions.append(
                    RecordFailure(
                        key=key,
                        model=model.name,
                        version=model.version,
                        reason=f"no variant of {model.name} {model.version} runs on profile "
                        f"{observed.profile.id} (offered: {offered})",
                    )
                )
            continue
        target = choose_target(model, observed, now)
        if target is None:
            continue  # every candidate is waiting out a failure; keep serving what is active
        keep.add(target.digest)
        active = observed.slots.get(model.name)
        if active is not None and active.active.digest == target.digest:
            continue
        if target.digest in observed.staged:
            actions.append(Activate(model.name, model.version, target))
        elif target.blob in observed.downloaded:
            keep_blobs.add(target.blob)
            actions.append(Stage(model.name, model.version, target))
        else:
            keep_blobs.add(target.blob)
            actions.append(Download(model.name, model.version, target))

    wanted = {m.name for m in desired.models}
    actions.extend(Unload(name) for name in sorted(observed.slots) if name not in wanted)
    current = {(m.name, m.version) for m in desired.models}
    stale = frozenset(k for k, r in observed.failures.items() if (r.model, r.version) not in current)
    if stale:
        actions.append(ForgetFailures(stale))
    if not actions and (observed.staged - keep or observed.downloaded - keep_blobs):
        actions.append(CollectGarbage(keep=frozenset(keep), keep_blobs=frozenset(keep_blobs)))
    return actions
