"""Who is calling and what they may do.

Operators use bearer tokens from `secrets.token_urlsafe(32)`, scoped admin or read-only; nodes present their
fleet certificate over mutual TLS (the control plane authorizes by the node id it names, and accepts only the
node's current certificate). The database keeps only sha256 hashes of tokens and certificates. `authorize` and
`authorize_blob` are the decisions, pure functions of the principal and the target; `Authenticator` is the I/O
around them: it resolves a token or certificate to a principal (cached, with invalidation when a node is revoked,
re-enrolled or renewed, or a token revoked), records node presence and when each token was last used, writes the
first admin token, and lists and revokes operator tokens.

A token revoked (or a node revoked, re-enrolled or renewed) through one replica is refused by it at once, and by
every other replica as soon as it sees the fleet change counter move (`feed.SharedGeneration`: within a second by
NOTIFY on PostgreSQL, at most about `safety_poll_s` plus a second when a notification is lost; within `poll_s` on
SQLite): whenever another replica changed anything, each replica drops the operator tokens it cached (they are
few: a handful of indexed reads again) and the node certificates it cached that are no longer current (`recheck`:
one read per thousand cached, not one per node).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import threading
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from strata.control.db import TOKEN_NAME_LEN, ApiToken, Database, Node
from strata.control.errors import StoreError
from strata.control.feed import ChangeFeed
from strata.control.lease import serialize
from strata.control.presence import PresenceTracker
from strata.core.errors import AuthError, ConfigError, Conflict, Forbidden, NotFound
from strata.core.fsutil import write_bytes_atomic
from strata.core.words import HIDDEN_CATEGORIES

log = logging.getLogger(__name__)

# A node certificate that authenticates nothing (any more)
NOT_CURRENT = "this certificate is not the current one of a live node (revoked, renewed or replaced)"

ADMIN_SCOPE = "admin"
READ_SCOPE = "read"
SCOPES = (ADMIN_SCOPE, READ_SCOPE)
_TOKENS = "api-tokens"  # the job name revocations serialize on (`lease.serialize`)
_RECHECK_BATCH = 1000  # cached node certificates checked per read after another replica's change


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
    """The caller: an operator (`node_id` None, with a scope, and the id of its token when it used one) or one
    node."""

    node_id: str | None = None
    scope: str = ADMIN_SCOPE
    token_id: str | None = None

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


def check_token_name(name: str | None) -> str | None:
    """An operator token's name as stored: free text of 1 to TOKEN_NAME_LEN characters, no control characters and
    no invisible ones (it is printed in terminals and tables, and `strata token revoke` takes it: a right-to-left
    override or a zero-width space would make one name read as another), surrounding spaces removed; None for no
    name.

    Raises:
        ConfigError: the name is empty, too long, or holds a control character.
    """
    if name is None:
        return None
    name = name.strip()
    if not name or len(name) > TOKEN_NAME_LEN:
        raise ConfigError(f"a token name has 1 to {TOKEN_NAME_LEN} characters")
    if any(unicodedata.category(c) in HIDDEN_CATEGORIES for c in name):
        raise ConfigError(
            "a token name may not hold control characters, nor invisible ones that reorder or hide text (bidi"
            " overrides, zero-width characters, line separators)"
        )
    return name


@dataclass(frozen=True)
class TokenView:
    """An operator token as listed: never its secret or the secret's hash."""

    id: str
    name: str | None
    scope: str
    created_at: float
    last_used_at: float | None


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
    """Resolves bearer secrets to principals, caching hits; records presence of the nodes that call and the use of
    operator tokens; issues, lists and revokes operator tokens."""

    def __init__(
        self,
        db: Database,
        presence: PresenceTracker,
        clock: Callable[[], float],
        feed: ChangeFeed | None = None,
        token_use: PresenceTracker | None = None,
    ) -> None:
        self._db = db
        self._presence = presence
        self._clock = clock
        self._feed = feed  # bumped after a revocation: the other replicas hear of it (`SharedGeneration`)
        self.token_use = token_use or PresenceTracker(ApiToken.id, ApiToken.last_used_at)
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
        principal = self._by_hash.get(hash_secret(secret))
        return self._seen(principal) if principal is not None else None

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
        elif principal.token_id is not None:
            self.token_use.touch(principal.token_id, self._clock())
        return principal

    def _lookup_token(self, token_hash: str) -> Principal:
        # The index lookup is by the sha256 of the secret, never the secret: its timing tells an attacker nothing
        # they could steer, so no constant-time comparison is needed here.
        epoch = self._epoch
        with self._db.transaction() as session:
            found = session.execute(
                select(ApiToken.id, ApiToken.scope).where(
                    ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None)
                )
            ).first()
        if found is None or found.scope not in SCOPES:
            raise AuthError("unknown or revoked token")
        principal = Principal(scope=found.scope, token_id=found.id)
        self._cache(token_hash, principal, epoch)
        return self._seen(principal)

    def _lookup_certificate(self, key: str) -> Principal:
        epoch = self._epoch
        with self._db.transaction() as session:
            node_id = session.scalar(
                select(Node.id).where(Node.credential_hash == key.removeprefix("cert:"), Node.revoked_at.is_(None))
            )
        if node_id is None:
            raise AuthError(NOT_CURRENT)
        principal = Principal(node_id=node_id)
        self._cache(key, principal, epoch)
        return principal

    def _cache(self, key: str, principal: Principal, epoch: int) -> None:
        with self._lock:
            if epoch == self._epoch:
                self._by_hash[key] = principal

    def issue_token(self, scope: str, name: str | None = None) -> tuple[TokenView, str]:
        """A new operator token of `scope` (admin or read), optionally named: how it is listed, and its secret.
        Only the secret's hash is stored.

        Raises:
            ConfigError: an unknown scope, or a name `check_token_name` refuses.
            StoreError: the database failed.
        """
        if scope not in SCOPES:
            raise ConfigError(f"token scope must be one of {list(SCOPES)}")
        name = check_token_name(name)
        view, secret = TokenView(new_id(), name, scope, self._clock(), None), new_secret()
        with self._db.transaction() as session:
            session.add(
                ApiToken(id=view.id, scope=scope, token_hash=hash_secret(secret), created_at=view.created_at, name=name)
            )
        return view, secret

    def list_tokens(self) -> list[TokenView]:
        """Every operator token not revoked, oldest first; `last_used_at` as stored (every replica writes its
        uses every presence flush) or as this replica saw it since, whichever is later.

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            rows = session.scalars(
                select(ApiToken).where(ApiToken.revoked_at.is_(None)).order_by(ApiToken.created_at, ApiToken.id)
            ).all()
            tokens = [(row.id, row.name, row.scope, row.created_at, row.last_used_at) for row in rows]
        views = []
        for token_id, name, scope, created_at, stored_use in tokens:
            uses = [t for t in (stored_use, self.token_use.last_seen(token_id)) if t is not None]
            views.append(TokenView(token_id, name, scope, created_at, max(uses) if uses else None))
        return views

    def revoke_token(self, token_id: str) -> None:
        """Revoke an operator token: refused from now on by this replica, by the others within the change feed's
        bound (see the module docstring). The row stays, marked revoked. The last admin token is not revoked.

        Raises:
            NotFound: no such token, or it was revoked already.
            Conflict: it is the last admin token not revoked.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            serialize(session, _TOKENS)  # two replicas revoking the last two admin tokens at once: one wins
            token = session.get(ApiToken, token_id)
            if token is None or token.revoked_at is not None:
                raise NotFound(f"there is no operator token {token_id!r} (or it was revoked already)")
            if token.scope == ADMIN_SCOPE:
                admins = session.scalar(
                    select(func.count()).where(ApiToken.scope == ADMIN_SCOPE, ApiToken.revoked_at.is_(None))
                )
                if (admins or 0) <= 1:
                    raise Conflict(
                        "this is the last admin token: revoking it would leave no one able to administer the fleet; "
                        "issue another first (strata token api --scope admin), then revoke this one"
                    )
            token.revoked_at = self._clock()
        self.forget_tokens()
        self.token_use.forget(token_id)
        if self._feed is not None:
            self._feed.bump()

    def forget_tokens(self) -> None:
        """Drop every cached operator token: each is looked up again at its next use (a token was revoked)."""
        self._drop(lambda _key, principal: principal.node_id is None)

    def _drop(self, dropped: Callable[[str, Principal], bool]) -> None:
        """Drop the cached credentials `dropped` picks (by cache key and principal), and move the epoch: a lookup in
        flight from before does not cache what it read."""
        with self._lock:
            self._epoch += 1
            self._by_hash = {key: p for key, p in self._by_hash.items() if not dropped(key, p)}

    def recheck(self) -> None:
        """After another replica's change (it may have revoked a token, or revoked, re-enrolled or renewed a node):
        drop every cached operator token, and every cached node certificate that is no longer the current one of a
        live node, read in batches of `_RECHECK_BATCH` (a fleet's certificates are not looked up one by one again).
        When that read fails, every cached certificate is dropped instead.
        """
        self.forget_tokens()  # the epoch moved: a lookup in flight from before does not cache what it read
        with self._lock:  # `_cache` adds to the dict from request threads
            cached = [key for key, principal in self._by_hash.items() if principal.node_id is not None]
        current: set[str] = set()
        try:
            for start in range(0, len(cached), _RECHECK_BATCH):
                hashes = [key.removeprefix("cert:") for key in cached[start : start + _RECHECK_BATCH]]
                with self._db.transaction() as session:
                    current.update(
                        session.scalars(
                            select(Node.credential_hash).where(
                                Node.credential_hash.in_(hashes), Node.revoked_at.is_(None)
                            )
                        )
                    )
        except StoreError as exc:
            log.warning("cannot recheck the cached node certificates, dropping them all: %s", exc)
            current = set()
        stale = {key for key in cached if key.removeprefix("cert:") not in current}
        if stale:
            self._drop(lambda key, _principal: key in stale)

    def forget_node(self, node_id: str) -> None:
        """Stop accepting cached credentials of `node_id` (revoked, or re-enrolled with a new credential)."""
        self._drop(lambda _key, principal: principal.node_id == node_id)

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
            # Revoked ones too: a revoked token left in the file is not adopted again (it stays refused).
            stored = session.execute(
                select(ApiToken.token_hash, ApiToken.revoked_at).where(ApiToken.scope == ADMIN_SCOPE)
            ).all()
            match = next((row for row in stored if hmac.compare_digest(row.token_hash, token_hash)), None)
            if match is None:
                if existing is not None:
                    log.warning("adopting the admin token in %s, which this database did not know", path)
                session.add(ApiToken(id=new_id(), scope=ADMIN_SCOPE, token_hash=token_hash, created_at=self._clock()))
            elif match.revoked_at is not None:
                log.warning(
                    "the admin token in %s was revoked (strata token revoke): it is refused; delete the file to have "
                    "a new admin token issued at the next start",
                    path,
                )
        if existing is not None:
            return False
        try:
            write_bytes_atomic(path, (secret + "\n").encode(), mode=0o600)
        except OSError as exc:
            raise ConfigError(f"cannot write the admin token to {path}: {exc}") from exc
        return True
