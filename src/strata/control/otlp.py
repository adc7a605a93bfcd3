"""Forward stored telemetry to an OpenTelemetry collector over OTLP/HTTP (protobuf), when configured.

Each minute aggregate becomes delta data points of five metrics, stamped with the minute they describe:
`strata.inference.requests`, `strata.inference.errors`, `strata.inference.client_errors` (the part of the errors
that was the caller's fault) and `strata.inference.shed` (the part shed by admission control; monotonic sums) and
`strata.inference.duration`
(an explicit-bucket histogram in milliseconds). Resource attributes name the node. Exports run on a thread
of their own and retry a few times; the control plane's own copy never depends on the collector.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import httpx

from strata import __version__
from strata.core.telemetry import LATENCY_BOUNDS_US, MinuteRow, TelemetryBatch

log = logging.getLogger(__name__)

_NS = 1_000_000_000


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


class OtlpExporter:
    """Queues stored batches and posts them to `endpoint` + /v1/metrics from a background thread."""

    def __init__(self, endpoint: str, headers: dict[str, str] | None = None, attempts: int = 3) -> None:
        self.url = endpoint.rstrip("/") + "/v1/metrics"
        self.headers = {"content-type": "application/x-protobuf", **(headers or {})}
        self.attempts = attempts
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=10_000)
        self._thread = threading.Thread(target=self._run, name="strata-otlp", daemon=True)
        self._thread.start()

    def __call__(self, node_id: str, node_name: str, batch: TelemetryBatch) -> None:
        if batch.minutes:
            try:
                self._queue.put_nowait(export_request(node_id, node_name, batch.minutes))
            except queue.Full:
                self.failed += 1

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while (payload := self._queue.get()) is not None:
                for attempt in range(self.attempts):
                    try:
                        response = client.post(self.url, content=payload, headers=self.headers)
                        if response.status_code < 300:
                            self.sent += 1
                            break
                        log.warning("OTLP collector answered %d", response.status_code)
                    except httpx.HTTPError as exc:
                        log.warning("OTLP export failed: %s", exc)
                    time.sleep(0.5 * 2**attempt)
                else:
                    self.failed += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
