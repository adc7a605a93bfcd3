"""Forward stored telemetry to an OpenTelemetry collector over OTLP/HTTP (protobuf), when configured.

Each minute aggregate becomes delta data points of five metrics, stamped with the minute they describe:
`strata.inference.requests`, `strata.inference.errors`, `strata.inference.client_errors` (the part of the errors
that was the caller's fault) and `strata.inference.shed` (the part shed by admission control; monotonic sums) and
`strata.inference.duration`
(an explicit-bucket histogram in milliseconds). Resource attributes name the node. Exports run on a thread
of their own and retry a few times; the control plane's own copy never depends on the collector.

A batch's rows wait for that thread as they are (its protobuf is built there, ROWS_PER_EXPORT rows to a request),
and what waits is held to a byte budget by `export_size`, an upper bound on the requests it becomes: a collector
that is down or never answers costs the server at most that much memory, and the batches past it are left out and
counted (`OtlpExporter.dropped_rows`, `strata_otlp_dropped_rows` in /metrics).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Final

import httpx

from strata import __version__
from strata.core.telemetry import LATENCY_BOUNDS_US, MinuteRow, TelemetryBatch

log = logging.getLogger(__name__)

_NS = 1_000_000_000

# A 2,000-row batch with long names is some 5 MB of OTLP (the names are repeated in each of five metrics): split,
# a request stays well under a collector's request limit (the OpenTelemetry Collector's default is 20 MiB).
ROWS_PER_EXPORT: Final = 500

# Bounds for `export_size`, from the protobuf wire format: a length-delimited field costs at most 6 bytes past its
# contents (a tag and a length of up to 5 bytes), a fixed64 or double 9. Per row, four sum points and a histogram
# point each carry the three labels (keys 19 bytes, 3 x (6 + 6 + 6 + 6) framing), the two times and their value; the
# histogram adds its count and sum and two packed lists. Per request: the resource, the scope and five metrics'
# names and descriptions (618 bytes measured, with a 36-character node id and a one-character name).
_LABELS_FRAMING: Final = 3 * 24 + len("model") + len("version") + len("variant")
_SUM_POINT: Final = 6 + _LABELS_FRAMING + 3 * 9
_HISTOGRAM_POINT: Final = 6 + _LABELS_FRAMING + 4 * 9 + 2 * 6
_REQUEST: Final = 2048


def export_request(node_id: str, node_name: str, minutes: list[MinuteRow]) -> bytes:
    """An OTLP ExportMetricsServiceRequest (serialised protobuf) for one node's minute aggregates."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
    from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    def attributes(**values: str) -> list[KeyValue]:
        return [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in values.items()]

    delta = pb.AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    requests = pb.Metric(name="strata.inference.requests", unit="{request}", description="Inference requests")
    errors = pb.Metric(name="strata.inference.errors", unit="{request}", description="Failed inference requests")
    client_errors = pb.Metric(
        name="strata.inference.client_errors",
        unit="{request}",
        description="Failed inference requests refused as the caller's fault (a part of strata.inference.errors)",
    )
    shed = pb.Metric(
        name="strata.inference.shed",
        unit="{request}",
        description="Failed inference requests shed by admission control (a part of strata.inference.errors)",
    )
    duration = pb.Metric(name="strata.inference.duration", unit="ms", description="Inference request duration")
    for counter in (requests, errors, client_errors, shed):
        counter.sum.aggregation_temporality = delta
        counter.sum.is_monotonic = True
    duration.histogram.aggregation_temporality = delta
    for row in minutes:
        labels = attributes(model=row.model, version=row.version, variant=row.variant)
        start, end = row.minute * 60 * _NS, (row.minute + 1) * 60 * _NS
        requests.sum.data_points.add(
            attributes=labels, start_time_unix_nano=start, time_unix_nano=end, as_int=row.requests
        )
        errors.sum.data_points.add(attributes=labels, start_time_unix_nano=start, time_unix_nano=end, as_int=row.errors)
        client_errors.sum.data_points.add(
            attributes=labels, start_time_unix_nano=start, time_unix_nano=end, as_int=row.client_errors
        )
        shed.sum.data_points.add(attributes=labels, start_time_unix_nano=start, time_unix_nano=end, as_int=row.shed)
        duration.histogram.data_points.add(
            attributes=labels,
            start_time_unix_nano=start,
            time_unix_nano=end,
            count=row.requests,
            sum=row.latency_sum_us / 1000,
            bucket_counts=row.latency,
            explicit_bounds=[bound / 1000 for bound in LATENCY_BOUNDS_US],
        )
    resource = Resource(
        attributes=attributes(**{"service.name": "strata", "strata.node": node_name, "strata.node_id": node_id})
    )
    scope = pb.ScopeMetrics(scope=InstrumentationScope(name="strata.telemetry", version=__version__))
    scope.metrics.extend([requests, errors, client_errors, shed, duration])
    request = ExportMetricsServiceRequest(
        resource_metrics=[pb.ResourceMetrics(resource=resource, scope_metrics=[scope])]
    )
    return bytes(request.SerializeToString())


