"""The control plane's tables (SQLAlchemy ORM, portable column types) and the engine and transactions around them.

SQLite is the embedded default: WAL journal, foreign keys on, a busy timeout so that writers from the thread pool
queue instead of failing. PostgreSQL (`postgresql://`, through psycopg 3: the `strata[postgres]` extra) is the
production store, with the same models and migrations. No message or log line holds the database password. The
schema itself is created by the Alembic migrations in `strata.control.migrations`, never by `create_all`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, quote_plus

from sqlalchemy import (
    JSON,
    URL,
    BigInteger,
    Boolean,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    false,
    make_url,
    select,
    text,
    tuple_,
)
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from strata.control.errors import StorageFull, StoreError
from strata.core.errors import ConfigError, Conflict, NotFound
from strata.core.telemetry import MAX_DROPPED_KIND, MAX_STATUS, MAX_TENSOR, MAX_TIER
from strata.core.wire import ProtocolError

log = logging.getLogger(__name__)

HEX_LEN = 64  # a hex sha256
NAME_LEN = 128  # core.package.check_name allows 1-128 characters
TIME = Double  # epoch seconds


class Base(DeclarativeBase):
    """Declarative base of every control plane table."""

    # Named constraints, so that later migrations can drop or alter them (SQLite batch mode needs the names).
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


TOKEN_NAME_LEN = 64  # what an operator calls a token ("grafana", "ci-deploy"): a label in listings


class ApiToken(Base):
    """A long-lived operator credential; only the sha256 of the secret is kept. A revoked token keeps its row
    (`revoked_at` set): its hash stays known, so the admin token file cannot bring it back (`ensure_admin_token`)."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(HEX_LEN), unique=True)
    created_at: Mapped[float] = mapped_column(TIME)
    name: Mapped[str | None] = mapped_column(String(TOKEN_NAME_LEN))
    # Written in batches with the nodes' last_seen (`PresenceTracker`), never once per request.
    last_used_at: Mapped[float | None] = mapped_column(TIME)
    revoked_at: Mapped[float | None] = mapped_column(TIME)


class Node(Base):
    """An enrolled machine: identity, credential hash, the last status it reported, and when it was last seen."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    tier: Mapped[str] = mapped_column(String(16))
    labels: Mapped[dict[str, str]] = mapped_column(JSON)
    profile: Mapped[str] = mapped_column(String(NAME_LEN))
    emulated: Mapped[bool] = mapped_column(Boolean)
    agent_version: Mapped[str] = mapped_column(String(NAME_LEN))
    facts: Mapped[dict[str, Any]] = mapped_column(JSON)
    credential_hash: Mapped[str] = mapped_column(String(HEX_LEN), unique=True)
    enrolled_at: Mapped[float] = mapped_column(TIME)
    last_seen: Mapped[float | None] = mapped_column(TIME)
    revoked_at: Mapped[float | None] = mapped_column(TIME)
    # The last NodeStatus as canonical JSON, so an identical report is recognised by string comparison.
    status: Mapped[str | None] = mapped_column(Text)
    status_at: Mapped[float | None] = mapped_column(TIME)
    reported_etag: Mapped[str | None] = mapped_column(String(80))
    serve_url: Mapped[str | None] = mapped_column(Text)
    # The level the node's last attestation report earned (None: not attested), when, and the verdict in words.
    attestation: Mapped[str | None] = mapped_column(String(16))
    attested_at: Mapped[float | None] = mapped_column(TIME)
    attestation_detail: Mapped[str | None] = mapped_column(Text)
    # The node's TPM, once registered by credential activation: its attestation key (base64 TPM2B_PUBLIC), the
    # fingerprint of its endorsement key (one physical TPM, one node), and the PCR values its last quote covered.
    tpm_ak: Mapped[str | None] = mapped_column(Text)
    tpm_ek: Mapped[str | None] = mapped_column(String(HEX_LEN), unique=True)
    tpm_pcrs: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class EnrollmentToken(Base):
    """A one-time, expiring secret that lets one machine enroll as a node."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(HEX_LEN), unique=True)
    created_at: Mapped[float] = mapped_column(TIME)
    expires_at: Mapped[float] = mapped_column(TIME)
    used_at: Mapped[float | None] = mapped_column(TIME)
    node_id: Mapped[str | None] = mapped_column(ForeignKey("nodes.id"))
    # What the operator bound the token to (None: the enrolling machine's word is taken, once): the node's name,
    # tier and labels, or the one existing node it re-enrolls (a new machine, or a revoked node brought back).
    node_name: Mapped[str | None] = mapped_column(String(NAME_LEN))
    tier: Mapped[str | None] = mapped_column(String(16))
    labels: Mapped[dict[str, str] | None] = mapped_column(JSON)
    reenroll_node_id: Mapped[str | None] = mapped_column(String(32))


