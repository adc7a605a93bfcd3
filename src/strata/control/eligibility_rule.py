"""May this version reach this node, and why not: the one pure place that decides it.

The desired-state computation (`strata.control.desired`), the rollout driver (`strata.control.rollouts`), the
deployments' progress (`strata.control.deployments`) and the simulator (`strata.sim.engine`) all ask here, over
plain values, never database rows: a `Release` (a model's version, its variants and each one's placement policy),
the entries of the desired-state rule built from it (`ActiveDeployment`: a deployment, a rollout or a pin), and a
`FleetNode` (who the node is, the facts its policies see, what it last reported, whether it is online).

A version may not reach a node when, in this order: a pin of the model holds the node; no variant's placement
policy allows the node (regions, jurisdictions, required attestation, CEL rules over data class and the like);
no allowed variant runs on the node's hardware profile. No I/O and no clock here: whatever depends on time takes
it from the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from strata.control.gates import DriftFigure
from strata.control.rollout_plan import NodeObservation, RolloutState
from strata.core.errors import ProfileError
from strata.core.policy import Decision, ModelFacts, NodeFacts, Policy, evaluate
from strata.core.profiles import VariantChoice, get_profile, rank_variants
from strata.core.wire import NodeStatus, VariantRef, selector_matches

KINDS: Final = ("deployment", "rollout", "pin")


@dataclass(frozen=True)
class Release:
    """A version of a model as eligibility sees it: its variants and their placement policies (by variant id;
    a variant without one is allowed everywhere)."""

    model: str
    version: str
    variants: tuple[VariantRef, ...]
    policies: Mapping[str, Policy] = field(default_factory=dict)

    def entry(
        self,
        id: int,
        created_at: float,
        selector: Mapping[str, str] | None = None,
        kind: str = "deployment",
        only_nodes: frozenset[str] | None = None,
    ) -> ActiveDeployment:
        """This version as an entry of the desired-state rule (the one way every caller builds one)."""
        return ActiveDeployment(
            id=id,
            model=self.model,
            version=self.version,
            selector=dict(selector or {}),
            created_at=created_at,
            variants=self.variants,
            kind=kind,
            only_nodes=only_nodes,
            policies=self.policies,
        )


def placement(release: Release, node: NodeFacts) -> tuple[tuple[VariantRef, ...], Decision]:
    """The variants of `release` whose policies allow `node`, and (when none) the decision that forbids it."""
    if not release.policies:
        return release.variants, Decision(True)
    facts = ModelFacts(release.model, release.version)
    allowed = []
    refusal = Decision(True)
    for variant in release.variants:
        decision = evaluate(release.policies.get(variant.id, Policy()), facts, node)
        if decision.allowed:
            allowed.append(variant)
        elif refusal.allowed:
            refusal = decision
    return tuple(allowed), refusal if not allowed else Decision(True)


def runnable_variants(profile: str, variants: Iterable[VariantRef]) -> list[str]:
    """The ids of the variants a node of `profile` can run, best first (none for an unknown profile)."""
    try:
        host = get_profile(profile)
    except ProfileError:
        return []
    choices = [VariantChoice(v.id, v.profile, v.runtime, v.precision) for v in variants]
    return [choice.id for choice in rank_variants(host, choices)]


@dataclass(frozen=True)
class ActiveDeployment:
    """An entry of the desired-state rule: what it pins, where, since when, the variants of that version and their
    policies (build one with `Release.entry`).

    `kind` is "deployment", "rollout" or "pin"; `only_nodes`, when set, limits the entry to those node ids (the
    released nodes of a rollout, the node of a node pin). `policies` maps variant ids to their placement policy.
    """

    id: int
    model: str
    version: str
    selector: Mapping[str, str]
    created_at: float
    variants: tuple[VariantRef, ...]
    kind: str = "deployment"
    only_nodes: frozenset[str] | None = None
    policies: Mapping[str, Policy] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """What a desired state names as its decider: the deployment id, or `rollout/ID`, `pin/ID`."""
        return str(self.id) if self.kind == "deployment" else f"{self.kind}/{self.id}"

    @property
    def recency(self) -> tuple[int, float, int, int]:
        """Sort key: pins first, then later creation, then kind, then the higher id."""
        return (1 if self.kind == "pin" else 0, self.created_at, KINDS.index(self.kind), self.id)

    @property
    def release(self) -> Release:
        """The version this entry names, with its variants and policies."""
        return Release(self.model, self.version, self.variants, self.policies)

    def applies_to(self, node_id: str, labels: Mapping[str, str]) -> bool:
        """Whether the entry targets the node, before any policy."""
        if self.only_nodes is not None and node_id not in self.only_nodes:
            return False
        return selector_matches(self.selector, labels)

    def placement(self, node: NodeFacts) -> tuple[tuple[VariantRef, ...], Decision]:
        """The variants the version's policies allow on `node`, and (when none) the decision that forbids it."""
        return placement(self.release, node)


