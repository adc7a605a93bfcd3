"""What the console's pages show, read from the control plane's services: one call per page, JSON-ready.

The fleet page counts every node and sends one page of them (sorted and paged on the server, so a 10,000-node
fleet costs the browser one small table). The node views behind it are kept for two seconds per fleet generation:
the live refreshes of every open console read the inventory once per tick.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Mapping
from typing import Any, Final

from sqlalchemy import func, select

from strata.control.db import Node as NodeRow
from strata.control.db import NodeCertificate
from strata.control.fleet import NodeView
from strata.control.inventory import NodeOrder, fleet_counts, page_nodes, select_nodes
from strata.control.plane import ControlPlane
from strata.core.errors import NotFound, ProfileError
from strata.core.profiles import get_profile

VIEWS_TTL_S: Final = 2.0  # the live refresh's tick
TELEMETRY_WINDOW_S: Final = 3600.0
HISTORY_EVENTS: Final = 20

# The columns of the fleet page's node table: what it needs of a view, nothing more.
_ROW_FIELDS: Final = ("id", "name", "tier", "profile", "online", "in_sync", "last_seen", "agent_version", "models")


def _row(view: NodeView) -> dict[str, Any]:
    row = {name: getattr(view, name) for name in _ROW_FIELDS}
    row["region"] = view.labels.get("region", "")
    row["site"] = view.labels.get("site", "")
    row["attestation"] = view.attestation or "none"
    return row


class ConsoleData:
    """The console's read side over one control plane (thread-safe)."""

    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane
        self._lock = threading.Lock()
        self._views: tuple[int, float, list[NodeView]] = (-1, 0.0, [])

    def _all_views(self) -> list[NodeView]:
        # One reader at a time: pages opened together (a page and its first live refresh) wait for one read of
        # the inventory instead of each making its own.
        with self._lock:
            generation, now = self._plane.feed.generation, self._plane.settings.clock()
            cached_generation, taken_at, views = self._views
            if cached_generation == generation and 0 <= now - taken_at < VIEWS_TTL_S:
                return views
            views = self._plane.fleet.list_nodes()
            self._views = (generation, self._plane.settings.clock(), views)
            return views

    def fleet(self, selector: Mapping[str, str], order: NodeOrder, offset: int, limit: int) -> dict[str, Any]:
        """The fleet page: counts over the nodes `selector` matches, and one sorted page of them.

        Raises:
            ProtocolError: a bad offset or limit.
            StoreError: the database failed.
        """
        views = select_nodes(self._all_views(), selector)
        page = page_nodes(views, order, offset, limit)
        return {
            "generation": self._plane.feed.generation,
            "counts": fleet_counts(views),
            "offset": offset,
            "limit": limit,
            "sort": ("-" if order.descending else "") + order.key,
            "nodes": [_row(v) for v in page],
        }

    def node(self, node_id: str) -> dict[str, Any]:
        """The node page: the node's view, its profile, certificate expiry, slots, and telemetry per model.

        Raises:
            NotFound: no such node, or it was revoked.
            StoreError: the database failed.
        """
        plane = self._plane
        view = plane.fleet.get_node(node_id)
        with plane.db.transaction() as session:
            status_text = session.scalar(select(NodeRow.status).where(NodeRow.id == node_id))
            cert_expiry = session.scalar(
                select(func.max(NodeCertificate.not_after)).where(
                    NodeCertificate.node_id == node_id, NodeCertificate.revoked_at.is_(None)
                )
            )
        status: dict[str, Any] = json.loads(status_text) if status_text else {}
        try:
            runtimes: list[str] = list(get_profile(view.profile).runtimes)
        except ProfileError:
            runtimes = []
        since = plane.settings.clock() - TELEMETRY_WINDOW_S
        telemetry = {}
        for model in sorted(view.models):
            try:
                minutes, summaries = plane.telemetry.minutes(model, None, view.name, since)
            except NotFound:  # a model removed from the registry since the node reported it
                continue
            telemetry[model] = {
                "minutes": [dataclasses.asdict(m) for m in minutes],
                "summaries": [dataclasses.asdict(s) for s in summaries],
                "drift": plane.telemetry.drift_minutes(model, node_id, since),
            }
        return {
            "generation": plane.feed.generation,
            "node": dataclasses.asdict(view),
            "runtimes": runtimes,
            "certificate_expires_at": cert_expiry,
            "slots": [
                {
                    "model": m.get("name"),
                    "active": m.get("version"),
                    "variant": m.get("variant"),
                    "activated_at": m.get("activated_at"),
                    "previous": m.get("previous_version"),
                    "probation": m.get("probation"),
                }
                for m in status.get("models", [])
            ],
            "telemetry": telemetry,
        }

    def models(self) -> dict[str, Any]:
        """The models page: every model, version and variant (with the optimizer's report, its metrics), where
        each version runs now, and the latest history events.

        Raises:
            StoreError: the database failed.
        """
        plane = self._plane
        running: dict[tuple[str, str], list[str]] = {}
        for view in self._all_views():
            for model, version in view.models.items():
                running.setdefault((model, version), []).append(view.name)
        out = []
        for info in plane.registry.list_models():
            versions = [
                {
                    "version": v.version,
                    "created_at": v.created_at,
                    "variants": [dataclasses.asdict(variant) for variant in v.variants],
                    "running_on": sorted(running.get((info.name, v.version), [])),
                }
                for v in info.versions
            ]
            history = [dataclasses.asdict(e) for e in plane.history.history(info.name, HISTORY_EVENTS)]
            out.append({"name": info.name, "created_at": info.created_at, "versions": versions, "history": history})
        return {"generation": plane.feed.generation, "models": out}

    def rollouts(self) -> dict[str, Any]:
        """The rollouts page: every rollout with its waves, gates' values and nodes kept out, newest first.

        Raises:
            StoreError: the database failed.
        """
        plane = self._plane
        return {
            "generation": plane.feed.generation,
            "rollouts": [dataclasses.asdict(r) for r in plane.rollouts.list()],
        }
