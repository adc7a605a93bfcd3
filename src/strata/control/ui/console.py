"""What the console's pages show, read from the control plane's services: one call per page, JSON-ready.

The fleet page counts every node and sends one page of them (sorted and paged on the server, so a 10,000-node
fleet costs the browser one small table). The node views behind it are kept for two seconds per fleet generation:
the live refreshes of every open console read the inventory once per tick.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

from sqlalchemy import func, select

from strata.control.db import Node as NodeRow
from strata.control.db import NodeCertificate
from strata.control.inventory import NodeOrder, NodeView, fleet_counts, page_nodes, select_nodes
from strata.control.plane import ControlPlane
from strata.control.registry import VariantInfo
from strata.control.supply import PackageRole
from strata.core.errors import NotFound, ProfileError
from strata.core.profiles import get_profile
from strata.trust.targets import target_path

VIEWS_TTL_S: Final = 2.0  # the live refresh's tick
TELEMETRY_WINDOW_S: Final = 3600.0
HISTORY_EVENTS: Final = 20
TIMELINE_ROLLOUTS: Final = 20  # the newest rollouts get a timeline; `strata events` has the rest
TIMELINE_EVENTS: Final = 100  # the last this many events of each
ROLLOUT_TAIL_S: Final = 600.0  # after a rollout ends, its nodes' activations (an abort's rollbacks) still count
# The optimizer's accuracy metrics (`strata.optimize.report.headline_metrics`), the first one a variant has is
# the one its report and plot show.
ACCURACY_METRICS: Final = ("accuracy", "top1_agreement", "mean_cosine", "min_cosine", "rel_error", "max_abs_error")
_REPORT_NUMBERS: Final = ("throughput", "speedup", "latency_p50_ms", "latency_p95_ms", "size_bytes")

# The columns of the fleet page's node table: what it needs of a view, nothing more.
_ROW_FIELDS: Final = ("id", "name", "tier", "profile", "online", "in_sync", "last_seen", "agent_version", "models")


def _row(view: NodeView) -> dict[str, Any]:
    row = {name: getattr(view, name) for name in _ROW_FIELDS}
    row["region"] = view.labels.get("region", "")
    row["site"] = view.labels.get("site", "")
    row["attestation"] = view.attestation or "none"
    return row


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def optimizer_report(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the optimizer measured of a variant, from the metrics its manifest carries (`strata optimize --push`
    puts them there, see `optimize.packaging.package_metrics`): the headline accuracy metric and its value,
    throughput, speed-up, latency, size, the gate's verdict and why it was rejected; None when the variant has
    none of them (a package built by hand)."""
    accuracy = next((k for k in ACCURACY_METRICS if _number(metrics.get(k)) is not None), None)
    numbers = {k: _number(metrics.get(k)) for k in _REPORT_NUMBERS}
    if accuracy is None and all(v is None for v in numbers.values()) and "gate" not in metrics:
        return None
    return {
        "accuracy_metric": accuracy,
        "accuracy": _number(metrics.get(accuracy)) if accuracy else None,
        **numbers,
        "gate": str(metrics["gate"]) if "gate" in metrics else None,
        "reason": str(metrics["reason"]) if metrics.get("reason") else None,
        "measured_on": str(metrics["measured_on"]) if "measured_on" in metrics else None,
    }


def tuf_status(signed: bool, role: PackageRole | None, signatures_required: bool, now: float) -> dict[str, Any]:
    """A variant's supply-chain standing, for the models page: whether its release signature is stored, whether
    the image repository lists its release-signed role (and delegates to it), and one sentence saying so."""
    listed = role is not None
    delegated = role is not None and role.delegated
    if role is not None and not role.delegated:
        text = "its role is listed but not delegated: its key is not one this server trusts now"
    elif role is not None and role.expires_at <= now:
        text = f"release role v{role.version} in the image repository has expired: sign it again"
    elif role is not None:
        expires = time.strftime("%Y-%m-%d", time.gmtime(role.expires_at))
        text = f"role v{role.version} in the image repository (expires {expires})"
    elif signed:
        text = "the image repository lists no role for its signature"
    elif signatures_required:
        text = "nodes refuse it until its release signature is attached (strata model sign)"
    else:
        text = "development mode: the server has no release keys"
    return {
        "signed": signed,
        "listed": listed,
        "delegated": delegated,
        "role_version": role.version if role else None,
        "expires_at": role.expires_at if role else None,
        "text": text,
    }


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
        """The models page: every model, version and variant (with the optimizer's report and the variant's TUF
        status), where each version runs now, and the latest history events.

        Raises:
            StoreError: the database failed.
        """
        plane = self._plane
        running: dict[tuple[str, str], list[str]] = {}
        for view in self._all_views():
            for model, version in view.models.items():
                running.setdefault((model, version), []).append(view.name)
        roles = plane.supply.package_roles()
        required, now = plane.supply.enabled, plane.settings.clock()

        def variant_of(model: str, version: str, variant: VariantInfo) -> dict[str, Any]:
            role = roles.get(target_path(model, version, variant.id))
            return {
                **dataclasses.asdict(variant),
                "report": optimizer_report(variant.metrics),
                "tuf": tuf_status(variant.signature is not None, role, required, now),
            }

        out = []
        for info in plane.registry.list_models():
            versions = [
                {
                    "version": v.version,
                    "created_at": v.created_at,
                    "variants": [variant_of(info.name, v.version, variant) for variant in v.variants],
                    "running_on": sorted(running.get((info.name, v.version), [])),
                }
                for v in info.versions
            ]
            history = [dataclasses.asdict(e) for e in plane.history.history(info.name, HISTORY_EVENTS)]
            out.append({"name": info.name, "created_at": info.created_at, "versions": versions, "history": history})
        return {"generation": plane.feed.generation, "models": out}

    def rollouts(self) -> dict[str, Any]:
        """The rollouts page: every rollout with its waves, gates' values and nodes kept out, newest first; the
        newest also with their timeline (`EventService.of_rollout`: the rollout's events, then its nodes' until
        the next rollout of the model started or a while after it ended).

        Raises:
            StoreError: the database failed.
        """
        plane = self._plane
        out = []
        started_later: dict[str, float] = {}  # per model, when the next (newer) rollout of it started
        for number, view in enumerate(plane.rollouts.list()):  # newest first
            rollout = dataclasses.asdict(view)
            if number < TIMELINE_ROLLOUTS:
                end = None if view.finished_at is None else view.finished_at + ROLLOUT_TAIL_S
                later = started_later.get(view.model)
                if later is not None:
                    end = later if end is None else min(end, later)
                events = plane.events.of_rollout(int(view.id), view.model, view.created_at, end, TIMELINE_EVENTS)
                rollout["timeline"] = [dataclasses.asdict(e) for e in events]
            else:
                rollout["timeline"] = None
            started_later[view.model] = view.created_at
            out.append(rollout)
        return {"generation": plane.feed.generation, "rollouts": out}
