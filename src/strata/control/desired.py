"""The desired-state rule, as pure functions: which version of which model each node should run.

For a node, for each model, the entries that apply to it compete: deployments (a label selector), rollouts (a
deployment that reaches only the nodes of its started waves until it succeeds) and pins (an operator's "this
node, or these labels, stay on this version"). A pin beats everything; otherwise the most recently created entry
wins (ties broken by kind, then the higher id). An entry whose version's placement policy forbids the node does
not apply to it, so the next one decides, or the node does not get the model at all. The node gets the winner's
variants its policy allows and picks the one its hardware runs best. A revoked node gets nothing. No I/O and no
clock here: the fleet service loads the entries and calls these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from strata.core.policy import Decision, ModelFacts, NodeFacts, Policy, evaluate
from strata.core.wire import DesiredModel, DesiredState, VariantRef, selector_matches

KINDS: Final = ("deployment", "rollout", "pin")


@dataclass(frozen=True)
class ActiveDeployment:
    """An entry of the rule: what it pins, where, since when, the variants of that version and their policies.

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

    def applies_to(self, node_id: str, labels: Mapping[str, str]) -> bool:
        """Whether the entry targets the node, before any policy."""
        if self.only_nodes is not None and node_id not in self.only_nodes:
            return False
        return selector_matches(self.selector, labels)

    def placement(self, node: NodeFacts) -> tuple[tuple[VariantRef, ...], Decision]:
        """The variants the version's policies allow on `node`, and (when none) the decision that forbids it."""
        if not self.policies:
            return self.variants, Decision(True)
        facts = ModelFacts(self.model, self.version)
        allowed = []
        refusal = Decision(True)
        for variant in self.variants:
            decision = evaluate(self.policies.get(variant.id, Policy()), facts, node)
            if decision.allowed:
                allowed.append(variant)
            elif refusal.allowed:
                refusal = decision
        return tuple(allowed), refusal if not allowed else Decision(True)


@dataclass(frozen=True)
class Decided:
    """The entry that decides one model on one node, with the variants it may use there."""

    deployment: ActiveDeployment
    variants: tuple[VariantRef, ...]


def decide(
    node_id: str, labels: Mapping[str, str], deployments: Iterable[ActiveDeployment], node: NodeFacts | None = None
) -> tuple[dict[str, Decided], dict[str, list[tuple[ActiveDeployment, Decision]]]]:
    """For each model, the entry that decides it on this node, and the entries a policy kept from deciding.

    Returns (decided by model, refused by model): `refused` lists, newest first, the entries that targeted the
    node but whose policy forbids it, each with the decision that says which rule.
    """
    facts = node if node is not None else NodeFacts.of(node_id, "", "", labels)
    by_model: dict[str, list[ActiveDeployment]] = {}
    for deployment in deployments:
        if deployment.applies_to(node_id, labels):
            by_model.setdefault(deployment.model, []).append(deployment)
    decided: dict[str, Decided] = {}
    refused: dict[str, list[tuple[ActiveDeployment, Decision]]] = {}
    for model, candidates in by_model.items():
        for deployment in sorted(candidates, key=lambda d: d.recency, reverse=True):
            variants, decision = deployment.placement(facts)
            if variants:
                decided[model] = Decided(deployment, variants)
                break
            refused.setdefault(model, []).append((deployment, decision))
    return decided, refused


def deciding_deployments(
    labels: Mapping[str, str], deployments: Iterable[ActiveDeployment], node_id: str = ""
) -> dict[str, ActiveDeployment]:
    """For each model, the deployment that decides its version on a node with these labels."""
    decided, _ = decide(node_id, labels, deployments)
    return {model: d.deployment for model, d in decided.items()}


def desired_state(
    node_id: str,
    labels: Mapping[str, str],
    revoked: bool,
    deployments: Iterable[ActiveDeployment],
    node: NodeFacts | None = None,
) -> DesiredState:
    """What node `node_id` should run: models sorted by name, each with its allowed variants sorted by id.

    `node` gives the facts placement policies see (name, tier, profile, labels); without it, only the labels.
    """
    if revoked:
        return DesiredState(node_id=node_id, models=())
    decided, _ = decide(node_id, labels, deployments, node)
    models = tuple(
        DesiredModel(
            name=name,
            version=choice.deployment.version,
            deployment=choice.deployment.source,
            variants=tuple(sorted(choice.variants, key=lambda v: v.id)),
        )
        for name, choice in sorted(decided.items())
    )
    return DesiredState(node_id=node_id, models=models)


def referenced_blobs(state: DesiredState) -> frozenset[str]:
    """The hex sha256 of every package tar and release signature a desired state lets its node download."""
    blobs = {variant.blob for model in state.models for variant in model.variants}
    blobs.update(variant.signature for model in state.models for variant in model.variants if variant.signature)
    return frozenset(blobs)


def count_matching(selector: Mapping[str, str], fleet_labels: Iterable[Mapping[str, str]]) -> int:
    """How many of the given nodes' label sets a selector matches."""
    return sum(1 for labels in fleet_labels if selector_matches(selector, labels))


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """True when an `If-None-Match` header names `etag` (or is `*`); weak `W/` prefixes compare as strong."""
    if if_none_match is None:
        return False
    candidates = (c.strip().removeprefix("W/") for c in if_none_match.split(","))
    return any(c in ("*", etag) for c in candidates)
