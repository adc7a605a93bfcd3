"""The desired-state rule, as pure functions: which version of which model each node should run.

For a node with labels L, for each model, the most recently created deployment whose selector matches L (ties
broken by the higher id) decides the version; the node gets that version's variants, all of them, and picks the
one its hardware runs best. A revoked node gets nothing. No I/O and no clock here: the fleet service loads the
deployments and calls these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from strata.core.wire import DesiredModel, DesiredState, VariantRef, selector_matches


@dataclass(frozen=True)
class ActiveDeployment:
    """A deployment as the rule sees it: what it pins, where, since when, and the variants of that version."""

    id: int
    model: str
    version: str
    selector: Mapping[str, str]
    created_at: float
    variants: tuple[VariantRef, ...]

    @property
    def recency(self) -> tuple[float, int]:
        """Sort key: later creation first wins, then the higher id."""
        return (self.created_at, self.id)


def deciding_deployments(
    labels: Mapping[str, str], deployments: Iterable[ActiveDeployment]
) -> dict[str, ActiveDeployment]:
    """For each model, the deployment that decides its version on a node with these labels."""
    winners: dict[str, ActiveDeployment] = {}
    for deployment in deployments:
        if not selector_matches(deployment.selector, labels):
            continue
        current = winners.get(deployment.model)
        if current is None or deployment.recency > current.recency:
            winners[deployment.model] = deployment
    return winners


def desired_state(
    node_id: str, labels: Mapping[str, str], revoked: bool, deployments: Iterable[ActiveDeployment]
) -> DesiredState:
    """What node `node_id` should run: models sorted by name, each with its variants sorted by id."""
    if revoked:
        return DesiredState(node_id=node_id, models=())
    winners = deciding_deployments(labels, deployments)
    models = tuple(
        DesiredModel(
            name=name,
            version=deployment.version,
            deployment=str(deployment.id),
            variants=tuple(sorted(deployment.variants, key=lambda v: v.id)),
        )
        for name, deployment in sorted(winners.items())
    )
    return DesiredState(node_id=node_id, models=models)


def referenced_blobs(state: DesiredState) -> frozenset[str]:
    """The hex sha256 of every package tar a desired state lets its node download."""
    return frozenset(variant.blob for model in state.models for variant in model.variants)


def count_matching(selector: Mapping[str, str], fleet_labels: Iterable[Mapping[str, str]]) -> int:
    """How many of the given nodes' label sets a selector matches."""
    return sum(1 for labels in fleet_labels if selector_matches(selector, labels))


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """True when an `If-None-Match` header names `etag` (or is `*`); weak `W/` prefixes compare as strong."""
    if if_none_match is None:
        return False
    candidates = (c.strip().removeprefix("W/") for c in if_none_match.split(","))
    return any(c in ("*", etag) for c in candidates)