class NodeCertificate(Base):
    """A certificate the fleet CA issued to a node, kept until it expires: revoking the node (or enrolling it
    again) revokes every one of its certificates still valid, and peers learn their hashes (`control.revocation`)."""

    __tablename__ = "node_certificates"

    sha256: Mapped[str] = mapped_column(String(HEX_LEN), primary_key=True)  # hex sha256 of the DER
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True)
    not_after: Mapped[float] = mapped_column(TIME, index=True)
    revoked_at: Mapped[float | None] = mapped_column(TIME)
    # the certificate itself and when it was issued: a renewal whose answer was lost is answered again with it
    pem: Mapped[str | None] = mapped_column(Text)
    issued_at: Mapped[float | None] = mapped_column(TIME)


class Model(Base):
    """A named thing users version."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    created_at: Mapped[float] = mapped_column(TIME)

    versions: Mapped[list[ModelVersion]] = relationship(back_populates="model", order_by="ModelVersion.id")


class ModelVersion(Base):
    """A release of a model; it exists once its first variant is uploaded."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    version: Mapped[str] = mapped_column(String(NAME_LEN))
    created_at: Mapped[float] = mapped_column(TIME)

    model: Mapped[Model] = relationship(back_populates="versions")
    variants: Mapped[list[Variant]] = relationship(back_populates="version", order_by="Variant.variant")


class Variant(Base):
    """A build of a version for one hardware profile: its package digest and the tar blob that carries it."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("version_id", "variant"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    variant: Mapped[str] = mapped_column(String(NAME_LEN))
    profile: Mapped[str] = mapped_column(String(NAME_LEN))
    runtime: Mapped[str] = mapped_column(String(64))
    precision: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(7 + HEX_LEN))
    blob: Mapped[str] = mapped_column(String(HEX_LEN), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(TIME)
    # Blob id of the release signature (a model-signing bundle), once the package is signed.
    signature: Mapped[str | None] = mapped_column(String(HEX_LEN))

    version: Mapped[ModelVersion] = relationship(back_populates="variants")


class TufMetadata(Base):
    """One version of one TUF role of one repository, as served: `image` (what exists, with a release-signed role
    per package) or `director/<node id>` (what that node should run). Versions of a role only ever grow."""

    __tablename__ = "tuf_metadata"
    __table_args__ = (UniqueConstraint("repo", "role", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo: Mapped[str] = mapped_column(String(48))
    role: Mapped[str] = mapped_column(String(3 * NAME_LEN + 2))
    version: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[float] = mapped_column(TIME)
    # Director targets: the ETag of the desired state they were made from.
    source: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[float] = mapped_column(TIME)


class Deployment(Base):
    """Which version should run on the nodes whose labels match the selector."""

    __tablename__ = "deployments"
    # Ids are never reused (SQLite would hand out a deleted maximum again): a desired state names its deployment.
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    selector: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(TIME)

    version: Mapped[ModelVersion] = relationship()


class Rollout(Base):
    """A version on its way to the nodes a selector matches, wave by wave (see `strata.control.rollout_plan`)."""

    __tablename__ = "rollouts"
    # Ids are never reused: desired states name their rollout, and operators script against the id.
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    selector: Mapped[dict[str, str]] = mapped_column(JSON)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    wave: Mapped[int] = mapped_column(Integer)
    wave_started_at: Mapped[float | None] = mapped_column(TIME)
    gate_results: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    failed_gate: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    baseline: Mapped[dict[str, Any]] = mapped_column(JSON)
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(TIME)
    finished_at: Mapped[float | None] = mapped_column(TIME)

    version: Mapped[ModelVersion] = relationship()


class RolloutNode(Base):
    """One node's part in a rollout: its wave, the version it had, and how its update went."""

    __tablename__ = "rollout_nodes"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True, index=True)
    wave: Mapped[int | None] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    previous_version: Mapped[str | None] = mapped_column(String(NAME_LEN))
    excluded: Mapped[str | None] = mapped_column(Text)
    released_at: Mapped[float | None] = mapped_column(TIME)
    healthy_at: Mapped[float | None] = mapped_column(TIME)
    failed_at: Mapped[float | None] = mapped_column(TIME)
    failure: Mapped[str | None] = mapped_column(Text)
    ever_on_target: Mapped[bool] = mapped_column(Boolean)
    # Kept out because the node refused the version itself (`excluded` says why, in words): out for good.
    refused: Mapped[bool] = mapped_column(Boolean, server_default=false())


