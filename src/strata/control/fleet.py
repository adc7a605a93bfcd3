"""The fleet: enrollment, the node inventory, observed status, presence, and each node's desired state.

Desired states are cached per node and keyed by the fleet generation (`ChangeFeed`), and the deployments they
are computed from are cached per generation too, so an agent polling an unchanged fleet costs no database work.
A long poll waits on the feed and answers as soon as the node's own desired state changes.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio.to_thread
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from strata.control.auth import Authenticator, Principal, authorize_blob, hash_secret, new_id, new_secret
from strata.control.blobs import BlobStore
from strata.control.db import Database, EnrollmentToken, Node
from strata.control.deployments import load_active_deployments
from strata.control.desired import ActiveDeployment, desired_state, etag_matches, referenced_blobs
from strata.control.feed import ChangeFeed
from strata.control.presence import PresenceTracker
from strata.core.errors import AuthError, NotFound, PackageError
from strata.core.hashing import canonical_json
from strata.core.package import check_name
from strata.core.profiles import get_profile
from strata.core.wire import TIERS, DesiredState, EnrollRequest, EnrollResponse, NodeStatus, ProtocolError, parse_labels

MAX_ENROLLMENT_TTL_S: Final = 7 * 24 * 3600
INVALID_ENROLLMENT: Final = "enrollment token is invalid, used or expired"


@dataclass(frozen=True)
class IssuedToken:
    """A fresh enrollment token; the secret is shown once and only its hash is kept."""

    token: str
    expires_at: float


@dataclass(frozen=True)
class DesiredDocument:
    """A node's desired state with what serving it needs: its ETag, its JSON body and the blobs it names."""

    state: DesiredState
    etag: str
    body: bytes
    blobs: frozenset[str]

    @classmethod
    def of(cls, state: DesiredState) -> DesiredDocument:
        """Serialise `state` once, so that every poll of it is answered from memory."""
        return cls(state, state.etag, json.dumps(state.to_json()).encode(), referenced_blobs(state))


@dataclass(frozen=True)
class DesiredPoll:
    """The answer to a desired-state poll: the document, and whether it differs from what the node has."""

    document: DesiredDocument
    changed: bool


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


def is_online(last_seen: float | None, now: float, window_s: float) -> bool:
    """A node is online when it was seen within the last `window_s` seconds."""
    return last_seen is not None and now - last_seen <= window_s


def node_view(node: Node, last_seen: float | None, desired_etag: str, online: bool) -> NodeView:
    """The operator's view of a stored node, given the facts that do not live in its row."""
    status: Mapping[str, Any] = json.loads(node.status) if node.status else {}
    return NodeView(
        id=node.id,
        name=node.name,
        tier=node.tier,
        labels=dict(node.labels),
        profile=node.profile,
        emulated=node.emulated,
        agent_version=node.agent_version,
        online=online,
        last_seen=last_seen,
        models={m["name"]: m["version"] for m in status.get("models", [])},
        failures=list(status.get("failures", [])),
        serve_url=node.serve_url,
        desired_etag=desired_etag,
        reported_etag=node.reported_etag,
        in_sync=node.reported_etag == desired_etag,
    )


def check_enroll_request(request: EnrollRequest) -> None:
    """Validate what a machine asks to enroll as.

    Raises:
        ProtocolError: the name or labels are malformed, or the tier is unknown.
        ProfileError: the hardware profile is unknown.
    """
    try:
        check_name("node name", request.name)
    except PackageError as exc:
        raise ProtocolError(str(exc)) from None
    if request.tier not in TIERS:
        raise ProtocolError(f"tier {request.tier!r} is not one of {list(TIERS)}")
    parse_labels(request.labels)
    get_profile(request.profile)


