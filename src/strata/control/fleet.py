"""The fleet: enrollment, the node inventory, observed status, presence, and each node's desired state (who may
read which blob, by that desired state, is `blob_access`).

Desired states are cached per node and keyed by the fleet generation (`ChangeFeed`), and the deployments they
are computed from are cached per generation too, so an agent polling an unchanged fleet costs no database work.
A long poll waits on the feed and answers as soon as the node's own desired state changes. When a change wakes
the whole fleet (a deploy), every node's facts are read in one query for the new generation instead of one query
(and one worker-thread hop) per node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import ssl
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Generic, TypeVar

import anyio.to_thread
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from strata.control.auth import (
    NOT_CURRENT,
    Authenticator,
    certificate_hash,
    hash_secret,
    new_id,
    new_secret,
)
from strata.control.db import Database, EnrollmentToken, Node, NodeCertificate
from strata.control.deployments import load_active_deployments, stored_status
from strata.control.desired import decide, desired_state, etag_matches, referenced_blobs
from strata.control.eligibility_rule import ActiveDeployment
from strata.control.events import NewEvent, change_events, failure_events, record_event
from strata.control.feed import ChangeFeed
from strata.control.history import activation_events, record_changes
from strata.control.inventory import NodeView
from strata.control.lease import serialize
from strata.control.nodelogs import open_log_requests
from strata.control.pki import Pki
from strata.control.presence import PresenceTracker
from strata.control.quota import RecordBudget
from strata.control.revocation import (
    MAX_LIVE_CERTIFICATES,
    live_certificates,
    record_issued,
    revoke_issued,
    revoked_certificates,
)
from strata.core.errors import AuthError, Conflict, Forbidden, NotFound, PackageError
from strata.core.hashing import canonical_json
from strata.core.package import check_name
from strata.core.policy import NodeFacts
from strata.core.profiles import get_profile
from strata.core.wire import (
    TIERS,
    CertificateRenewal,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    LogRequest,
    NodeStatus,
    ProtocolError,
    parse_labels,
)
from strata.trust.ca import csr_over_key_of, same_key

log = logging.getLogger(__name__)

MAX_ENROLLMENT_TTL_S: Final = 7 * 24 * 3600
_NODE_ID: Final = re.compile(r"[0-9a-f]{32}")  # what `new_id` makes
_STATUS_ATTEMPTS: Final = 3  # a report compared with one stored meanwhile by another request is compared again
INVALID_ENROLLMENT: Final = "enrollment token is invalid, used or expired"
# Desired-state cache misses in one generation after which every node's facts are read at once (a wake-up of the
# whole fleet); below it, each miss reads its own node (an enrollment wave bumps the generation per node).
FLEET_READ_AFTER_MISSES: Final = 64


ENROLLMENT_FORMAT: Final = "stk1"


@dataclass(frozen=True)
class IssuedToken:
    """A fresh enrollment token; the secret is shown once and only its hash is kept."""

    token: str
    expires_at: float


UNBOUND_TIER: Final = "device"  # what a token that binds no tier assigns


@dataclass(frozen=True)
class TokenBinding:
    """What the operator binds an enrollment token to. A field left None takes the enrolling machine's word, once,
    at its first enrollment; `reenroll_node_id` makes the token re-enroll that one existing node and nothing else."""

    name: str | None = None
    tier: str | None = None
    labels: Mapping[str, str] | None = None
    reenroll_node_id: str | None = None


@dataclass(frozen=True)
class Assigned:
    """A node's operator-assigned identity, which decides placement, blob access and topology."""

    tier: str
    labels: dict[str, str]


