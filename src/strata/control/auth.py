"""Who is calling and what they may do.

Operators use bearer tokens from `secrets.token_urlsafe(32)`, scoped admin or read-only; nodes present their
fleet certificate over mutual TLS (the control plane authorizes by the node id it names, and accepts only the
node's current certificate). The database keeps only sha256 hashes of tokens and certificates. `authorize` and
`authorize_blob` are the decisions, pure functions of the principal and the target; `Authenticator` is the I/O
around them: it resolves a token or certificate to a principal (cached, with invalidation when a node is revoked,
re-enrolled or renewed), records node presence, and writes the first admin token.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from strata.control.db import ApiToken, Database, Node
from strata.control.presence import PresenceTracker
from strata.core.errors import AuthError, ConfigError, Forbidden
from strata.core.fsutil import write_bytes_atomic

log = logging.getLogger(__name__)

ADMIN_SCOPE = "admin"
READ_SCOPE = "read"
SCOPES = (ADMIN_SCOPE, READ_SCOPE)


def new_secret() -> str:
    """A fresh random credential (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """Hex sha256 of a credential: the only form in which credentials are stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_id() -> str:
    """A fresh opaque identifier (32 hex characters)."""
    return uuid.uuid4().hex


def certificate_hash(der: bytes) -> str:
    """Hex sha256 of a certificate's DER: how a node's current certificate is stored and recognised."""
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The caller: an operator (`node_id` None, with a scope) or one node."""

    node_id: str | None = None
    scope: str = ADMIN_SCOPE

    @property
    def is_admin(self) -> bool:
        return self.node_id is None and self.scope == ADMIN_SCOPE

    @property
    def is_operator(self) -> bool:
        """An operator of either scope (read-only included)."""
        return self.node_id is None


ADMIN = Principal()


class Access(enum.Enum):
    """Who may call an endpoint."""

    ANY = "any valid credential"
    ADMIN = "the operator"
    READ = "an operator, read-only scope included"
    SELF_OR_ADMIN = "the operator or the node itself"
    SELF = "the node itself"


def authorize(principal: Principal, access: Access, node_id: str | None = None) -> None:
    """Decide whether `principal` may act on `node_id`'s records (or on the fleet, when `node_id` is None).

    Raises:
        Forbidden: the principal is known but this is not its business.
    """
    if access is Access.ANY:
        return
    if access is Access.ADMIN:
        if not principal.is_admin:
            raise Forbidden("this needs an admin credential")
        return
    if access is Access.READ:
        if not principal.is_operator:
            raise Forbidden("this needs an operator credential")
        return
    is_self = principal.node_id is not None and principal.node_id == node_id
    if access is Access.SELF and not is_self:
        raise Forbidden("only the node itself may do this")
    if access is Access.SELF_OR_ADMIN and not (is_self or principal.is_operator):
        raise Forbidden("a node may only read its own records")


def authorize_blob(principal: Principal, referenced_by_caller: bool) -> None:
    """An admin reads every blob; a node only those its current desired state references. A read-only token
    reads none: it is for dashboards and scripts, which see the registry's metadata (manifests, hashes, metrics)
    through the model endpoints, never a model's weights.

    Raises:
        Forbidden: a node asked for a blob its desired state does not name, or a read-only token asked at all.
    """
    if principal.is_operator and not principal.is_admin:
        raise Forbidden("a read-only token does not download packages or weights; this needs an admin token")
    if not (principal.is_admin or referenced_by_caller):
        raise Forbidden("this blob is not part of the node's desired state")


class Authenticator:
    """Resolves bearer secrets to principals, caching hits; records presence of the nodes that call."""

    def __init__(self, db: Database, presence: PresenceTracker, clock: Callable[[], float]) -> None:
        self._db = db
        self._presence = presence
        self._clock = clock
        self._lock = threading.Lock()
        self._by_hash: dict[str, Principal] = {}
        # Bumped by every invalidation: a lookup that raced with one does not cache what it read.
        self._epoch = 0

    def authenticate(self, secret: str | None) -> Principal:
        """The operator a bearer token belongs to.

        Raises:
            AuthError: no secret, or one that is unknown or revoked.
            StoreError: the database failed.
        """
        return self.authenticate_cached(secret) or self._lookup_token(hash_secret(secret or ""))

    def authenticate_cached(self, secret: str | None) -> Principal | None:
        """`authenticate` without I/O: the principal when its token is cached, else None (look it up).

        Raises:
            AuthError: no secret at all.
        """
        if not secret:
            raise AuthError(
                "missing credential: operators send 'Authorization: Bearer <token>', nodes their fleet certificate"
            )
        return self._by_hash.get(hash_secret(secret))

    def authenticate_certificate(self, der: bytes) -> Principal:
        """The node whose current fleet certificate this is; its call counts as seeing it now.

        TLS has already checked the chain to the fleet CA and the validity period; this checks that the
        certificate is the node's current one and that the node is not revoked.

        Raises:
            AuthError: not the current certificate of a live node (revoked, renewed, re-enrolled).
            StoreError: the database failed.
        """
        key = "cert:" + certificate_hash(der)
        principal = self._by_hash.get(key) or self._lookup_certificate(key)
        return self._seen(principal)

    def certificate_cached(self, der: bytes) -> Principal | None:
        """`authenticate_certificate` without I/O: the node when its certificate is cached, else None."""
        principal = self._by_hash.get("cert:" + certificate_hash(der))
        return self._seen(principal) if principal is not None else None

    def _seen(self, principal: Principal) -> Principal:
        if principal.node_id is not None:
            self._presence.touch(principal.node_id, self._clock())
        return principal

    def _lookup_token(self, token_hash: str) -> Principal:
        # The index lookup is by the sha256 of the secret, never the secret: its timing tells an attacker nothing
        # they could steer, so no constant-time comparison is needed here.
        epoch = self._epoch
        with self._db.transaction() as session:
            scope = session.scalar(select(ApiToken.scope).where(ApiToken.token_hash == token_hash))
        if scope not in SCOPES:
            raise AuthError("unknown or revoked token")
        principal = Principal(scope=scope)
        self._cache(token_hash, principal, epoch)
        return principal

    def _lookup_certificate(self, key: str) -> Principal:
        epoch = self._epoch
        with self._db.transaction() as session:
            node_id = session.scalar(
                select(Node.id).where(Node.credential_hash == key.removeprefix("cert:"), Node.revoked_at.is_(None))
            )
        if node_id is None:
            raise AuthError("this certificate is not the current one of a live node (revoked, renewed or replaced)")
        principal = Principal(node_id=node_id)
        self._cache(key, principal, epoch)
        return principal

    def _cache(self, key: str, principal: Principal, epoch: int) -> None:
        with self._lock:
            if epoch == self._epoch:
                self._by_hash[key] = principal

    def issue_token(self, scope: str) -> str:
        """A new operator token of `scope` (admin or read); only its hash is stored.

        Raises:
            ConfigError: an unknown scope.
            StoreError: the database failed.
        """
        if scope not in SCOPES:
            raise ConfigError(f"token scope must be one of {list(SCOPES)}")
        secret = new_secret()
        with self._db.transaction() as session:
            session.add(ApiToken(id=new_id(), scope=scope, token_hash=hash_secret(secret), created_at=self._clock()))
        return secret

    def forget_node(self, node_id: str) -> None:
        """Stop accepting cached credentials of `node_id` (revoked, or re-enrolled with a new credential)."""
        with self._lock:
            self._epoch += 1
            self._by_hash = {h: p for h, p in self._by_hash.items() if p.node_id != node_id}

    def ensure_admin_token(self, path: Path) -> bool:
        """Make sure the operator has an admin token in `path`; return True when a new one was written.

        A token file that exists is never overwritten: if its hash is not stored (a fresh database next to an old
        data folder) it is adopted. Otherwise a new token is stored, then written with mode 0600.

        Raises:
            ConfigError: the file exists but holds no token, or cannot be read or written.
            StoreError: the database failed.
        """
        try:
            existing = path.read_text().strip() if path.exists() else None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        if existing is not None and not existing:
            raise ConfigError(f"{path} is empty; delete it to have a new admin token issued")
        secret = existing or new_secret()
        token_hash = hash_secret(secret)
        with self._db.transaction() as session:
            stored = session.scalars(select(ApiToken.token_hash).where(ApiToken.scope == ADMIN_SCOPE)).all()
            if not any(hmac.compare_digest(h, token_hash) for h in stored):
                if existing is not None:
                    log.warning("adopting the admin token in %s, which this database did not know", path)
                session.add(ApiToken(id=new_id(), scope=ADMIN_SCOPE, token_hash=token_hash, created_at=self._clock()))
        if existing is not None:
            return False
        try:
            write_bytes_atomic(path, (secret + "\n").encode(), mode=0o600)
        except OSError as exc:
            raise ConfigError(f"cannot write the admin token to {path}: {exc}") from exc
        return True
