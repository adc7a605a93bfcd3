"""The control plane's parts, built from `ServerSettings` and wired together once; the API reaches them here.

Any number of processes built this way may share one database (replicas): the change feed is fleet-wide
(`feed.SharedGeneration`), the rollout driver runs on the one replica holding its lease (`lease`), pending
attestation challenges and enrollment tokens are rows claimed once. Files in the data folder (the fleet CA, the
TUF keys, the admin token) are made by the first replica that starts, under a lock file, and read by the others:
replicas share the data folder, or are given the same files (Kubernetes Secrets mounted at the same paths).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import URL, text

from strata.control import migrations
from strata.control.attestation import AttestationService
from strata.control.auth import Authenticator
from strata.control.blob_access import BlobAccess
from strata.control.blobs import FileBlobStore
from strata.control.db import Database, make_engine, sqlite_file
from strata.control.deployments import DeploymentService
from strata.control.entries import load_pin_entries
from strata.control.errors import StoreError, disk_error
from strata.control.events import EventService
from strata.control.feed import ChangeFeed, Nudge, SharedGeneration
from strata.control.fleet import FleetService
from strata.control.history import HistoryService
from strata.control.lease import ROLLOUTS, LeaseKeeper, LeaseStore, lock_key, replica_id, serialize
from strata.control.nodelogs import NodeLogService
from strata.control.otlp import OtlpExporter
from strata.control.pins import PinService
from strata.control.pki import Pki
from strata.control.presence import PresenceTracker
from strata.control.registry import RegistryService
from strata.control.rollouts import RolloutService
from strata.control.settings import ServerSettings
from strata.control.supply import SupplyService
from strata.control.telemetry import TelemetryService
from strata.core.attest import strata_code_hash
from strata.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlPlane:
    """Settings, storage and services of one server process."""

    settings: ServerSettings
    db: Database
    feed: ChangeFeed
    presence: PresenceTracker
    authenticator: Authenticator
    fleet: FleetService
    blob_access: BlobAccess
    registry: RegistryService
    deployments: DeploymentService
    telemetry: TelemetryService
    pki: Pki
    attestation: AttestationService
    rollouts: RolloutService
    pins: PinService
    history: HistoryService
    events: EventService
    node_logs: NodeLogService
    nudge: Nudge
    supply: SupplyService
    shared: SharedGeneration = field(repr=False)
    rollout_lease: LeaseKeeper = field(repr=False)

    @classmethod
    def build(cls, settings: ServerSettings) -> ControlPlane:
        """Create every part; nothing touches the disk or the database yet.

        Raises:
            ConfigError: the database URL cannot be used, or a TPM CA file or PCR value does not parse.
        """
        db = Database(make_engine(settings.database_url))
        blobs = FileBlobStore(settings.blobs_dir, settings.tmp_dir)
        feed = ChangeFeed()
        presence = PresenceTracker()
        authenticator = Authenticator(db, presence, settings.clock, feed)
        shared = SharedGeneration(db, feed)
        shared.on_foreign.append(authenticator.recheck)  # a token or node revoked through another replica
        pki = Pki(settings.pki_dir, settings.ca_path, settings.clock)
        nudge = Nudge()
        window = settings.online_window_s
        telemetry = TelemetryService(db, settings.clock, settings.telemetry_retention_s)
        rollouts = RolloutService(db, feed, presence, settings.clock, window, load_pin_entries)
        rollouts.drift = telemetry.drift_by_node  # drift gates read node telemetry
        rollouts.serialize = functools.partial(serialize, name=ROLLOUTS)
        fleet = FleetService(
            db,
            feed,
            presence,
            authenticator,
            settings.clock,
            window,
            pki,
            on_status=nudge,
            cert_hours=settings.node_cert_hours,
        )
        supply = SupplyService(
            db,
            blobs,
            feed,
            fleet.desired,
            settings.clock,
            settings.tuf_keys_dir,
            settings.tmp_dir,
            settings.release_keys,
            settings.tuf_expiries,
        )
        return cls(
            settings=settings,
            db=db,
            feed=feed,
            presence=presence,
            authenticator=authenticator,
            fleet=fleet,
            blob_access=BlobAccess(db, blobs, feed, fleet.desired, fleet.active_deployments),
            registry=RegistryService(
                db, blobs, feed, settings.clock, settings.tmp_dir, settings.max_package_bytes, supply=supply
            ),
            deployments=DeploymentService(db, feed, settings.clock, presence, window),
            events=EventService(db, settings.clock),
            node_logs=NodeLogService(db, feed, settings.clock),
            telemetry=telemetry,
            pki=pki,
            attestation=AttestationService(
                db,
                feed,
                settings.clock,
                settings.agent_allowlist or (strata_code_hash(),),
                tpm_cas=settings.tpm_cas,
                tpm_pcrs=settings.tpm_pcrs,
            ),
            rollouts=rollouts,
            pins=PinService(db, feed, settings.clock),
            history=HistoryService(db),
            nudge=nudge,
            supply=supply,
            shared=shared,
            rollout_lease=LeaseKeeper(LeaseStore(db, settings.clock), ROLLOUTS, replica_id()),
        )

    def start_exporters(self) -> OtlpExporter | None:
        """Forward telemetry to the OTLP collector named in the settings, if any."""
        if not self.settings.otlp_endpoint:
            return None
        exporter = OtlpExporter(self.settings.otlp_endpoint, queue_bytes=self.settings.otlp_queue_bytes)
        self.telemetry.exporters.append(exporter)
        log.info("forwarding telemetry to the OTLP collector at %s", exporter.url)
        return exporter

    def start(self) -> None:
        """Prepare the data folder (an empty `tmp/`), migrate the database, load the release and TUF keys, and make
        sure an admin token exists.

        Raises:
            StoreError: the data folder or the database cannot be prepared.
            ConfigError: the admin token file is unusable, or a release key or TUF key is; the SQLite database of a
                fleet's data folder is missing.
        """
        settings = self.settings
        try:
            clear_scratch(settings.scratch_root, settings.tmp_dir, settings.clock())
            for folder in (settings.data_dir, settings.blobs_dir, settings.tmp_dir):
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Private whatever the umask was, and also for a folder an older release made 0755: it holds the
            # inventory, the fleet CA's key and packages in plaintext.
            make_private(settings.data_dir)
        except OSError as exc:
            raise StoreError(f"cannot prepare the data folder {settings.data_dir}: {exc}") from exc
        # Replicas starting together: one at a time migrates and makes the keys and the admin token.
        with first_start_lock(settings.data_dir), self.migration_lock():
            self.migrate()
            try:
                for suffix in ("", "-wal", "-shm"):
                    database = settings.data_dir / f"strata.db{suffix}"
                    if database.exists():
                        os.chmod(database, 0o600)
            except OSError as exc:
                raise StoreError(f"cannot make the database in {settings.data_dir} private: {exc}") from exc
            self.pki.start()
            self.supply.start()
            if self.authenticator.ensure_admin_token(settings.admin_token_path):
                log.info("wrote a new admin token to %s", settings.admin_token_path)
        self.shared.start()

    def check_ready(self) -> None:
        """Whether this process can serve the API: its database answers (and its SQLite file is still there), and the
        blob store's folders take a write (not full, not read-only).

        Raises:
            StoreError: the reason it cannot (`StorageFull` for a full disk).
        """
        self.db.ping()
        settings = self.settings
        if not os.access(settings.blobs_dir, os.W_OK):
            raise StoreError(f"the blob folder {settings.blobs_dir} cannot be written")
        try:
            # The scratch folder is on the blobs' file system (uploads are renamed into place): a byte written there
            # needs a free block, which a full disk does not have.
            with tempfile.TemporaryFile(dir=settings.tmp_dir, prefix=".ready.") as probe:
                probe.write(b"\0")
                probe.flush()
        except OSError as exc:
            raise disk_error(
                f"the blob store's scratch folder {settings.tmp_dir} cannot be written: {exc}", exc
            ) from exc

    def migrate(self) -> None:
        """Bring the database to the newest schema, creating a SQLite database on a first start; call it under
        `first_start_lock` and `migration_lock`.

        Raises:
            ConfigError: the data folder holds a fleet but its SQLite database is gone (`refuse_lost_database`).
            StoreError: the database cannot be reached or migrated.
        """
        refuse_lost_database(self.settings.data_dir, self.db.engine.url, fleet_files(self.settings))
        migrations.upgrade(self.db.engine)

    @contextlib.contextmanager
    def migration_lock(self) -> Iterator[None]:
        """On PostgreSQL, a session advisory lock around the migrations: replicas that do not share a data folder
        (Kubernetes pods) still migrate one at a time. Nothing on SQLite (the data folder's lock covers it).

        Raises:
            StoreError: the database cannot be reached.
        """
        engine = self.db.engine
        if engine.dialect.name != "postgresql":
            yield
            return
        try:
            connection = engine.connect()
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": lock_key("migrations")})
            connection.commit()
        except Exception as exc:  # SQLAlchemyError or a driver error on connect
            raise migrations.migration_error(engine, exc) from exc
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": lock_key("migrations")})
                connection.commit()
            connection.close()

    def flush_presence(self) -> int:
        """Write pending last-seen times of nodes, and last-used times of operator tokens; return how many nodes
        were written.

        Raises:
            StoreError: the database failed (the times stay pending).
        """
        self.authenticator.token_use.flush(self.db)
        return self.presence.flush(self.db)

    def stop(self) -> None:
        """End long polls, write pending last-seen times and close the database.

        Raises:
            StoreError: the final presence flush failed.
        """
        self.feed.close()
        self.shared.stop()
        self.rollout_lease.release()  # another replica takes the driver over at once
        try:
            self.flush_presence()
        finally:
            self.db.close()


def fleet_files(settings: ServerSettings) -> tuple[Path, ...]:
    """What only a server that has run on the data folder writes, after its database exists: its own TLS certificate
    (`pki/server.pem`) and blobs. Not the fleet CA, the TUF keys or the admin token: an operator may provide those
    before a first start (replicas are given them from a Secret; a token file a fresh database does not know is
    adopted)."""
    return (settings.pki_dir / "server.pem", settings.blobs_dir)


def refuse_lost_database(data_dir: Path, url: URL, fleet: tuple[Path, ...]) -> None:
    """Refuse to start a fleet's data folder whose SQLite database is missing (deleted, or not restored with the
    rest): migrating would make a new, empty database and serve a fleet with no models, deployments or nodes. A
    first start is not refused, nor one that stopped before making its database (nothing of `fleet` is written
    before the database; an empty folder, such as `blobs/` made by a start that then failed, does not count).

    Raises:
        ConfigError: the database file is missing and something of `fleet` is there.
    """
    database = sqlite_file(url)
    if database is None or database.exists():
        return
    found = [path for path in fleet if path.is_file() or (path.is_dir() and any(path.iterdir()))]
    if found:
        names = ", ".join(str(path.relative_to(data_dir)) for path in found)
        raise ConfigError(
            f"the database {database} is missing, but {data_dir} holds a fleet ({names}): starting would serve it "
            "from a new, empty database, with no models, deployments or nodes. Restore "
            f"{database.name} (with its -wal file, if any) from a backup of the data folder (README: Backup and "
            "restore), or start with a new --data-dir for a new fleet"
        )


@contextlib.contextmanager
def first_start_lock(data_dir: Path) -> Iterator[None]:
    """Hold `data_dir/start.lock` (an fcntl lock: local file systems and NFSv4 alike) while the block runs, so that
    replicas sharing the data folder make its CA, TUF keys and admin token once.

    Raises:
        ConfigError: the lock file cannot be opened (a folder the server cannot write: bad input, exit code 2, as
            a folder it cannot create).
    """
    try:
        handle = (data_dir / "start.lock").open("a")
    except OSError as exc:
        raise ConfigError(f"cannot use the data folder {data_dir}: cannot open start.lock: {exc}") from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_private(data_dir: Path) -> None:
    """Take group and other permissions off the data folder and, when it was not private yet (made under a loose
    umask, or by an older release), off everything already in it (0700 folders, 0600 files).

    Raises:
        OSError: a permission could not be changed.
    """
    if stat.S_IMODE(data_dir.stat().st_mode) & 0o077 == 0:
        return
    for root, _folders, files in os.walk(data_dir):  # symlinks are not followed
        os.chmod(root, 0o700)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & 0o700)


STALE_SCRATCH_S = 24 * 3600  # a replica's scratch folder untouched this long belongs to a replica long gone


def clear_scratch(root: Path, own: Path, now: float) -> None:
    """Empty this process's scratch folder (`own`, named `<host>.<pid>`), and remove other replicas' that belong to
    a process of this host that is gone (killed mid-upload, its partial upload would hold the disk for a day), or
    that have not changed for a day (a replica on another host sharing the folder); a live replica's folder is left
    alone. An older release's loose files are removed.

    Raises:
        OSError: the scratch root cannot be listed.
    """
    shutil.rmtree(own, ignore_errors=True)
    if not root.is_dir():
        return
    host = own.name.rpartition(".")[0]
    for entry in root.iterdir():
        try:
            stale = now - entry.lstat().st_mtime > STALE_SCRATCH_S
        except FileNotFoundError:
            continue
        if entry.is_dir() and not entry.is_symlink():
            if stale or _of_a_dead_process(entry.name, host):
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith((".blob.", ".unpack.", ".signature.")):
            entry.unlink(missing_ok=True)


def _of_a_dead_process(name: str, host: str) -> bool:
    """Whether the scratch folder `name` (`<host>.<pid>`) is of a process of `host` (this one) that has ended."""
    owner, _, pid = name.rpartition(".")
    if owner != host or not pid.isdigit() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False