def export_size(node_id: str, node_name: str, minutes: list[MinuteRow]) -> int:
    """An upper bound on the bytes of the requests `minutes` become (`export_request`, ROWS_PER_EXPORT rows to one):
    what a batch costs while it waits for the collector. Also above what the rows themselves hold in memory (some
    500 bytes a row, its names shared with the batch)."""
    fixed = _REQUEST + 3 * (len(node_id.encode()) + len(node_name.encode()))
    size = fixed * -(-len(minutes) // ROWS_PER_EXPORT)
    for row in minutes:
        labels = len(row.model.encode()) + len(row.version.encode()) + len(row.variant.encode())
        bounds = len(LATENCY_BOUNDS_US)
        size += 4 * _SUM_POINT + _HISTOGRAM_POINT + 8 * (len(row.latency) + bounds) + 5 * labels
    return size


class OtlpExporter:
    """Queues stored batches and posts them to `endpoint` + /v1/metrics from a background thread.

    `queue_bytes` (`ServerSettings.otlp_queue_bytes`) bounds what waits (`export_size` of the batches queued and
    the one being sent): a batch that would pass it is left out, counted in `dropped_rows` and `dropped_batches`.
    `sent` and `failed` count requests the collector took, and those given up after `attempts` tries (or that
    could not be built).
    """

    def __init__(
        self, endpoint: str, *, queue_bytes: int, headers: dict[str, str] | None = None, attempts: int = 3
    ) -> None:
        self.url = endpoint.rstrip("/") + "/v1/metrics"
        self.headers = {"content-type": "application/x-protobuf", **(headers or {})}
        self.attempts = attempts
        self.queue_bytes = queue_bytes
        self.sent = 0
        self.failed = 0
        self.dropped_rows = 0
        self.dropped_batches = 0
        self._lock = threading.Lock()
        self._queued_bytes = 0  # held by `_lock`, as are the dropped counts and `_dropping`
        self._dropping = False
        self._queue: queue.Queue[tuple[str, str, list[MinuteRow], int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="strata-otlp", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        """`export_size` of the batches waiting and the one being sent."""
        with self._lock:
            return self._queued_bytes

    def __call__(self, node_id: str, node_name: str, batch: TelemetryBatch) -> None:
        if not batch.minutes:
            return
        size = export_size(node_id, node_name, batch.minutes)
        with self._lock:
            was_dropping = self._dropping
            dropping = self._dropping = self._queued_bytes + size > self.queue_bytes
            if dropping:
                self.dropped_rows += len(batch.minutes)
                self.dropped_batches += 1
            else:
                self._queued_bytes += size
                self._queue.put((node_id, node_name, batch.minutes, size))
            queued, dropped = self._queued_bytes, self.dropped_rows
        if dropping and not was_dropping:
            log.warning(
                "OTLP exports waiting for the collector hold %d bytes (at most %d); leaving telemetry out of the"
                " export until they drain (counted in strata_otlp_dropped_rows)",
                queued, self.queue_bytes,
            )  # fmt: skip
        elif was_dropping and not dropping:
            log.info("OTLP exports are queued again (%d minute rows left out so far)", dropped)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while (item := self._queue.get()) is not None:
                node_id, node_name, minutes, size = item
                try:
                    for start in range(0, len(minutes), ROWS_PER_EXPORT):
                        try:
                            payload = export_request(node_id, node_name, minutes[start : start + ROWS_PER_EXPORT])
                        except Exception:  # a row protobuf refuses must not stop the thread
                            log.exception("cannot build an OTLP export of node %s's telemetry", node_name)
                            self.failed += 1
                            continue
                        self._post(client, payload)
                finally:
                    with self._lock:
                        self._queued_bytes -= size

    def _post(self, client: httpx.Client, payload: bytes) -> None:
        for attempt in range(self.attempts):
            try:
                response = client.post(self.url, content=payload, headers=self.headers)
                if response.status_code < 300:
                    self.sent += 1
                    return
                log.warning("OTLP collector answered %d", response.status_code)
            except httpx.HTTPError as exc:
                log.warning("OTLP export failed: %s", exc)
            time.sleep(0.5 * 2**attempt)
        self.failed += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
