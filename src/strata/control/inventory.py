"""Pure views over the node inventory: filter by label selector, sort and page, and count the fleet.

The console's fleet page and `GET /v1/nodes?limit=&offset=&sort=` both use these on the `NodeView`s (plain values,
defined here) the fleet service builds; nothing here does I/O, so a 10,000-node fleet is sorted and counted in
memory in one pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from strata.core.wire import ProtocolError, selector_matches


@dataclass(frozen=True)
class NodeView:
    """A node as the operator sees it: identity, liveness, what it runs, and whether it has caught up."""

    id: str
    name: str
    tier: str
    labels: dict[str, str]
    profile: str
    emulated: bool
    agent_version: str
    online: bool
    last_seen: float | None
    models: dict[str, str]
    failures: list[dict[str, Any]]
    serve_url: str | None
    desired_etag: str
    reported_etag: str | None
    in_sync: bool
    pins: dict[str, str] = field(default_factory=dict)
    attestation: str | None = None
    attestation_detail: str | None = None
    supply: str | None = None
    tpm_ek: str | None = None
    tpm_pcrs: dict[str, Any] | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    slots: list[dict[str, Any]] = field(default_factory=list)
    enrolled_at: float | None = None
    certificate_expires_at: float | None = None


MAX_PAGE: Final = 1000

# What a node list may be sorted by: the key each takes from a view. Ties break by name, so pages never overlap.
SORT_KEYS: Final[Mapping[str, Callable[[NodeView], Any]]] = {
    "name": lambda v: v.name,
    "tier": lambda v: v.tier,
    "profile": lambda v: v.profile,
    "region": lambda v: v.labels.get("region", ""),
    "site": lambda v: v.labels.get("site", ""),
    "online": lambda v: v.online,
    "in_sync": lambda v: v.in_sync,
    "last_seen": lambda v: v.last_seen or 0.0,
    "agent_version": lambda v: v.agent_version,
    "attestation": lambda v: v.attestation or "",
}


@dataclass(frozen=True)
class NodeOrder:
    """A sort order: one of `SORT_KEYS`, ascending or descending."""

    key: str = "name"
    descending: bool = False


def parse_sort(raw: str | None) -> NodeOrder:
    """`name`, `-last_seen`: a key of `SORT_KEYS`, a leading `-` for descending; None or empty means by name.

    Raises:
        ProtocolError: an unknown key.
    """
    if not raw:
        return NodeOrder()
    descending = raw.startswith("-")
    key = raw.removeprefix("-")
    if key not in SORT_KEYS:
        raise ProtocolError(f"query.sort: {key[:40]!r} is not one of {sorted(SORT_KEYS)} (prefix '-' for descending)")
    return NodeOrder(key, descending)


def select_nodes(views: Sequence[NodeView], selector: Mapping[str, str]) -> list[NodeView]:
    """The views whose labels match the equality `selector` (every view when it is empty)."""
    if not selector:
        return list(views)
    return [v for v in views if selector_matches(selector, v.labels)]


def page_nodes(
    views: Sequence[NodeView], order: NodeOrder, offset: int = 0, limit: int | None = None
) -> list[NodeView]:
    """`limit` views (None: all) from `offset` in `order` (ties by name, then id: pages never overlap).

    Raises:
        ProtocolError: a negative offset, or a limit outside 1..MAX_PAGE.
    """
    if offset < 0:
        raise ProtocolError("query.offset: must be 0 or more")
    if limit is not None and not 1 <= limit <= MAX_PAGE:
        raise ProtocolError(f"query.limit: must be between 1 and {MAX_PAGE}")
    key = SORT_KEYS[order.key]
    ordered = sorted(views, key=lambda v: (v.name, v.id))
    ordered.sort(key=key, reverse=order.descending)  # stable: equal keys keep the name order
    return ordered[offset : None if limit is None else offset + limit]


def fleet_counts(views: Sequence[NodeView]) -> dict[str, Any]:
    """What the fleet page shows at the top: totals, online and in-sync counts, counts by tier, region, site,
    hardware profile and attestation level, and the version mix per model (nodes running each version)."""
    versions: dict[str, Counter[str]] = {}
    for view in views:
        for model, version in view.models.items():
            versions.setdefault(model, Counter())[version] += 1

    def count(values: Any) -> dict[str, int]:
        return dict(sorted(Counter(values).items()))

    online = sum(1 for v in views if v.online)
    in_sync = sum(1 for v in views if v.in_sync)
    return {
        "total": len(views),
        "online": online,
        "offline": len(views) - online,
        "in_sync": in_sync,
        "out_of_sync": len(views) - in_sync,
        "by_tier": count(v.tier for v in views),
        "by_region": count(v.labels.get("region", "(none)") for v in views),
        "by_site": count(v.labels.get("site", "(none)") for v in views),
        "by_profile": count(v.profile for v in views),
        "by_attestation": count(v.attestation or "none" for v in views),
        "versions": {model: dict(sorted(c.items())) for model, c in sorted(versions.items())},
    }