def enrollment_identity(
    binding: TokenBinding, request: EnrollRequest, existing_id: str | None, existing: Assigned | None
) -> Assigned:
    """The tier and labels a node enrolls with: the token's binding where it has one; a re-enrolled node keeps what
    the operator assigned it; otherwise tier `device` and no labels. What the machine asks for beyond that is its
    claim (its status reports show it), never an assignment: a leaked unbound token reaches no site's models.

    Raises:
        Conflict: the name is enrolled already and the request does not say `replace` (enrolling would re-key that
            node and cut off the machine that holds it now).
        Forbidden: the token does not allow this enrollment (another name, tier or labels than it binds; a name
            already enrolled without a re-enrollment token for it; a re-enrollment token used for another node).
    """
    if existing_id is not None and not request.replace:
        raise Conflict(
            f"a node named {request.name!r} is enrolled already ({existing_id}): enrolling under its name re-keys "
            "it, and the machine that holds that name now loses its credential. To replace it, use a token from "
            f"`strata nodes reenroll {request.name}` and pass --replace to `strata agent`; otherwise choose "
            "another --name"
        )
    if binding.reenroll_node_id is not None:
        if existing_id != binding.reenroll_node_id:
            raise Forbidden(f"this token re-enrolls node {binding.name!r}, not {request.name!r}")
    elif existing_id is not None:
        raise Forbidden(
            f"a node named {request.name!r} is enrolled already; enrolling it again (a new machine, or after a "
            f"revocation) needs a token from `strata nodes reenroll {request.name}`"
        )
    if binding.name is not None and binding.name != request.name:
        raise Forbidden(f"this token enrolls a node named {binding.name!r}, not {request.name!r}")
    if binding.tier is not None and binding.tier != request.tier:
        raise Forbidden(f"this token enrolls a {binding.tier} node; the agent asked for tier {request.tier!r}")
    if binding.labels is not None and request.labels and dict(binding.labels) != request.labels:
        raise Forbidden(
            f"this token assigns labels {dict(binding.labels)}; the agent asked for {request.labels} "
            "(pass the same --label options, or none)"
        )
    base = existing if existing is not None else Assigned(UNBOUND_TIER, {})
    return Assigned(
        tier=binding.tier if binding.tier is not None else base.tier,
        labels=dict(binding.labels) if binding.labels is not None else base.labels,
    )


def claims_of(assigned: Assigned, profile: str, status: NodeStatus | ReportedIdentity | None) -> dict[str, Any]:
    """What a node's last report says about itself where it differs from what the control plane holds: its tier
    and labels (never used), and a profile the operator has not accepted yet. Empty when they agree; a node that
    names no labels (its agent started without --label) claims none."""
    if status is None:
        return {}
    claims: dict[str, Any] = {}
    if status.tier != assigned.tier:
        claims["tier"] = status.tier
    if status.labels and status.labels != assigned.labels:
        claims["labels"] = dict(status.labels)
    if status.profile != profile:
        claims["profile"] = status.profile
    return claims


@dataclass(frozen=True)
class DesiredDocument:
    """A node's desired state with what serving it needs: its ETag, its JSON body and the blobs it names."""

    state: DesiredState
    etag: str
    body: bytes
    blobs: frozenset[str]
    revoked: bool = False

    @classmethod
    def of(cls, state: DesiredState, revoked: bool = False) -> DesiredDocument:
        """Serialise `state` once, so that every poll of it is answered from memory. The body is the canonical
        JSON that the ETag digests (`DesiredState.etag`), encoded once for both: a deploy builds a document for
        every node of the fleet at once."""
        body = canonical_json(state.to_json())
        return cls(state, f'"sha256:{hashlib.sha256(body).hexdigest()}"', body, referenced_blobs(state), revoked)


@dataclass(frozen=True)
class DesiredPoll:
    """The answer to a desired-state poll: the document, and whether it differs from what the node has."""

    document: DesiredDocument
    changed: bool


def node_facts(node: Node) -> NodeFacts:
    """What placement policies may know about a stored node."""
    return NodeFacts.of(node.name, node.tier, node.profile, node.labels, node.attestation or "")


@dataclass(frozen=True)
class ReportedIdentity:
    """What a stored report says the node is: all `claims_of` reads of it."""

    tier: str
    labels: dict[str, str]
    profile: str


def _reported_identity(status: Mapping[str, Any]) -> ReportedIdentity | None:
    """The identity fields of a stored report, read from its JSON without parsing the whole `NodeStatus`: listing
    a 10,000-node fleet spent most of its time there. A stored report was validated when it was received; one
    whose fields are not of the expected types claims nothing (as an unparseable one does)."""
    tier, labels, profile = status.get("tier"), status.get("labels"), status.get("profile")
    if not (isinstance(tier, str) and isinstance(labels, dict) and isinstance(profile, str)):
        return None
    return ReportedIdentity(tier, labels, profile)


def is_online(last_seen: float | None, now: float, window_s: float) -> bool:
    """A node is online when it was seen within the last `window_s` seconds."""
    return last_seen is not None and now - last_seen <= window_s


def node_view(
    node: Node, last_seen: float | None, desired_etag: str, online: bool, pins: dict[str, str] | None = None
) -> NodeView:
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
        pins=dict(pins or {}),
        attestation=node.attestation,
        attestation_detail=node.attestation_detail,
        supply=status.get("supply"),
        tpm_ek=node.tpm_ek,
        tpm_pcrs=node.tpm_pcrs,
        claims=claims_of(Assigned(node.tier, dict(node.labels)), node.profile, _reported_identity(status)),
        slots=[_slot(m) for m in status.get("models", [])],
        enrolled_at=node.enrolled_at,
    )