class Pin(Base):
    """An operator's pin: one node, or the nodes a selector matches, stay on a version whatever else says."""

    __tablename__ = "pins"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    node_id: Mapped[str | None] = mapped_column(ForeignKey("nodes.id"))
    selector: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(TIME)

    version: Mapped[ModelVersion] = relationship()


class ActivationEvent(Base):
    """A change of the version a node runs, as its status reports showed it: the history of a model."""

    __tablename__ = "activation_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # activated, rolled_back or removed
    version: Mapped[str | None] = mapped_column(String(NAME_LEN))
    variant: Mapped[str | None] = mapped_column(String(NAME_LEN))
    digest: Mapped[str | None] = mapped_column(String(7 + HEX_LEN))
    previous_version: Mapped[str | None] = mapped_column(String(NAME_LEN))
    activated_at: Mapped[float | None] = mapped_column(TIME)  # the node's clock
    at: Mapped[float] = mapped_column(TIME)  # the control plane's clock, when the report arrived


class FleetEvent(Base):
    """One thing that happened in the fleet, for `strata events`: an enrollment, a revocation, an activation or
    rollback, a failure a node reported, a deployment made or removed, a rollout's change or gate result."""

    __tablename__ = "fleet_events"
    # Ids are the feed's cursor (`strata events --follow` asks for the ones after the last it saw): never reused.
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(TIME, index=True)  # the control plane's clock
    kind: Mapped[str] = mapped_column(String(24), index=True)
    node_id: Mapped[str | None] = mapped_column(String(32), index=True)
    model: Mapped[str | None] = mapped_column(String(NAME_LEN))
    version: Mapped[str | None] = mapped_column(String(NAME_LEN))
    rollout_id: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)


class TelemetryBatch(Base):
    """One telemetry batch a node uploaded; the primary key is what makes every batch stored exactly once."""

    __tablename__ = "telemetry_batches"

    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    received_at: Mapped[float] = mapped_column(TIME, index=True)  # the retention sweep's range (so are the others')
    bytes: Mapped[int] = mapped_column(Integer)
    minutes: Mapped[int] = mapped_column(Integer)
    events: Mapped[int] = mapped_column(Integer)


class TelemetryMinute(Base):
    """Exact request counts and a latency histogram of one node, model version and variant in one minute."""

    __tablename__ = "telemetry_minutes"
    __table_args__ = (Index("ix_telemetry_minutes_model_minute", "model", "minute"),)

    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    version: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    variant: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True, index=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)  # every failed request
    items: Mapped[int] = mapped_column(BigInteger)
    latency_sum_us: Mapped[int] = mapped_column(BigInteger)
    queue_sum_us: Mapped[int] = mapped_column(BigInteger)
    latency: Mapped[list[int]] = mapped_column(JSON)
    # of `errors`, those refused as the caller's fault (0 in rows from nodes older than the column)
    client_errors: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # of `errors`, those shed by admission control (0 in rows from nodes older than the column)
    shed: Mapped[int] = mapped_column(BigInteger, server_default="0")


class TelemetryEvent(Base):
    """A kept request: every error and slow request, and a sample of the rest."""

    __tablename__ = "telemetry_events"
    __table_args__ = (Index("ix_telemetry_events_model_ts", "model", "ts"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True)
    ts: Mapped[float] = mapped_column(TIME, index=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN))
    version: Mapped[str] = mapped_column(String(NAME_LEN))
    variant: Mapped[str] = mapped_column(String(NAME_LEN))
    latency_us: Mapped[int] = mapped_column(BigInteger)
    queue_us: Mapped[int] = mapped_column(BigInteger)
    batch: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(MAX_STATUS))  # the limits a batch is held to (core.telemetry)
    tier: Mapped[str] = mapped_column(String(MAX_TIER))
    priority: Mapped[int] = mapped_column(Integer)
    summary: Mapped[str] = mapped_column(Text)


