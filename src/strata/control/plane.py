"""The control plane's parts, built from `ServerSettings` and wired together once; the API reaches them here."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

from strata.control import migrations
from strata.control.attestation import AttestationService
from strata.control.auth import Authenticator
from strata.control.blobs import FileBlobStore
from strata.control.db import Database, make_engine
from strata.control.deployments import DeploymentService
from strata.control.errors import StoreError
from strata.control.feed import ChangeFeed, Nudge
from strata.control.fleet import FleetService
from strata.control.history import HistoryService
from strata.control.otlp import OtlpExporter
from strata.control.pins import PinService
from strata.control.pki import Pki
from strata.control.presence import PresenceTracker
from strata.control.registry import RegistryService
from strata.control.rollouts import RolloutService, load_pin_entries
from strata.control.settings import ServerSettings
from strata.control.supply import SupplyService
from strata.control.telemetry import TelemetryService
from strata.core.attest import strata_code_hash

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
    registry: RegistryService
    deployments: DeploymentService
    telemetry: TelemetryService
    pki: Pki
    attestation: AttestationService
    rollouts: RolloutService
    pins: PinService
    history: HistoryService
    nudge: Nudge
    supply: SupplyService

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
        authenticator = Authenticator(db, presence, settings.clock)
        pki = Pki(settings.pki_dir, settings.ca_path, settings.clock)
        nudge = Nudge()
        window = settings.online_window_s
        telemetry = TelemetryService(db, settings.clock)
        rollouts = RolloutService(db, feed, presence, settings.clock, window, load_pin_entries)
        rollouts.drift = telemetry.max_psi_by_node  # drift gates read node telemetry
        fleet = FleetService(
            db,
            blobs,
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
            registry=RegistryService(
                db, blobs, feed, settings.clock, settings.tmp_dir, settings.max_package_bytes, supply=supply
            ),
            deployments=DeploymentService(db, feed, settings.clock),
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
        )

    def start_exporters(self) -> OtlpExporter | None:
        """Forward telemetry to the OTLP collector named in the settings, if any."""
        if not self.settings.otlp_endpoint:
            return None
        exporter = OtlpExporter(self.settings.otlp_endpoint)
        self.telemetry.exporters.append(exporter)
        log.info("forwarding telemetry to the OTLP collector at %s", exporter.url)
        return exporter

    def start(self) -> None:
        """Prepare the data folder (an empty `tmp/`), migrate the database, load the release and TUF keys, and make
        sure an admin token exists.

        Raises:
            StoreError: the data folder or the database cannot be prepared.
            ConfigError: the admin token file is unusable, or a release key or TUF key is.
        """
        settings = self.settings
        try:
            shutil.rmtree(settings.tmp_dir, ignore_errors=True)
            for folder in (settings.data_dir, settings.blobs_dir, settings.tmp_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot prepare the data folder {settings.data_dir}: {exc}") from exc
        migrations.upgrade(self.db.engine)
        self.pki.start()
        self.supply.start()
        if self.authenticator.ensure_admin_token(settings.admin_token_path):
            log.info("wrote a new admin token to %s", settings.admin_token_path)

    def flush_presence(self) -> int:
        """Write pending last-seen times; return how many nodes were written.

        Raises:
            StoreError: the database failed (the times stay pending).
        """
        return self.presence.flush(self.db)

    def stop(self) -> None:
        """End long polls, write pending last-seen times and close the database.

        Raises:
            StoreError: the final presence flush failed.
        """
        self.feed.close()
        try:
            self.flush_presence()
        finally:
            self.db.close()
