"""Stored telemetry is forwarded to an OpenTelemetry collector over OTLP/HTTP, decoded here with the official
protobuf definitions by a real HTTP receiver on loopback; against a collector that never answers, what waits for it
stays within its byte budget."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from control_harness import StartServer
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from strata.control.otlp import ROWS_PER_EXPORT, OtlpExporter, export_request, export_size
from strata.control.settings import ServerSettings
from strata.core.telemetry import (
    BUCKETS,
    MAX_BATCH_MINUTES,
    MAX_COUNT,
    MinuteRow,
    TelemetryBatch,
    bucket_of,
    encode_batch,
)


@pytest.fixture
def collector() -> Iterator[tuple[str, list[ExportMetricsServiceRequest]]]:
    received: list[ExportMetricsServiceRequest] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            assert self.path == "/v1/metrics"
            assert self.headers["Content-Type"] == "application/x-protobuf"
            received.append(ExportMetricsServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()


def test_minutes_arrive_as_otlp_sums_and_histograms(
    settings: ServerSettings,
    start_server: StartServer,
    collector: tuple[str, list[ExportMetricsServiceRequest]],
    make_package: Callable[..., bytes],
) -> None:
    endpoint, received = collector
    with start_server(replace(settings, otlp_endpoint=endpoint)) as server:
        assert server.upload(make_package(version="2")).status_code == 201
        node = server.enroll("edge")
        minute = int(server.clock.now // 60)
        latency = [0] * BUCKETS
        latency[bucket_of(1500)] = 40
        payload = encode_batch(
            TelemetryBatch(
                node_id=node.node_id,
                seq=1,
                created=0,
                minutes=[
                    MinuteRow(
                        "digits",
                        "2",
                        "cpu-generic-fp32",
                        minute,
                        40,
                        4,
                        40,
                        60_000,
                        0,
                        latency,
                        client_errors=2,
                        shed=1,
                    )
                ],
            )
        )
        response = server.client.post(
            f"/v1/nodes/{node.node_id}/telemetry",
            content=payload,
            headers={**node.headers, "Content-Type": "application/vnd.strata.telemetry+zstd"},
        )
        assert response.status_code == 200
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(received) == 1
    resource_metrics = received[0].resource_metrics[0]
    attributes = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
    assert attributes["strata.node"] == "edge"
    metrics = {m.name: m for m in resource_metrics.scope_metrics[0].metrics}
    assert metrics["strata.inference.requests"].sum.data_points[0].as_int == 40
    assert metrics["strata.inference.errors"].sum.data_points[0].as_int == 4
    assert metrics["strata.inference.client_errors"].sum.data_points[0].as_int == 2
    assert metrics["strata.inference.shed"].sum.data_points[0].as_int == 1
    histogram = metrics["strata.inference.duration"].histogram.data_points[0]
    assert histogram.count == 40
    assert histogram.sum == pytest.approx(60.0)
    assert sum(histogram.bucket_counts) == 40
    assert histogram.start_time_unix_nano == minute * 60 * 10**9
    point_attributes = {a.key: a.value.string_value for a in histogram.attributes}
    assert point_attributes == {"model": "digits", "version": "2", "variant": "cpu-generic-fp32"}


@pytest.fixture
def silent_collector() -> Iterator[str]:
    """A collector that accepts connections and never answers (hung, or overloaded)."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(100)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(hole.accept()[0])
            except OSError:  # closed below
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{hole.getsockname()[1]}"
    hole.close()
    for connection in held:
        connection.close()


def long_rows(minute: int, count: int = MAX_BATCH_MINUTES, text: str = "x") -> list[MinuteRow]:
    """Rows with the longest names a batch takes: some 5 MB of OTLP from a 6 KB upload."""
    return [
        MinuteRow(f"m{i:05d}".ljust(128, text), "v".ljust(128, text), "z".ljust(128, text), minute, 1, 0, 1, 0, 0,
                  [1] + [0] * (BUCKETS - 1))
        for i in range(count)
    ]  # fmt: skip