class TelemetryDrift(Base):
    """Bin counts of one tensor's values on one node, model version and minute (for PSI and chi-square)."""

    __tablename__ = "telemetry_drift"

    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    version: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True, index=True)
    tensor: Mapped[str] = mapped_column(String(MAX_TENSOR), primary_key=True)
    counts: Mapped[list[int]] = mapped_column(JSON)


class TelemetryDropped(Base):
    """What a node's telemetry buffer had to discard, by kind, summed over its batches (never silent), and what the
    control plane left out of them: dated too far ahead (`telemetry.FUTURE_KINDS`), naming what the registry does
    not know (`telemetry.UNKNOWN_KINDS`), past the node's budgets (`OVER_BUDGET_KIND`, `DRIFT_OVER_BUDGET_KIND`)."""

    __tablename__ = "telemetry_dropped"

    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(MAX_DROPPED_KIND), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


class NodeLogRequest(Base):
    """An operator's ask for the tail of a node's log, and the node's answer once it uploaded it
    (`strata nodes logs`); only the newest few per node are kept."""

    __tablename__ = "node_log_requests"
    __table_args__ = ({"sqlite_autoincrement": True},)

    # `seq` orders a node's requests (two may share a clock reading); `id` is what the API names, not guessable.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True)
    lines: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(TIME)
    answered_at: Mapped[float | None] = mapped_column(TIME, index=True)
    text: Mapped[str | None] = mapped_column(Text)


