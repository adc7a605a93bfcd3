"""Who may read which blob: the access control of the blob endpoint and of the near-edge relay.

A node reads the blobs its desired state names (package manifests, the chunks and files they list); a near-edge
node also reads those of the devices at its site, whose pieces it relays; an operator reads any. The desired state
comes from the fleet service (`FleetService.desired`, cached per generation); the pieces of a package are read once
(a package never changes) and a near-edge node's site packages once per generation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.control.auth import Principal, authorize_blob
from strata.control.blobs import BlobStore
from strata.control.db import Database, Node, Variant
from strata.control.deployments import load_active_deployments
from strata.control.eligibility_rule import ActiveDeployment
from strata.control.feed import ChangeFeed
from strata.control.fleet import DesiredDocument, live_node, node_facts
from strata.core.errors import Forbidden, NotFound
from strata.core.package import Manifest, package_pieces


class BlobAccess:
    """Reads of stored blobs and package-access questions, each checked against the desired states."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        feed: ChangeFeed,
        desired: Callable[[str], DesiredDocument],
        deployments: Callable[[Session], tuple[ActiveDeployment, ...]] = load_active_deployments,
    ) -> None:
        """`desired` is the fleet's desired state of a node (`FleetService.desired`); `deployments` its entries of the
        desired-state rule (`FleetService.active_deployments`, read once per fleet generation)."""
        self._db = db
        self._blobs = blobs
        self._feed = feed
        self._desired = desired
        self._deployments = deployments
        self._lock = threading.Lock()
        self._piece_cache: dict[str, frozenset[str]] = {}
        self._site_cache: dict[str, tuple[int, frozenset[str]]] = {}
        self.bytes_served = 0

    def blob_path(self, principal: Principal, sha256: str) -> Path:
        """The file of a stored blob, if `principal` may read it (see `auth.authorize_blob`). Who may read it is
        decided first: a caller who may not learns nothing, not even whether the blob is stored.

        Raises:
            NotFound: no such blob (said only to a caller who may read it).
            Forbidden: a node asked for a blob its desired state does not name, or a read-only token asked.
            StoreError: the database or the blob store failed.
        """
        referenced = False
        if principal.node_id is not None:
            document = self._desired(principal.node_id)
            digests = {variant.digest for model in document.state.models for variant in model.variants}
            digests |= self._site_digests(principal.node_id)
            referenced = sha256 in document.blobs or any(sha256 in self._pieces(digest) for digest in digests)
        authorize_blob(principal, referenced)
        if not self._blobs.exists(sha256):
            raise NotFound(f"blob {sha256} is not stored")
        return self._blobs.path(sha256)

    def package_access(self, principal: Principal, device_id: str, digest: str) -> None:
        """Whether `device_id` may read package `digest` (it is in its desired state), asked by an operator, the
        device itself, or the near-edge node at the device's site that relays pieces for it.

        Raises:
            Forbidden: the caller may not ask about this device, or the device may not read the package.
            NotFound: no such device.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            device = live_node(session, device_id)
            requester = live_node(session, principal.node_id) if principal.node_id is not None else None
            device_site = device.labels.get("site")
            relays_for_it = (
                requester is not None
                and requester.tier == "near-edge"
                and device_site is not None
                and requester.labels.get("site") == device_site
            )
        if not (principal.is_operator or principal.node_id == device_id or relays_for_it):
            raise Forbidden("only the device, an operator, or the near-edge node at its site may ask this")
        document = self._desired(device_id)
        if all(v.digest != digest for model in document.state.models for v in model.variants):
            raise Forbidden(f"package {digest} is not in the desired state of node {device_id}")
        relay = principal.node_id if relays_for_it and principal.node_id != device_id else None
        if relay is not None and digest not in self._site_digests(relay):
            raise Forbidden(
                f"the placement policy of package {digest} forbids this relay; the device fetches it from the "
                "control plane"
            )

    def _site_digests(self, node_id: str) -> frozenset[str]:
        """Packages the devices at a near-edge node's site should run (it relays their pieces); empty otherwise.

        Raises:
            StoreError: the database failed.
        """
        generation = self._feed.generation
        cached = self._site_cache.get(node_id)
        if cached is not None and cached[0] == generation:
            return cached[1]
        allowed_here: set[str] = set()
        with self._db.transaction() as session:
            node = session.get(Node, node_id)
            site = node.labels.get("site") if node is not None and node.tier == "near-edge" else None
            at_site: list[str] = []
            if node is not None and site is not None:
                rows = session.execute(
                    select(Node.id, Node.labels).where(Node.tier == "device", Node.revoked_at.is_(None))
                ).all()
                at_site = [device_id for device_id, labels in rows if labels.get("site") == site]
                # the relay holds what it relays: a package whose placement policy forbids the relay itself (another
                # jurisdiction, an attestation it lacks) is not its to read; its devices take it from here
                facts = node_facts(node)
                allowed_here = {
                    variant.digest
                    for deployment in (self._deployments(session) if at_site else ())
                    for variant in deployment.placement(facts)[0]
                }
        digests = frozenset(
            variant.digest
            for device in at_site
            for model in self._desired(device).state.models
            for variant in model.variants
            if variant.digest in allowed_here
        )
        self._site_cache[node_id] = (generation, digests)
        return digests

    def count_served(self, size: int) -> None:
        """Add to the bytes the blob endpoint has sent (what a site's WAN link carries)."""
        with self._lock:
            self.bytes_served += size

    def _pieces(self, digest: str) -> frozenset[str]:
        """The blobs a node fetches to assemble package `digest`: its canonical manifest (whose blob id is the
        digest), the chunks of its large files and its small files whole. A package never changes, so this is
        cached for good.

        Raises:
            StoreError: the database failed.
        """
        pieces = self._piece_cache.get(digest)
        if pieces is None:
            with self._db.transaction() as session:
                raw = session.scalar(select(Variant.manifest).where(Variant.digest == digest).limit(1))
            pieces = frozenset(package_pieces(Manifest.from_json(raw))) if raw is not None else frozenset()
            self._piece_cache[digest] = pieces
        return pieces