@dataclass(frozen=True)
class FleetNode:
    """A live node as eligibility sees it: its id, the facts policies see (name, tier, assigned profile, labels,
    attestation), its last report (None: none yet, or unreadable) and whether it is online now."""

    id: str
    name: str
    labels: Mapping[str, str]
    facts: NodeFacts
    status: NodeStatus | None
    online: bool

    @property
    def hardware(self) -> str:
        """The profile the node picks its variant with: the one it reports (it runs on that hardware), or the
        assigned one before its first report."""
        return self.status.profile if self.status is not None else self.facts.profile


def pinned_by(node: FleetNode, model: str, pins: Iterable[ActiveDeployment]) -> ActiveDeployment | None:
    """The newest pin of `model` that holds `node`, if any. A pin whose own version's policy forbids the node
    holds nothing there, as in the desired-state rule (`strata.control.desired.decide` passes over it too)."""
    for pin in sorted(pins, key=lambda p: p.recency, reverse=True):
        if pin.model == model and pin.applies_to(node.id, node.labels) and pin.placement(node.facts)[0]:
            return pin
    return None


def exclusion(node: FleetNode, release: Release, pins: Iterable[ActiveDeployment]) -> str | None:
    """Why `release` may not reach `node` (a pin, a placement policy, no variant for its profile), or None.

    The profile is the one the node was enrolled with (`facts.profile`), as the rollout planner spreads waves by.
    """
    pin = pinned_by(node, release.model, pins)
    if pin is not None:
        return f"pinned to {pin.version} (pin {pin.id})"
    allowed, refusal = placement(release, node.facts)
    if not allowed:
        if not refusal.allowed:
            return f"policy rule {refusal.rule}: {refusal.reason}"
        return f"{release.model} {release.version} has no variants"
    if not runnable_variants(node.facts.profile, allowed):
        return f"no variant of {release.model} {release.version} runs on profile {node.facts.profile}"
    return None


def observe(node: FleetNode, rollout: RolloutState, excluded: str | None, drift: DriftFigure | None) -> NodeObservation:
    """What the rollout planner takes of `node`: what it runs of the rollout's model, the failure it reports about
    the rollout's version, why the rollout may not reach it (`exclusion`), and its drift (None: no reference)."""
    status = node.status
    running = next((m for m in status.models if m.name == rollout.model), None) if status else None
    failure = None
    if status is not None:
        failure = next((f for f in status.failures if f.model == rollout.model and f.version == rollout.version), None)
    return NodeObservation(
        node_id=node.id,
        labels=node.labels,
        tier=node.facts.tier,
        profile=node.facts.profile,
        online=node.online,
        version=running.version if running else None,
        probation=running.probation if running else None,
        serving=running.serving if running else None,
        failure=failure,
        excluded=excluded,
        drift=drift,
    )


def observe_fleet(
    rollout: RolloutState,
    nodes: Iterable[FleetNode],
    release: Release,
    pins: Iterable[ActiveDeployment],
    drift: Mapping[str, DriftFigure] | None = None,
) -> dict[str, NodeObservation]:
    """Every node the rollout's selector matches, observed; `drift` None when the version's package has no drift
    reference (a node missing from it has served nothing in the window)."""
    pins = tuple(pins)
    return {
        node.id: observe(
            node,
            rollout,
            exclusion(node, release, pins),
            None if drift is None else drift.get(node.id, DriftFigure(None, 0)),
        )
        for node in nodes
        if selector_matches(rollout.selector, node.labels)
    }
