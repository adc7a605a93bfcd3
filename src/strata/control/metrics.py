"""Fleet metrics for Prometheus, read from the control plane's state at scrape time (prometheus_client)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, event

from strata import __version__
from strata.control.otlp import OtlpExporter
from strata.control.plane import ControlPlane
from strata.control.telemetry import FUTURE_SKEW_S
from strata.control.tls import COUNTS
from strata.core.words import duration

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FleetCollector(Collector):
    """Nodes by tier and liveness, nodes per active model version, and inference traffic per node."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        started = time.perf_counter()
        nodes = self.plane.fleet.list_nodes()
        by_tier = Counter((n.tier, "true" if n.online else "false") for n in nodes)
        fleet = GaugeMetricFamily(
            "strata_nodes", "Enrolled nodes by tier and whether they are online", labels=["tier", "online"]
        )
        for (tier, online), count in sorted(by_tier.items()):
            fleet.add_metric([tier, online], count)
        yield fleet

        running = Counter((model, version) for n in nodes for model, version in n.models.items())
        versions = GaugeMetricFamily(
            "strata_model_version_nodes", "Nodes running each model version", labels=["model", "version"]
        )
        for (model, version), count in sorted(running.items()):
            versions.add_metric([model, version], count)
        yield versions

        requests = CounterMetricFamily(
            "strata_inference_requests", "Inference requests reported by nodes", labels=["node", "model", "version"]
        )
        errors = CounterMetricFamily(
            "strata_inference_errors",
            "Failed inference requests reported by nodes",
            labels=["node", "model", "version"],
        )
        client_errors = CounterMetricFamily(
            "strata_inference_client_errors",
            "Failed inference requests refused as the caller's fault (malformed, or not fitting the model's "
            "signature): a part of strata_inference_errors",
            labels=["node", "model", "version"],
        )
        shed = CounterMetricFamily(
            "strata_inference_shed",
            "Failed inference requests shed by admission control (the node was busy): a part of "
            "strata_inference_errors",
            labels=["node", "model", "version"],
        )
        for (node, model, version), (total, failed, callers, busy) in sorted(self.plane.telemetry.totals().items()):
            requests.add_metric([node, model, version], total)
            errors.add_metric([node, model, version], failed)
            client_errors.add_metric([node, model, version], callers)
            shed.add_metric([node, model, version], busy)
        yield requests
        yield errors
        yield client_errors
        yield shed

        counters = self.plane.telemetry.counters
        for name, help_text, value in (
            (
                "strata_blob_bytes_served",
                "Bytes of packages, manifests and chunks sent to nodes",
                self.plane.blob_access.bytes_served,
            ),
            ("strata_telemetry_batches", "Telemetry batches stored", counters.batches),
            (
                "strata_telemetry_duplicate_batches",
                "Telemetry batches received again and not stored",
                counters.duplicates,
            ),
            ("strata_telemetry_bytes", "Compressed telemetry bytes stored", counters.bytes),
            ("strata_telemetry_events", "Sampled inference events stored", counters.events),
        ):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
        expired = CounterMetricFamily(
            "strata_telemetry_expired_rows",
            "Telemetry rows this replica deleted as older than the retention, or did not store for it when they"
            " arrived late (a minute's counts kept in the /metrics totals), by kind",
            labels=["kind"],
        )
        future = CounterMetricFamily(
            "strata_telemetry_future_rows",
            f"Telemetry rows this replica left out as dated more than {duration(FUTURE_SKEW_S)} past its clock (the"
            " node's clock is ahead), by kind",
            labels=["kind"],
        )
        unknown = CounterMetricFamily(
            "strata_telemetry_unknown_rows",
            "Telemetry rows this replica left out as naming a variant (minutes) or model version (drift) the registry"
            " does not know, by kind",
            labels=["kind"],
        )
        with counters.lock:
            for kind, count in counters.expired.items():
                expired.add_metric([kind], count)
            for kind, count in counters.future.items():
                future.add_metric([kind], count)
            for kind, count in counters.unknown.items():
                unknown.add_metric([kind], count)
        yield expired
        yield future
        yield unknown
        for exporter in self.plane.telemetry.exporters:
            if isinstance(exporter, OtlpExporter):
                yield from _otlp_metrics(exporter)
        events = CounterMetricFamily(
            "strata_events_expired", "Fleet events this replica deleted as older than --event-retention"
        )
        events.add_metric([], self.plane.events.expired)
        yield events
        with COUNTS.lock:
            open_now, refused, timeouts = COUNTS.open, COUNTS.refused, COUNTS.header_timeouts
            slow, pipelined = COUNTS.slow_bodies, COUNTS.pipelined
        connections = GaugeMetricFamily("strata_server_connections", "Connections open to this server process")
        connections.add_metric([], open_now)
        yield connections
        for name, help_text, value in (
            (
                "strata_server_connections_refused",
                "Connections closed at once because --max-connections were open",
                refused,
            ),
            (
                "strata_server_header_timeouts",
                "Connections closed because no complete request head came within --header-timeout",
                timeouts,
            ),
            (
                "strata_server_slow_bodies",
                "Connections closed because a request body came slower than 1 KiB/s after --header-timeout",
                slow,
            ),
            (
                "strata_server_pipeline_overflows",
                "Connections closed because they sent more than 16 requests ahead of their answers",
                pipelined,
            ),
        ):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
        info = GaugeMetricFamily("strata_server_info", "The control plane's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        scrape = GaugeMetricFamily("strata_metrics_scrape_seconds", "How long collecting these metrics took")
        scrape.add_metric([], time.perf_counter() - started)
        yield scrape


def _otlp_metrics(exporter: OtlpExporter) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """What the OTLP exporter (`--otlp-endpoint`) sent, gave up on, holds, and left out past its byte budget."""
    for name, help_text, value in (
        ("strata_otlp_exports_sent", "OTLP export requests the collector accepted", exporter.sent),
        ("strata_otlp_exports_failed", "OTLP export requests given up after their retries", exporter.failed),
        (
            "strata_otlp_dropped_rows",
            "Telemetry minute rows left out of the OTLP export: the exports waiting for the collector had reached"
            " their byte budget",
            exporter.dropped_rows,
        ),
    ):
        family = CounterMetricFamily(name, help_text)
        family.add_metric([], value)
        yield family
    queued = GaugeMetricFamily(
        "strata_otlp_queued_bytes", "Telemetry waiting for the OTLP collector (an upper bound on its requests' bytes)"
    )
    queued.add_metric([], exporter.queued_bytes)
    yield queued


class StatementCollector(Collector):
    """Statements this process sent to the database (by verb) and transactions it committed: what a request
    costs the database, read by `bench/fleet_load.py` as queries per heartbeat. An executemany counts one
    statement per parameter set (what the database executes)."""

    def __init__(self, engine: Engine) -> None:
        self._lock = threading.Lock()
        self._statements: Counter[str] = Counter()
        self._commits = 0
        event.listen(engine, "before_cursor_execute", self._on_execute)
        event.listen(engine, "commit", self._on_commit)

    def _on_execute(
        self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool
    ) -> None:
        verb = statement.lstrip()[:6].lower()
        if verb not in ("select", "insert", "update", "delete"):
            verb = "other"
        with self._lock:
            self._statements[verb] += len(parameters) if executemany else 1

    def _on_commit(self, _conn: Any) -> None:
        with self._lock:
            self._commits += 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            statements, commits = dict(self._statements), self._commits
        family = CounterMetricFamily(
            "strata_db_statements", "SQL statements this process executed, by verb", labels=["verb"]
        )
        for verb in ("select", "insert", "update", "delete", "other"):
            family.add_metric([verb], statements.get(verb, 0))
        yield family
        committed = CounterMetricFamily("strata_db_commits", "Database transactions this process committed")
        committed.add_metric([], commits)
        yield committed


def metrics_registry(plane: ControlPlane) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding the database counters and the fleet collector
    (in that order: a scrape reads the counters before its own queries)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatementCollector(plane.db.engine))
    registry.register(FleetCollector(plane))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format.

    Raises:
        StoreError: reading the fleet's state failed.
    """
    return generate_latest(registry)