def runnable_version(session: Session, model: str, version: str, use: str) -> ModelVersion:
    """Version `version` of `model`, which must have variants a node could run (`use` says what for, in the
    error: "deploy", "roll out", "run").

    Raises:
        NotFound: no such model, or no such version of it.
        ProtocolError: the version has no variants.
    """
    row = session.scalar(select(ModelVersion).join(Model).where(Model.name == model, ModelVersion.version == version))
    if row is None:
        if session.scalar(select(Model.id).where(Model.name == model)) is None:
            raise NotFound(f"no model {model!r}")
        raise NotFound(f"model {model!r} has no version {version!r}")
    if not row.variants:
        raise ProtocolError(f"{model} {version} has no variants to {use}")
    return row


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL, foreign keys, a busy timeout and NORMAL sync on a new SQLite connection (a "connect" event)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def sqlite_file(url: URL) -> Path | None:
    """The database file a SQLite URL names; None for another database, an in-memory one or a URI filename."""
    if url.get_backend_name() != "sqlite" or str(url.query.get("uri", "")).lower() in ("true", "1"):
        return None
    if not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def open_existing(engine: Engine) -> None:
    """Make every new connection of `engine` (a SQLite file database) open its file read-write without creating
    it: a database deleted under a running server is an error ("unable to open database file"), not a new empty
    database that the next connection, or the next start, takes for the fleet. Only the migrations create it."""
    if sqlite_file(engine.url) is None:
        return

    @event.listens_for(engine, "do_connect")
    def _read_write(_dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
        if not cparams.get("uri"):
            cargs[0] = f"file:{quote(str(cargs[0]))}?mode=rw"
            cparams["uri"] = True


# SQLite's SQLITE_FULL and PostgreSQL's disk_full (SQLSTATE 53100)
_SQLITE_FULL = 13
_POSTGRES_DISK_FULL = "53100"
_MAX_REASON = 200  # characters of a driver's message a StoreError repeats


def store_error(exc: SQLAlchemyError, url: URL) -> StoreError:
    """What a caller may be told of a database failure: for an operational failure (disk full, database locked or
    unreachable, a missing table) the first line of the driver's message, cut short and scrubbed of the URL's
    password; for any other only the error's kind, since drivers quote the values of the statement there. Never the
    SQL or its parameters (SQLAlchemy's own message holds both). A full disk is a `StorageFull` (507).
    """
    orig = exc.orig if isinstance(exc, DBAPIError) else None
    if orig is not None and (
        getattr(orig, "sqlite_errorcode", None) == _SQLITE_FULL
        or getattr(orig, "sqlstate", None) == _POSTGRES_DISK_FULL
    ):
        return StorageFull(f"database error: the disk is full ({_first_line(orig, url)})")
    if isinstance(exc, OperationalError) and orig is not None:
        return StoreError(f"database error: {_first_line(orig, url)}")
    return StoreError(f"database error: {type(orig or exc).__name__}")


def _first_line(orig: BaseException, url: URL) -> str:
    lines = str(orig).strip().splitlines()
    line = " ".join(lines[0].split()) if lines else ""
    if not line:
        return type(orig).__name__
    line = redact(line, url)
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


POSTGRES_IDLE_IN_TRANSACTION: Final = "60s"


def _postgres_session(dbapi_connection: Any, _record: Any) -> None:
    """Every commit is durable before it is answered: nodes delete what the control plane acknowledged (telemetry
    batches, status), so an acknowledged write that a crash of PostgreSQL takes back is lost for good. A server
    configured with `synchronous_commit = off` (a common tuning) would do exactly that; strata's sessions turn it
    back on for themselves (PostgreSQL lets any user set it per session).

    A replica that stops in the middle of a transaction (paused, swapping, cut off by the network) would hold its
    locks, the rollout lock among them, until PostgreSQL noticed: never while paused, about two hours after a
    partition (the kernel's keepalive). Every other replica's rollout actions waited on it meanwhile. PostgreSQL
    ends such a session after `POSTGRES_IDLE_IN_TRANSACTION` idle inside a transaction, and probes a silent client
    after 30 s (given up after 3 probes 10 s apart), which frees its locks; no strata transaction waits that long
    between two statements."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO on")
        cursor.execute(f"SET idle_in_transaction_session_timeout TO '{POSTGRES_IDLE_IN_TRANSACTION}'")
        for setting, value in (
            ("tcp_keepalives_idle", 30),
            ("tcp_keepalives_interval", 10),
            ("tcp_keepalives_count", 3),
        ):
            cursor.execute(f"SET {setting} TO {value}")
    dbapi_connection.commit()


# What `postgresql://` (and Heroku's `postgres://`) means here: psycopg 3, the driver of the `strata[postgres]` extra.
POSTGRES_DRIVER = "postgresql+psycopg"
_POSTGRES_SCHEMES = {"postgres", "postgresql"}


def database_url(url: str) -> URL:
    """`url` parsed, with a bare `postgresql://` (or `postgres://`) mapped to the psycopg driver.

    Raises:
        ConfigError: the URL does not parse; the message never repeats the URL (it may hold a password).
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        # A malformed URL may put its password anywhere, so none of it is echoed, not even the parser's message.
        raise ConfigError(
            "the database URL does not parse (not shown: it may hold a password); expected "
            "sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE, with a numeric port and any "
            "special characters of the password percent-encoded"
        ) from exc
    if parsed.drivername in _POSTGRES_SCHEMES:
        parsed = parsed.set(drivername=POSTGRES_DRIVER)
    return parsed


def safe_url(url: str | URL) -> str:
    """`url` as it may be shown in messages and logs: the password replaced by `***`."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except (ArgumentError, ValueError):
            return "(a database URL that does not parse)"
    return url.render_as_string(hide_password=True)


def redact(message: str, url: str | URL) -> str:
    """`message` with the password of `url` replaced by `***` wherever it appears (a driver may echo it)."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except (ArgumentError, ValueError):
            return message
    password = url.password
    if password:
        message = message.replace(str(password), "***")
        encoded = quote_plus(str(password))
        if encoded != password:
            message = message.replace(encoded, "***")
    return message


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite connections get WAL, foreign keys and a busy timeout, and open the database file
    only if it exists (`open_existing`: `strata.control.migrations.upgrade` creates it).

    `postgresql://` means psycopg 3 (`pip install 'strata[postgres]'`). Nothing is connected yet.

    Raises:
        ConfigError: the URL does not parse or names a database driver that is not installed; the message never
            holds the password.
    """
    parsed = database_url(url)
    try:
        # A server-based database can restart under us: check a pooled connection before handing it out, so the
        # first request after a restart does not fail on a dead connection (SQLite has no server to lose).
        engine = create_engine(parsed, pool_pre_ping=parsed.get_backend_name() != "sqlite")
    except ImportError as exc:
        if parsed.drivername == POSTGRES_DRIVER:
            raise ConfigError(
                f"PostgreSQL needs the psycopg driver, which is not installed ({redact(str(exc), parsed)}): "
                "pip install 'strata[postgres]'"
            ) from exc
        if parsed.get_backend_name() == "postgresql":
            raise ConfigError(
                f"the {parsed.get_driver_name()} driver is not installed ({redact(str(exc), parsed)}); strata "
                "uses psycopg 3: postgresql://... with pip install 'strata[postgres]'"
            ) from exc
        raise ConfigError(
            f"the database driver of {safe_url(parsed)} is not installed: {redact(str(exc), parsed)}"
        ) from exc
    except ArgumentError as exc:
        raise ConfigError(f"cannot use database URL {safe_url(parsed)}: {redact(str(exc), parsed)}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", sqlite_pragmas)
        open_existing(engine)
    elif engine.dialect.name == "postgresql":
        event.listen(engine, "connect", _postgres_session)
    return engine


class Database:
    """The engine and the one way services touch it: `transaction()`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in a transaction that commits when the block ends and rolls back on any error.

        Strata errors raised inside the block pass through unchanged.

        Raises:
            Conflict: the commit broke a uniqueness or foreign-key rule (a concurrent write got there first).
            StorageFull: the database's disk is full.
            StoreError: any other database failure, with the driver's reason (`store_error`).
        """
        try:
            with self._sessions.begin() as session:
                yield session
        except IntegrityError as exc:
            log.info("integrity error: %s", redact(str(exc.orig), self.engine.url))
            raise Conflict("the change conflicts with what is stored; reload and try again") from exc
        except SQLAlchemyError as exc:
            log.warning("database error: %s", redact(str(exc), self.engine.url))
            raise store_error(exc, self.engine.url) from exc

    def ping(self) -> None:
        """One round trip to the database (`SELECT 1`), for the readiness probe; a SQLite database file must still be
        there (a pooled connection keeps answering from a deleted one).

        Raises:
            StoreError: the database does not answer, or its file is gone.
        """
        database = sqlite_file(self.engine.url)
        if database is not None and not database.exists():
            raise StoreError(f"the database file {database} is missing")
        with self.transaction() as session:
            session.execute(text("SELECT 1"))

    def delete_chunk(self, table: type[Any], condition: Any, chunk: int) -> int:
        """Delete up to `chunk` rows of `table` matching `condition` in one statement and its own short transaction
        (retention sweeps: no long SQLite write lock, no large PostgreSQL transaction); return how many.

        Raises:
            StoreError: the database failed.
        """
        key = tuple(table.__table__.primary_key.columns)
        chosen = select(*key).where(condition).limit(chunk).correlate(None)
        with self.transaction() as session:
            where = key[0].in_(chosen) if len(key) == 1 else tuple_(*key).in_(chosen)
            return int(session.connection().execute(delete(table).where(where)).rowcount)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


SWEEP_CHUNK = 5000  # rows one DELETE statement (one transaction) of a retention sweep removes
SWEEP_PAUSE_S = 0.02  # the least pause between two full chunks (`in_chunks`)


def in_chunks(
    step: Callable[[], int], chunk: int, pause_s: float, stop: threading.Event | None, counted: Callable[[int], None]
) -> int:
    """Run `step` (one short transaction that removes up to `chunk` rows and says how many, as
    `Database.delete_chunk` does) until it removes fewer or `stop` is set; `counted` hears each chunk's count as it
    goes. Between full chunks it pauses at least `pause_s`, and at least as long as the chunk took, so that other
    writers hold SQLite's write lock half the time or more. Returns the rows removed.

    Raises:
        StoreError: the database failed (what was removed before stays removed).
    """
    removed = 0
    while True:
        started = time.monotonic()
        count = step()
        removed += count
        counted(count)
        if count < chunk or (stop is not None and stop.is_set()):
            return removed
        time.sleep(max(pause_s, time.monotonic() - started))


# --- replicas: what several server processes on one database share (see `strata.control.feed` and `.lease`) ---


class FleetChange(Base):
    """The fleet-wide change counter: one row (id 1) that every replica advances after a change that can move a
    desired state, and that every replica watches (PostgreSQL NOTIFY, or a poll of this row on SQLite)."""

    __tablename__ = "fleet_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger)


class Lease(Base):
    """A job that must run on one replica at a time (the rollout driver): who holds it, and until when."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(TIME)


class AttestationChallenge(Base):
    """A one-time challenge issued to a node (an attestation nonce, or a TPM credential activation), pending until
    the node answers through any replica: the answer claims it with a conditional DELETE, so it is used once."""

    __tablename__ = "attestation_challenges"

    node_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # "nonce" or "tpm"
    value: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[float] = mapped_column(TIME)