def test_export_size_bounds_the_requests_a_batch_becomes() -> None:
    widest = [  # four-byte characters, every count at its largest
        replace(row, requests=MAX_COUNT, errors=MAX_COUNT, latency_sum_us=MAX_COUNT, latency=[MAX_COUNT] * BUCKETS)
        for row in long_rows(28_000_000, text="\U0001f600")
    ]
    shortest = [MinuteRow("a", "1", "c", 0)]
    for rows in (long_rows(28_000_000), widest, shortest):
        payloads = [
            export_request("n" * 36, "edge-" + "\u00e9" * 60, rows[start : start + ROWS_PER_EXPORT])
            for start in range(0, len(rows), ROWS_PER_EXPORT)
        ]
        actual = sum(len(payload) for payload in payloads)
        assert actual <= export_size("n" * 36, "edge-" + "\u00e9" * 60, rows) <= 2 * actual + 8192


def test_a_large_batch_arrives_in_requests_of_a_bounded_size(
    collector: tuple[str, list[ExportMetricsServiceRequest]],
) -> None:
    endpoint, received = collector
    exporter = OtlpExporter(endpoint, queue_bytes=64 << 20)
    try:
        exporter("n" * 36, "edge", TelemetryBatch(node_id="n" * 36, seq=1, created=0, minutes=long_rows(100)))
        deadline = time.monotonic() + 10
        while exporter.sent < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        exporter.close()
    assert exporter.sent == len(received) == -(-MAX_BATCH_MINUTES // ROWS_PER_EXPORT)
    points = [len(r.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points) for r in received]
    assert sum(points) == MAX_BATCH_MINUTES
    assert max(points) <= ROWS_PER_EXPORT
    assert exporter.queued_bytes == 0


def test_a_collector_that_never_answers_holds_what_waits_to_the_budget(
    settings: ServerSettings,
    start_server: StartServer,
    silent_collector: str,
    make_package: Callable[..., bytes],
) -> None:
    # Each upload is a few KB (a registered model's longest names, a minute to a row) and becomes one export
    # request of about a MB; the budget holds three (one being sent).
    rows = ROWS_PER_EXPORT
    name, version = "m" * 128, "v" * 128

    def minutes(now: int) -> list[MinuteRow]:
        return [
            replace(row, model=name, version=version, variant="cpu-generic-fp32", minute=now - i)
            for i, row in enumerate(long_rows(0, rows))
        ]

    one = export_size("n" * 32, "edge", minutes(0))
    budget = 3 * one + one // 2
    uploads = 8
    with start_server(replace(settings, otlp_endpoint=silent_collector, otlp_queue_bytes=budget)) as server:
        assert server.upload(make_package(name=name, version=version)).status_code == 201
        node = server.enroll("edge")
        assert len(node.node_id) == 32
        minute = int(server.clock.now // 60)
        for seq in range(1, uploads + 1):
            batch = TelemetryBatch(node_id=node.node_id, seq=seq, created=0, minutes=minutes(minute))
            response = server.client.post(
                f"/v1/nodes/{node.node_id}/telemetry",
                content=encode_batch(batch),
                headers={**node.headers, "Content-Type": "application/vnd.strata.telemetry+zstd"},
            )
            assert response.status_code == 200  # stored all the same: the node never resends for the collector
        (exporter,) = server.plane.telemetry.exporters
        assert isinstance(exporter, OtlpExporter)
        # Nothing came back from the collector: what was queued is still held (or in flight) and counted, and
        # what did not fit was left out and counted. (A fourth fits only if the first gave up its three tries.)
        assert exporter.sent == 0
        assert 0 < exporter.queued_bytes <= budget
        assert exporter.dropped_batches >= uploads - 3 - 1
        assert exporter.dropped_rows == exporter.dropped_batches * rows
        assert exporter.queued_bytes == (uploads - exporter.dropped_batches - exporter.failed) * one
        text = server.client.get("/metrics", headers=server.admin).text
        metrics = dict(line.split(" ") for line in text.splitlines() if line.startswith("strata_otlp_"))
        assert float(metrics["strata_otlp_dropped_rows_total"]) == exporter.dropped_rows
        assert float(metrics["strata_otlp_queued_bytes"]) == exporter.queued_bytes
        assert float(metrics["strata_otlp_exports_sent_total"]) == 0
