"""The desired-state rule, as pure functions: which version of which model each node should run.

For a node, for each model, the entries that apply to it compete: deployments (a label selector), rollouts (a
deployment that reaches only the nodes of its started waves until it succeeds) and pins (an operator's "this
node, or these labels, stay on this version"). A pin beats everything; otherwise the most recently created entry
wins (ties broken by kind, then the higher id). An entry whose version's placement policy forbids the node does
not apply to it, so the next one decides, or the node does not get the model at all. The node gets the winner's
variants its policy allows and picks the one its hardware runs best. A revoked node gets nothing. The entries, and
whether a version may reach a node, are `strata.control.eligibility_rule`'s. No I/O and no clock here: the fleet
service loads the entries and calls these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from strata.control.eligibility_rule import ActiveDeployment
from strata.core.policy import Decision, NodeFacts
from strata.core.wire import DesiredModel, DesiredState, VariantRef, selector_matches


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