def _slot(model: Mapping[str, Any]) -> dict[str, Any]:
    """What a node's report says of one model's slots: the active package and the previous one it can go back to."""
    return {
        "model": model["name"],
        "active": {"version": model["version"], "variant": model["variant"], "digest": model["digest"]},
        "activated_at": model.get("activated_at"),
        "previous": (
            {"version": model.get("previous_version"), "digest": model.get("previous_digest")}
            if model.get("previous_digest") or model.get("previous_version")
            else None
        ),
        "probation": model.get("probation"),
    }


def check_node_name(name: str) -> None:
    """A node's name: `check_name`'s shape, and not that of a node id (32 hex digits). Nodes are looked up by id
    or name; a node named as another's id mixed itself into that node's events and history.

    Raises:
        ProtocolError: it is malformed or looks like a node id.
    """
    try:
        check_name("node name", name)
    except PackageError as exc:
        raise ProtocolError(str(exc)) from None
    if _NODE_ID.fullmatch(name):
        raise ProtocolError(f"node name {name!r} looks like a node id (32 hex digits); choose another")


def check_enroll_request(request: EnrollRequest) -> None:
    """Validate what a machine asks to enroll as.

    Raises:
        ProtocolError: the name or labels are malformed (or the name looks like a node id), or the tier is unknown.
        ProfileError: the hardware profile is unknown.
    """
    check_node_name(request.name)
    if request.tier not in TIERS:
        raise ProtocolError(f"tier {request.tier!r} is not one of {list(TIERS)}")
    parse_labels(request.labels)
    get_profile(request.profile)


def live_node(session: Session, node_id: str) -> Node:
    """The node `node_id`, enrolled and not revoked.

    Raises:
        NotFound: no such node, or it is revoked.
    """
    node = session.get(Node, node_id)
    if node is None or node.revoked_at is not None:
        raise NotFound(f"no node {node_id!r}")
    return node


T = TypeVar("T")


class _PerGeneration(Generic[T]):
    """A value read at most once per generation of the change feed: a change that could alter it bumps the
    generation, so a value read under an older one is read again. Writes are atomic (one tuple)."""

    def __init__(self, empty: T) -> None:
        self._held: tuple[int, T] = (-1, empty)

    @property
    def generation(self) -> int:
        return self._held[0]

    def get(self, generation: int, read: Callable[[], T]) -> T:
        """The value of `generation`, read with `read` unless held already (`read`'s errors pass through)."""
        held_generation, value = self._held
        if held_generation != generation:
            value = read()
            self._held = (generation, value)
        return value


