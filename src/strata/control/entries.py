"""Rows to the plain values `strata.control.eligibility_rule` decides over: a stored version as a `Release`, pins as
entries of the desired-state rule, a node as a `FleetNode`.

The deployments, the rollout driver and the fleet service all load through here, so neither driver imports the
other for it.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from strata.control.db import ModelVersion, Node, Pin
from strata.control.eligibility_rule import ActiveDeployment, FleetNode, Release
from strata.control.presence import PresenceTracker
from strata.core.policy import NodeFacts, Policy, PolicyError
from strata.core.wire import NodeStatus, VariantRef

log = logging.getLogger(__name__)


def release_of(version: ModelVersion) -> Release:
    """A stored version with its variants (as desired states name them) and each one's placement policy, from the
    manifest it was registered with (empty ones left out)."""
    variants = tuple(
        VariantRef(
            id=v.variant,
            profile=v.profile,
            runtime=v.runtime,
            precision=v.precision,
            digest=v.digest,
            blob=v.blob,
            size=v.size,
            signature=v.signature,
        )
        for v in version.variants
    )
    policies: dict[str, Policy] = {}
    for variant in version.variants:
        try:
            policy = Policy.from_json(variant.manifest.get("policy") or {})
        except PolicyError as exc:  # checked at upload; a row from before would fail closed here
            log.error("variant %s has an unreadable policy (%s); it is allowed nowhere", variant.variant, exc)
            policy = Policy(allowed_regions=("\x00unreadable",))
        if not policy.empty:
            policies[variant.variant] = policy
    return Release(version.model.name, version.version, variants, policies)


def load_pin_entries(session: Session) -> list[ActiveDeployment]:
    """Every pin as an entry of the desired-state rule (a pin on one node applies to that node only).

    Raises:
        SQLAlchemyError: the query failed (callers run it inside `Database.transaction`, which wraps it).
    """
    rows = session.scalars(
        select(Pin).options(
            selectinload(Pin.version).selectinload(ModelVersion.model),
            selectinload(Pin.version).selectinload(ModelVersion.variants),
        )
    ).all()
    return [
        release_of(row.version).entry(
            row.id,
            row.created_at,
            row.selector,
            kind="pin",
            only_nodes=frozenset({row.node_id}) if row.node_id else None,
        )
        for row in rows
    ]


def is_online(node: Node, presence: PresenceTracker | None, now: float, window_s: float) -> bool:
    """Whether the node was seen (a stored call, or one this replica saw and has not stored yet) within the window."""
    seen = [node.last_seen, presence.last_seen(node.id) if presence is not None else None]
    last_seen = max((t for t in seen if t is not None), default=None)
    return last_seen is not None and now - last_seen <= window_s


def fleet_node(node: Node, status: NodeStatus | None, online: bool) -> FleetNode:
    """A stored node as eligibility sees it, with its parsed last report."""
    return FleetNode(
        id=node.id,
        name=node.name,
        labels=dict(node.labels),
        facts=NodeFacts.of(node.name, node.tier, node.profile, node.labels, node.attestation or ""),
        status=status,
        online=online,
    )