class FleetService:
    """Nodes and what they should run; see the module docstring for the caching contract."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        feed: ChangeFeed,
        presence: PresenceTracker,
        authenticator: Authenticator,
        clock: Callable[[], float],
        online_window_s: float,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._feed = feed
        self._presence = presence
        self._authenticator = authenticator
        self._clock = clock
        self._online_window_s = online_window_s
        self._lock = threading.Lock()
        self._deployments: tuple[int, tuple[ActiveDeployment, ...]] = (-1, ())
        self._desired: dict[str, tuple[int, DesiredDocument]] = {}

    # --- enrollment -----------------------------------------------------------------------------------------

    def issue_enrollment_token(self, ttl_s: float) -> IssuedToken:
        """A one-time token that lets one machine enroll within `ttl_s` seconds (1 s to 7 days).

        Raises:
            ProtocolError: `ttl_s` is out of range.
            StoreError: the database failed.
        """
        if not 1 <= ttl_s <= MAX_ENROLLMENT_TTL_S:
            raise ProtocolError(f"ttl_seconds must be between 1 and {MAX_ENROLLMENT_TTL_S}")
        token = new_secret()
        now = self._clock()
        with self._db.transaction() as session:
            session.add(
                EnrollmentToken(id=new_id(), token_hash=hash_secret(token), created_at=now, expires_at=now + ttl_s)
            )
        return IssuedToken(token=token, expires_at=now + ttl_s)

    def enroll(self, request: EnrollRequest) -> EnrollResponse:
        """Spend an enrollment token on a node: a new one, or the node of that name again with a new credential.

        The token is claimed and the node written in one transaction, so a token enrolls at most once even when
        two machines race with it. Re-enrolling keeps the node id and invalidates the old credential (and lifts
        a revocation: the operator handed out the token).

        Raises:
            AuthError: the token is unknown, used or expired.
            ProtocolError, ProfileError: as `check_enroll_request`.
            Conflict: another enrollment of the same new name committed first.
            StoreError: the database failed.
        """
        check_enroll_request(request)
        credential = new_secret()
        now = self._clock()
        with self._db.transaction() as session:
            node = session.scalar(select(Node).where(Node.name == request.name))
            if node is None:
                node = Node(id=new_id(), name=request.name, enrolled_at=now)
                session.add(node)
            node.tier = request.tier
            node.labels = dict(request.labels)
            node.profile = request.profile
            node.emulated = request.emulated
            node.agent_version = request.agent_version
            node.facts = dict(request.facts)
            node.credential_hash = hash_secret(credential)
            node.enrolled_at = now
            node.revoked_at = None
            session.flush()
            claimed = session.connection().execute(
                update(EnrollmentToken)
                .where(
                    EnrollmentToken.token_hash == hash_secret(request.token),
                    EnrollmentToken.used_at.is_(None),
                    EnrollmentToken.expires_at > now,
                )
                .values(used_at=now, node_id=node.id)
            )
            if claimed.rowcount != 1:
                raise AuthError(INVALID_ENROLLMENT)
            node_id = node.id
        self._authenticator.forget_node(node_id)
        self._feed.bump()
        return EnrollResponse(node_id=node_id, credential=credential)

    # --- inventory ------------------------------------------------------------------------------------------

    def list_nodes(self, tiers: Collection[str] | None = None) -> list[NodeView]:
        """Every node that is not revoked (of these tiers, when given), by name.

        Raises:
            StoreError: the database failed.
        """
        generation = self._feed.generation
        now = self._clock()
        query = select(Node).where(Node.revoked_at.is_(None)).order_by(Node.name)
        if tiers is not None:
            query = query.where(Node.tier.in_(list(tiers)))
        with self._db.transaction() as session:
            nodes = session.scalars(query).all()
            deployments = self._active_deployments(session, generation)
        return [self._view(node, generation, deployments, now) for node in nodes]

    def get_node(self, node_id: str) -> NodeView:
        """One node that is not revoked.

        Raises:
            NotFound: no such node, or it was revoked.
            StoreError: the database failed.
        """
        generation = self._feed.generation
        now = self._clock()
        with self._db.transaction() as session:
            node = self._live_node(session, node_id)
            deployments = self._active_deployments(session, generation)
        return self._view(node, generation, deployments, now)

    def revoke(self, node_id: str) -> None:
        """Revoke a node: its credential stops working at once and no deployment targets it any more.

        Raises:
            NotFound: no such node, or it was revoked already.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            self._live_node(session, node_id).revoked_at = self._clock()
        self._authenticator.forget_node(node_id)
        self._presence.forget(node_id)
        self._feed.bump()

    # --- observed state ----------------------------------------------------------------------------------

    def report_status(self, node_id: str, status: NodeStatus) -> bool:
        """Store what a node reports, only when it differs from what is stored; return whether it was written.

        A change of labels can change the node's desired state, so it bumps the fleet generation.

        Raises:
            ProfileError: the status names an unknown hardware profile.
            NotFound: no such node, or it was revoked.
            StoreError: the database failed.
        """
        get_profile(status.profile)
        document = canonical_json(status.to_json()).decode()
        with self._db.transaction() as session:
            node = self._live_node(session, node_id)
            if node.status == document:
                return False
            labels_changed = node.labels != status.labels
            node.status = document
            node.status_at = self._clock()
            node.tier = status.tier
            node.labels = dict(status.labels)
            node.profile = status.profile
            node.emulated = status.emulated
            node.agent_version = status.agent_version
            node.reported_etag = status.desired_etag
            node.serve_url = status.serve_url
        if labels_changed:
            self._feed.bump()
        return True

    # --- desired state -----------------------------------------------------------------------------------

    def desired(self, node_id: str) -> DesiredDocument:
        """The node's current desired state (a revoked node's is empty); from memory while the fleet is unchanged.

        Raises:
            NotFound: no such node.
            StoreError: the database failed.
        """
        generation = self._feed.generation
        cached = self._cached_desired(node_id, generation)
        if cached is not None:
            return cached
        with self._db.transaction() as session:
            row = session.execute(select(Node.labels, Node.revoked_at).where(Node.id == node_id)).first()
            if row is None:
                raise NotFound(f"no node {node_id!r}")
            deployments = self._active_deployments(session, generation)
        return self._document(node_id, row.labels, row.revoked_at is not None, generation, deployments)

    async def poll_desired(self, node_id: str, if_none_match: str | None, wait_s: float) -> DesiredPoll:
        """Answer a desired-state poll, waiting up to `wait_s` seconds for a change when the node is current.

        Returns as soon as the node's desired state differs from `if_none_match`; otherwise, after `wait_s` or
        when the server shuts down, with `changed` False.

        Raises:
            NotFound: no such node.
            StoreError: the database failed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            generation = self._feed.generation
            document = self._cached_desired(node_id, generation)
            if document is None:
                document = await anyio.to_thread.run_sync(self.desired, node_id)
            if not etag_matches(if_none_match, document.etag):
                return DesiredPoll(document, changed=True)
            remaining = deadline - loop.time()
            if remaining <= 0 or self._feed.closed:
                return DesiredPoll(document, changed=False)
            await self._feed.wait_beyond(generation, remaining)

    def blob_path(self, principal: Principal, sha256: str) -> Path:
        """The file of a stored blob, if `principal` may read it (see `auth.authorize_blob`).

        Raises:
            NotFound: no such blob.
            Forbidden: a node asked for a blob its desired state does not name.
            StoreError: the database or the blob store failed.
        """
        if not self._blobs.exists(sha256):
            raise NotFound(f"blob {sha256} is not stored")
        referenced = principal.node_id is not None and sha256 in self.desired(principal.node_id).blobs
        authorize_blob(principal, referenced)
        return self._blobs.path(sha256)

    # --- internals --------------------------------------------------------------------------------------

    def _cached_desired(self, node_id: str, generation: int) -> DesiredDocument | None:
        cached = self._desired.get(node_id)
        return cached[1] if cached is not None and cached[0] == generation else None

    def _document(
        self,
        node_id: str,
        labels: Mapping[str, str],
        revoked: bool,
        generation: int,
        deployments: tuple[ActiveDeployment, ...],
    ) -> DesiredDocument:
        cached = self._cached_desired(node_id, generation)
        if cached is not None:
            return cached
        document = DesiredDocument.of(desired_state(node_id, labels, revoked, deployments))
        with self._lock:
            self._desired[node_id] = (generation, document)
        return document

    def _active_deployments(self, session: Session, generation: int) -> tuple[ActiveDeployment, ...]:
        # `generation` was read before the query: a write that commits meanwhile bumps it, so at worst this
        # caches newer data under an older generation, which the next call recomputes.
        cached_generation, deployments = self._deployments
        if cached_generation == generation:
            return deployments
        deployments = load_active_deployments(session)
        with self._lock:
            self._deployments = (generation, deployments)
        return deployments

    def _view(self, node: Node, generation: int, deployments: tuple[ActiveDeployment, ...], now: float) -> NodeView:
        document = self._document(node.id, node.labels, node.revoked_at is not None, generation, deployments)
        in_memory = self._presence.last_seen(node.id)
        last_seen = max((t for t in (node.last_seen, in_memory) if t is not None), default=None)
        return node_view(node, last_seen, document.etag, is_online(last_seen, now, self._online_window_s))

    @staticmethod
    def _live_node(session: Session, node_id: str) -> Node:
        node = session.get(Node, node_id)
        if node is None or node.revoked_at is not None:
            raise NotFound(f"no node {node_id!r}")
        return node