class FleetService:
    """Nodes and what they should run; see the module docstring for the caching contract."""

    def __init__(
        self,
        db: Database,
        feed: ChangeFeed,
        presence: PresenceTracker,
        authenticator: Authenticator,
        clock: Callable[[], float],
        online_window_s: float,
        pki: Pki,
        on_status: Callable[[], None] | None = None,
        cert_hours: float = 24.0,
    ) -> None:
        """`on_status` is called after a changed status report is stored (the rollout driver's nudge)."""
        self._db = db
        self._pki = pki
        self._cert_hours = cert_hours
        self._on_status = on_status
        self._feed = feed
        self._presence = presence
        self._authenticator = authenticator
        self._clock = clock
        self._online_window_s = online_window_s
        self._lock = threading.Lock()
        self._records = RecordBudget()  # what each node's reports may add to the history and the feed
        self._deployments: tuple[int, tuple[ActiveDeployment, ...]] = (-1, ())
        self._revoked = _PerGeneration[frozenset[str]](frozenset())
        self._log_requests = _PerGeneration[dict[str, LogRequest]]({})
        self._desired: dict[str, tuple[int, DesiredDocument]] = {}
        self._misses: tuple[int, int] = (-1, 0)
        self._fleet_facts: tuple[int, dict[str, tuple[NodeFacts, bool]]] = (-1, {})

    # --- enrollment -----------------------------------------------------------------------------------------

    def issue_enrollment_token(self, ttl_s: float, binding: TokenBinding | None = None) -> IssuedToken:
        """A one-time token that lets one machine enroll within `ttl_s` seconds (1 s to 7 days), bound to what
        `binding` names (its tier and labels are then the operator's, whatever the machine asks for).

        Raises:
            ProtocolError: `ttl_s` is out of range, or the binding's name, tier or labels are malformed.
            StoreError: the database failed.
        """
        if not 1 <= ttl_s <= MAX_ENROLLMENT_TTL_S:
            raise ProtocolError(f"ttl_seconds must be between 1 and {MAX_ENROLLMENT_TTL_S}")
        binding = binding or TokenBinding()
        if binding.name is not None:
            check_node_name(binding.name)
        if binding.tier is not None and binding.tier not in TIERS:
            raise ProtocolError(f"tier {binding.tier!r} is not one of {list(TIERS)}")
        labels = parse_labels(dict(binding.labels)) if binding.labels is not None else None
        # The token carries the fleet CA's hash, so the node can check the control plane before trusting it.
        token = f"{ENROLLMENT_FORMAT}.{new_secret()}.{self._pki.ca.fingerprint.removeprefix('sha256:')}"
        now = self._clock()
        with self._db.transaction() as session:
            session.add(
                EnrollmentToken(
                    id=new_id(),
                    token_hash=hash_secret(token),
                    created_at=now,
                    expires_at=now + ttl_s,
                    node_name=binding.name,
                    tier=binding.tier,
                    labels=labels,
                    reenroll_node_id=binding.reenroll_node_id,
                )
            )
        return IssuedToken(token=token, expires_at=now + ttl_s)

    def issue_reenrollment_token(self, node: str, ttl_s: float) -> IssuedToken:
        """A one-time token that enrolls the existing node `node` (id or name) again: a replacement machine, or
        a revoked node brought back. It keeps the node's id, tier and labels and replaces its credential.

        Raises:
            NotFound: no node of that id or name (revoked ones included).
            ProtocolError: `ttl_s` is out of range.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            found = session.scalar(select(Node).where((Node.id == node) | (Node.name == node)))
            if found is None:
                raise NotFound(f"no node {node!r}")
            binding = TokenBinding(name=found.name, reenroll_node_id=found.id)
        return self.issue_enrollment_token(ttl_s, binding)

    def enroll(self, request: EnrollRequest) -> EnrollResponse:
        """Spend an enrollment token on a node: a new one, or (with a re-enrollment token for it) an existing one.

        The token is checked and claimed before anything else happens (no certificate is signed for a bad one),
        in the same transaction that writes the node, so a token enrolls at most once even when two machines race
        with it. What the token binds decides the node's name, tier and labels (`enrollment_identity`).
        Re-enrolling keeps the node id, tier and labels, invalidates the old credential, and lifts a revocation
        (the operator asked for it with `strata nodes reenroll`). It also forgets what was known of the old
        machine: its attestation verdict and the TPM it was bound to (the new machine registers its own).

        Raises:
            AuthError: the token is unknown, used or expired.
            Forbidden: the token does not allow this enrollment (see `enrollment_identity`).
            ProtocolError, ProfileError: as `check_enroll_request`.
            Conflict: the name is enrolled and the request does not say `replace`; or another enrollment of the
                same new name committed first. The token is not spent.
            StoreError: the database failed.
        """
        check_enroll_request(request)
        if not request.csr:
            raise ProtocolError("enrollment needs a certificate request (csr) over a key the node made")
        now = self._clock()
        replaced: str | None = None
        with self._db.transaction() as session:
            token = session.scalar(
                select(EnrollmentToken).where(
                    EnrollmentToken.token_hash == hash_secret(request.token),
                    EnrollmentToken.used_at.is_(None),
                    EnrollmentToken.expires_at > now,
                )
            )
            if token is None:
                raise AuthError(INVALID_ENROLLMENT)
            claimed = session.connection().execute(
                update(EnrollmentToken)
                .where(EnrollmentToken.id == token.id, EnrollmentToken.used_at.is_(None))
                .values(used_at=now)
            )
            if claimed.rowcount != 1:
                raise AuthError(INVALID_ENROLLMENT)
            binding = TokenBinding(token.node_name, token.tier, token.labels, token.reenroll_node_id)
            node = session.scalar(select(Node).where(Node.name == request.name))
            existing = Assigned(node.tier, dict(node.labels)) if node is not None else None
            assigned = enrollment_identity(binding, request, node.id if node is not None else None, existing)
            node_id = node.id if node is not None else new_id()
            issued = self._pki.sign_node(request.csr, node_id, self._cert_hours)
            if node is None:
                node = Node(id=node_id, name=request.name, enrolled_at=now)
                session.add(node)
            else:  # the old credential is replaced: peers refuse its certificates from now on
                revoke_issued(session, node_id, node.credential_hash, now + self._cert_hours * 3600, now)
                replaced = node.name
            node.credential_hash = certificate_hash(ssl.PEM_cert_to_DER_cert(issued.pem.decode()))
            node.tier = assigned.tier
            node.labels = assigned.labels
            if existing is None:  # a new node starts from the profile it detected
                node.profile = request.profile
            # Enrolled again, it keeps the profile the operator assigned or accepted: placement policies may key on
            # it, and what the machine detects now is a claim (its reports show it) until `strata nodes accept`.
            node.emulated = request.emulated
            node.agent_version = request.agent_version
            node.facts = dict(request.facts)
            node.enrolled_at = now
            node.revoked_at = None
            node.status = None  # the old machine's report (and its claims) no longer describe this one
            node.attestation = node.attestation_detail = node.attested_at = None
            node.tpm_ak = node.tpm_ek = node.tpm_pcrs = None
            session.flush()
            record_issued(
                session, node_id, node.credential_hash, issued.not_after, now, issued.pem.decode(), issued.issued_at
            )
            token.node_id = node.id
            again = "enrolled again (a new credential; the old one is refused)" if existing is not None else "enrolled"
            what = f"{again}: tier {node.tier}, profile {node.profile}" + (
                f", agent {node.agent_version}" if node.agent_version else ""
            )
            record_event(session, now, NewEvent("enrolled", what, node_id=node_id))
        self._authenticator.forget_node(node_id)
        self._feed.bump()
        if replaced is not None:
            log.warning(
                "node %s (%s) re-keyed by a new enrollment (--replace): its previous credential is revoked",
                replaced,
                node_id,
            )
        return EnrollResponse(
            node_id=node_id,
            certificate=issued.pem.decode(),
            ca=self._pki.ca.cert_pem.decode(),
            not_after=issued.not_after,
            issued_at=issued.issued_at,
        )

    def renew_certificate(self, node_id: str, csr: str, presented: bytes) -> CertificateRenewal:
        """A new certificate for a live node, asked over mutual TLS with `presented` (the DER of the certificate
        the caller showed), which must still be the node's current one; from now on only the new certificate is
        accepted by the control plane, on every replica (the fleet's change counter moves). Peers still accept the
        previous one until it expires (it may carry connections), unless the node is revoked: `revoke` covers every
        certificate recorded here.

        A node holds at most MAX_LIVE_CERTIFICATES valid ones: each is listed in every node's desired state once the
        node is revoked.

        Raises:
            AuthError: the CSR is unusable, or `presented` is no longer the node's current certificate (renewed or
                replaced since: a replica that had not heard yet let it through, or two renewals raced).
            Conflict: the node holds MAX_LIVE_CERTIFICATES valid certificates already.
            NotFound: no such node, or it was revoked.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            found = session.get(Node, node_id)
            if found is not None and found.revoked_at is not None:  # the node's agent says "revoked?" to a 401
                raise AuthError(f"node {found.name!r} is revoked: enroll it again with a new token")
            node = live_node(session, node_id)
            if not csr_over_key_of(csr, presented):
                # the agent keeps its key across renewals, and the one renewal replaced is answered again only over
                # the same key (`_answer_again`): one onto another key could lock the node out of that
                raise AuthError("a node renews over the key it holds; this request is for another key")
            presented_hash = certificate_hash(presented)
            now = self._clock()
            if presented_hash != node.credential_hash:
                again = self._answer_again(session, node, presented, presented_hash, now)
                if again is None:
                    raise AuthError(NOT_CURRENT)
                log.warning(
                    "node %s renewed again with the certificate its last renewal replaced (that answer was lost on "
                    "the way): given the certificate issued then",
                    node.name,
                )
                return again
            # a stolen certificate the node has renewed since must not buy the thief a new one: the row is claimed
            # only while `presented` is still its credential (a write, so two renewals racing on one or two
            # replicas, SQLite or PostgreSQL, see each other: the second finds the credential changed)
            claimed = session.connection().execute(
                update(Node)
                .where(Node.id == node_id, Node.credential_hash == presented_hash, Node.revoked_at.is_(None))
                .values(credential_hash=presented_hash)
            )
            if claimed.rowcount != 1:
                raise AuthError(NOT_CURRENT)
            live, first_expiry = live_certificates(session, node_id, now)
            if live >= MAX_LIVE_CERTIFICATES and first_expiry is not None:
                minutes = max(1, round((first_expiry - now) / 60))
                raise Conflict(
                    f"node {node.name!r} holds {live} certificates that are still valid (at most "
                    f"{MAX_LIVE_CERTIFICATES}): renew again when the first expires, in about {minutes} min"
                )
            issued = self._pki.sign_node(csr, node_id, self._cert_hours)
            node.credential_hash = certificate_hash(ssl.PEM_cert_to_DER_cert(issued.pem.decode()))
            record_issued(
                session, node_id, node.credential_hash, issued.not_after, now, issued.pem.decode(), issued.issued_at
            )
        self._authenticator.forget_node(node_id)
        self._feed.bump()  # the other replicas drop the previous certificate from their caches
        return CertificateRenewal(issued.pem.decode(), issued.not_after, issued.issued_at)

    @staticmethod
    def _answer_again(
        session: Session, node: Node, presented: bytes, presented_hash: str, now: float
    ) -> CertificateRenewal | None:
        """The answer of the node's last renewal, for a node that asks again with the certificate that renewal
        replaced (the answer was lost on the way: without it, the node would hold only a certificate no longer
        accepted, and need enrolling again), or None when `presented` is not such a certificate.

        `presented` must be a certificate issued to this node, neither revoked nor expired, over the same key as
        the current one: the node keeps its key across renewals, so whoever can ask this holds the node's key, to
        which the current certificate is no secret. No certificate is issued and none is replaced: a thief holding
        an old certificate and the key cannot lock the node out by renewing; a stolen key is answered by revoking
        the node.
        """
        previous = session.get(NodeCertificate, presented_hash)
        current = session.get(NodeCertificate, node.credential_hash)
        if previous is None or previous.node_id != node.id or previous.revoked_at is not None:
            return None
        if previous.not_after <= now or current is None or current.pem is None or current.issued_at is None:
            return None
        if current.revoked_at is not None or not same_key(presented, current.pem.encode()):
            return None
        return CertificateRenewal(current.pem, current.not_after, current.issued_at)

    def enrollment_token_valid(self, token: str) -> bool:
        """Whether a token could enroll now (unused, unexpired), without spending it."""
        now = self._clock()
        with self._db.transaction() as session:
            found = session.scalar(
                select(EnrollmentToken.id).where(
                    EnrollmentToken.token_hash == hash_secret(token),
                    EnrollmentToken.used_at.is_(None),
                    EnrollmentToken.expires_at > now,
                )
            )
        return found is not None

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
            node = live_node(session, node_id)
            deployments = self._active_deployments(session, generation)
            expires = session.scalar(
                select(NodeCertificate.not_after).where(NodeCertificate.sha256 == node.credential_hash)
            )
        return replace(self._view(node, generation, deployments, now), certificate_expires_at=expires)

    def revoke(self, node_id: str) -> None:
        """Revoke a node: its credential stops working at once and no deployment targets it any more; the
        re-enrollment tokens issued for it before now expire; the TPM it was bound to is free for another node. Its
        certificates still valid join the revocation list every node's desired state carries, so its peers refuse
        them on their tier ports too.

        Raises:
            NotFound: no such node, or it was revoked already.
            StoreError: the database failed.
        """
        now = self._clock()
        with self._db.transaction() as session:
            node = live_node(session, node_id)
            node.revoked_at = now
            # a re-enrollment token issued before the revocation (leaked with the machine, say) must not undo it:
            # bringing the node back takes one issued after (`strata nodes reenroll`)
            session.execute(
                update(EnrollmentToken)
                .where(EnrollmentToken.reenroll_node_id == node_id, EnrollmentToken.used_at.is_(None))
                .values(expires_at=now)
            )
            revoke_issued(session, node_id, node.credential_hash, now + self._cert_hours * 3600, now)
            node.tpm_ak = node.tpm_ek = None  # its TPM may serve the machine when it is enrolled again
            record_event(session, now, NewEvent("revoked", "revoked by the operator", node_id=node_id))
        self._authenticator.forget_node(node_id)
        self._presence.forget(node_id)
        self._feed.bump()

    # --- observed state ----------------------------------------------------------------------------------

    def report_status(self, node_id: str, status: NodeStatus) -> bool:
        """Store what a node reports, only when it differs from what is stored; return whether it was written.

        A report is the node's word: what it runs, its failures and where it serves are recorded as reported; its
        tier, labels and hardware profile are claims, kept with the report and shown apart, never adopted (the
        operator assigns tier and labels: the enrollment token, `strata nodes label`; and accepts a new profile:
        `strata nodes accept`). Placement policies may key on the profile, and a profile adopted by itself would be
        trusted by every deployment made after it. The node still picks, among the variants it is given, the one
        its own hardware runs best. A change of the versions it runs is recorded in the model's history.
        What its reports add to the history and the feed is budgeted per node (`quota.RecordBudget`): past it, the
        report is stored and the changes beyond the budget are not recorded.

        Raises:
            ProfileError: the status names an unknown hardware profile.
            NotFound: no such node, or it was revoked.
            StoreError: the database failed.
        """
        get_profile(status.profile)
        document = canonical_json(status.to_json()).decode()
        for _ in range(_STATUS_ATTEMPTS):
            with self._db.transaction() as session:
                # An unchanged report (most of them) costs one two-column read, not an ORM load of the whole node.
                stored = session.execute(select(Node.status, Node.revoked_at).where(Node.id == node_id)).first()
                if stored is not None and stored.revoked_at is None and stored.status == document:
                    return False
                node = live_node(session, node_id)
                if node.status == document:
                    return False
                now = self._clock()
                # Written only over the report it was compared with: the same report sent twice at once (a retry
                # through another replica) is recorded once; a report stored meanwhile is compared with again.
                unchanged = Node.status.is_(None) if node.status is None else Node.status == node.status
                written = session.connection().execute(
                    update(Node)
                    .where(Node.id == node_id, Node.revoked_at.is_(None), unchanged)
                    .values(
                        status=document,
                        status_at=now,
                        emulated=status.emulated,
                        agent_version=status.agent_version,
                        reported_etag=status.desired_etag,
                        serve_url=status.serve_url,
                    )
                )
                if written.rowcount != 1:
                    continue
                previous = stored_status(node.status)
                changes = activation_events(previous, status)
                failures = failure_events(node_id, previous, status)
                wanted = len(changes) + len(failures)
                granted = self._records.take(node_id, wanted, now)
                if granted < wanted:
                    if granted:  # the moment its budget runs out, not every report after
                        log.warning(
                            "node %s reports changes faster than they are recorded: some are dropped", node.name
                        )
                    changes, failures = changes[:granted], failures[: max(0, granted - len(changes))]
                session.add_all(record_changes(node_id, changes, now))
                for event in change_events(node_id, changes) + failures:
                    record_event(session, now, event)
            if self._on_status is not None:
                self._on_status()
            return True
        raise Conflict(f"node {node_id}'s status changed under {_STATUS_ATTEMPTS} reports in a row; report again")

    def assign(
        self,
        node_id: str,
        labels: Mapping[str, str | None] | None = None,
        tier: str | None = None,
        accept_profile: bool = False,
    ) -> NodeView:
        """The operator's changes to a node's identity: set (a value) or remove (None) labels, change its tier, or
        accept the profile its last report claims. The node's desired state follows at once.

        Raises:
            NotFound: no such node, or it was revoked.
            ProtocolError: a malformed label or an unknown tier, or nothing to accept.
            StoreError: the database failed.
        """
        if tier is not None and tier not in TIERS:
            raise ProtocolError(f"tier {tier!r} is not one of {list(TIERS)}")
        with self._db.transaction() as session:
            # two operators labelling one node at once (on one replica or two) must both count: the second reads
            # the first's labels, not the ones before them
            serialize(session, f"node:{node_id}")
            node = live_node(session, node_id)
            if labels:
                merged = dict(node.labels)
                for key, value in labels.items():
                    if value is None:
                        merged.pop(key, None)
                    else:
                        merged[key] = value
                node.labels = parse_labels(merged)
            if tier is not None:
                node.tier = tier
            if accept_profile:
                status = stored_status(node.status)
                if status is None:
                    raise ProtocolError(f"node {node.name!r} has not reported a profile to accept")
                node.profile = status.profile
        self._feed.bump()
        return self.get_node(node_id)

    # --- desired state -----------------------------------------------------------------------------------

    def desired(self, node_id: str) -> DesiredDocument:
        """The node's current desired state (a revoked node's is empty); from memory while the fleet is unchanged.

        Raises:
            NotFound: no such node.
            StoreError: the database failed.
        """
        generation = self._feed.generation
        cached = self._cached_desired(node_id, generation) or self._desired_from_memory(node_id, generation)
        if cached is not None:
            return cached
        with self._lock:
            seen, misses = self._misses
            self._misses = (generation, misses + 1 if seen == generation else 1)
            read_fleet = self._misses[1] == FLEET_READ_AFTER_MISSES
        if read_fleet:
            self._read_fleet_facts(generation)
            cached = self._desired_from_memory(node_id, generation)
            if cached is not None:
                return cached
        with self._db.transaction() as session:
            row = session.execute(
                select(Node.labels, Node.revoked_at, Node.name, Node.tier, Node.profile, Node.attestation).where(
                    Node.id == node_id
                )
            ).first()
            if row is None:
                raise NotFound(f"no node {node_id!r}")
            deployments = self._active_deployments(session, generation)
        facts = NodeFacts.of(row.name, row.tier, row.profile, row.labels, row.attestation or "")
        return self._document(node_id, facts, row.revoked_at is not None, generation, deployments)

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
            document = self._cached_desired(node_id, generation) or self._desired_from_memory(node_id, generation)
            if document is None:
                document = await anyio.to_thread.run_sync(self.desired, node_id)
            if not etag_matches(if_none_match, document.etag):
                return DesiredPoll(document, changed=True)
            remaining = deadline - loop.time()
            if remaining <= 0 or self._feed.closed:
                return DesiredPoll(document, changed=False)
            await self._feed.wait_beyond(generation, remaining)

    # --- internals --------------------------------------------------------------------------------------

    def _cached_desired(self, node_id: str, generation: int) -> DesiredDocument | None:
        cached = self._desired.get(node_id)
        return cached[1] if cached is not None and cached[0] == generation else None

    def _desired_from_memory(self, node_id: str, generation: int) -> DesiredDocument | None:
        """The node's desired state computed from the facts read for the whole fleet in `generation`, or None when
        they were not (or the node was not among them). No I/O: a long poll calls it on the event loop."""
        facts_generation, facts = self._fleet_facts
        deployments_generation, deployments = self._deployments
        known = facts.get(node_id)
        if known is None or generation != facts_generation or generation != deployments_generation:
            return None
        if generation != self._revoked.generation or generation != self._log_requests.generation:
            return None
        return self._document(node_id, known[0], known[1], generation, deployments)

    def _read_fleet_facts(self, generation: int) -> None:
        """Read every node's facts (and the active deployments) in one transaction, for `generation`.

        Raises:
            StoreError: the database failed.
        """
        # As in `_active_deployments`: `generation` was read before the query, so at worst newer facts are cached
        # under an older generation, which a later bump replaces.
        with self._db.transaction() as session:
            rows = session.execute(
                select(Node.id, Node.labels, Node.revoked_at, Node.name, Node.tier, Node.profile, Node.attestation)
            ).all()
            self._active_deployments(session, generation)
        self._revoked_certificates(generation)
        self._open_log_requests(generation)
        facts = {
            row.id: (
                NodeFacts.of(row.name, row.tier, row.profile, row.labels, row.attestation or ""),
                row.revoked_at is not None,
            )
            for row in rows
        }
        with self._lock:
            self._fleet_facts = (generation, facts)

    def _document(
        self,
        node_id: str,
        facts: NodeFacts,
        revoked: bool,
        generation: int,
        deployments: tuple[ActiveDeployment, ...],
    ) -> DesiredDocument:
        cached = self._cached_desired(node_id, generation)
        if cached is not None:
            return cached
        state = desired_state(node_id, facts.label_map, revoked, deployments, facts)
        state = dataclasses.replace(
            state,
            revoked_certificates=self._revoked_certificates(generation),
            log_request=None if revoked else self._open_log_requests(generation).get(node_id),
        )
        document = DesiredDocument.of(state, revoked)
        with self._lock:
            self._desired[node_id] = (generation, document)
        return document

    def active_deployments(self, session: Session) -> tuple[ActiveDeployment, ...]:
        """Every entry of the desired-state rule (`load_active_deployments`), read with `session` once per fleet
        generation."""
        return self._active_deployments(session, self._feed.generation)

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

    def _revoked_certificates(self, generation: int) -> frozenset[str]:
        """The fleet's revoked certificates still valid, read once per generation (a revocation bumps it; one
        that expires meanwhile stays listed until the next change, harmlessly: the handshake refuses it).

        Raises:
            StoreError: the database failed.
        """
        return self._revoked.get(generation, lambda: self._read(lambda s: revoked_certificates(s, self._clock())))

    def _open_log_requests(self, generation: int) -> dict[str, LogRequest]:
        """Each node's open log request (`nodelogs`), read once per generation (asking and answering bump it).

        Raises:
            StoreError: the database failed.
        """
        return self._log_requests.get(generation, lambda: self._read(open_log_requests))

    def _read(self, query: Callable[[Session], T]) -> T:
        """`query` in a transaction of its own.

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            return query(session)

    def _view(self, node: Node, generation: int, deployments: tuple[ActiveDeployment, ...], now: float) -> NodeView:
        facts = node_facts(node)
        document = self._document(node.id, facts, node.revoked_at is not None, generation, deployments)
        in_memory = self._presence.last_seen(node.id)
        last_seen = max((t for t in (node.last_seen, in_memory) if t is not None), default=None)
        decided, _ = decide(node.id, node.labels, deployments, facts)
        pins = {model: d.deployment.version for model, d in decided.items() if d.deployment.kind == "pin"}
        return node_view(node, last_seen, document.etag, is_online(last_seen, now, self._online_window_s), pins)
