"""Stored telemetry is forwarded to an OpenTelemetry collector over OTLP/HTTP, decoded here with the official
protobuf definitions by a real HTTP receiver on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from control_harness import StartServer
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from strata.control.settings import ServerSettings
from strata.core.telemetry import BUCKETS, MinuteRow, TelemetryBatch, bucket_of, encode_batch


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
