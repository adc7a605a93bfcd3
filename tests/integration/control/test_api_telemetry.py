"""Telemetry upload (exactly once, own node only), queries with percentiles and drift, and /metrics."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from control_harness import Harness, NodeCredentials, StartServer, recorded_statements
from sqlalchemy import select

from strata.control.db import TelemetryBatch as StoredBatch
from strata.control.db import TelemetryDrift, TelemetryEvent, TelemetryMinute, Variant
from strata.control.settings import ServerSettings
from strata.control.telemetry import (
    DRIFT_OVER_BUDGET_KIND,
    EXPIRED_MINUTE,
    FUTURE_KINDS,
    LOOKUP_CHUNK,
    OVER_BUDGET_KIND,
    UNKNOWN_KINDS,
)
from strata.core import telemetry
from strata.core.package import tar_bytes
from strata.core.telemetry import BUCKETS, DriftRow, EventRow, MinuteRow, TelemetryBatch, bucket_of, encode_batch
from strata.examples.digits import load_data
from strata.package_build import build_package

TELEMETRY = {"Content-Type": "application/vnd.strata.telemetry+zstd"}


def batch_for(
    node: NodeCredentials, seq: int, minute: int, requests: int, errors: int = 0, client_errors: int = 0, shed: int = 0
) -> bytes:
    latency = [0] * BUCKETS
    latency[bucket_of(800)] = requests
    row = MinuteRow(
        "digits", "1", "cpu-generic-fp32", minute, requests, errors, requests, 0, 0, latency, client_errors, shed
    )
    return encode_batch(
        TelemetryBatch(
            node_id=node.node_id,
            seq=seq,
            created=0.0,
            minutes=[row],
            events=[EventRow(minute * 60.0, "digits", "1", "cpu-generic-fp32", 800, 0, 1, "internal", "local", 2, "")]
            if errors
            else [],
            dropped={"events_sampled": 2} if seq == 1 else {},
        )
    )


def upload(
    server: Harness, node: NodeCredentials, payload: bytes, as_node: NodeCredentials | None = None
) -> dict[str, Any]:
    caller = as_node or node
    response = server.client.post(
        f"/v1/nodes/{node.node_id}/telemetry", content=payload, headers={**caller.headers, **TELEMETRY}
    )
    return {"status": response.status_code, **response.json()}


def test_each_batch_is_stored_once_and_minutes_add_up(server: Harness, make_package: Callable[..., bytes]) -> None:
    assert server.upload(make_package()).status_code == 201
    node = server.enroll("edge")
    minute = int(server.clock.now // 60)
    # 10 requests, 6 failed: 3 of them refused as the caller's fault (malformed), 2 shed by admission control (the
    # node was busy), 1 the model's or the node's
    first = batch_for(node, 1, minute, 10, errors=6, client_errors=3, shed=2)
    assert upload(server, node, first) == {"status": 200, "seq": 1, "stored": True}
    again = upload(server, node, first)
    assert again == {"status": 200, "seq": 1, "stored": False}
    assert upload(server, node, batch_for(node, 2, minute, 5, errors=1, client_errors=1))["stored"] is True

    answer = server.client.get("/v1/telemetry", params={"model": "digits"}, headers=server.admin).json()
    columns = ("node", "minute", "requests", "errors", "client_errors", "shed")
    assert [tuple(m[c] for c in columns) for m in answer["minutes"]] == [("edge", minute, 15, 7, 4, 2)]
    summary = answer["nodes"][0]
    assert (summary["requests"], summary["errors"], summary["client_errors"], summary["shed"]) == (15, 7, 4, 2)
    # Neither the callers' malformed requests nor the shed ones are the model failing, nor requests it took on: 1
    # failed of the 9 it ran, as a rollout gate counts them (the node's serving counters leave both out)
    assert summary["error_rate"] == round(1 / 9, 6)
    assert summary["client_error_rate"] == round(4 / 15, 6)
    assert summary["shed_rate"] == round(2 / 15, 6)
    assert summary["n"] == 15
    assert 0.5 <= summary["p50_ms"] <= 1.0
    assert (summary["p95_ms"], summary["p99_ms"]) == (None, None)  # 15 requests: too few for a tail percentile
    assert answer["minutes"][0]["n"] == 15
    assert summary["dropped"] == {"events_sampled": 2}
    assert server.plane.telemetry.counters.duplicates == 1


def test_a_batch_from_a_node_before_shed_is_stored_with_its_shed_requests_as_errors(
    server: Harness, make_package: Callable[..., bytes]
) -> None:
    # An agent from before `shed` sends no such column: its batch is stored, none of its errors told apart as shed
    # (they count in its error rate as they did), and a batch of a newer agent's adds to the same minute.
    assert server.upload(make_package()).status_code == 201
    node = server.enroll("edge")
    minute = int(server.clock.now // 60)
    raw = json.loads(zstandard.ZstdDecompressor().decompress(batch_for(node, 1, minute, 10, errors=3, client_errors=1)))
    del raw["minutes"]["shed"]
    old = zstandard.ZstdCompressor().compress(json.dumps(raw).encode())
    assert upload(server, node, old) == {"status": 200, "seq": 1, "stored": True}
    assert upload(server, node, batch_for(node, 2, minute, 10, errors=4, client_errors=1, shed=3))["stored"] is True
    [summary] = server.client.get("/v1/telemetry", params={"model": "digits"}, headers=server.admin).json()["nodes"]
    assert (summary["requests"], summary["errors"], summary["client_errors"], summary["shed"]) == (20, 7, 2, 3)
    assert (summary["error_rate"], summary["shed_rate"]) == (round(2 / 15, 6), round(3 / 20, 6))
    metrics = server.client.get("/metrics", headers=server.admin).text
    assert 'strata_inference_shed_total{model="digits",node="edge",version="1"} 3.0' in metrics
    assert 'strata_inference_errors_total{model="digits",node="edge",version="1"} 7.0' in metrics


def test_a_node_sends_only_its_own_telemetry(server: Harness) -> None:
    a, b = server.enroll("a"), server.enroll("b")
    minute = int(server.clock.now // 60)
    assert upload(server, b, batch_for(b, 1, minute, 1), as_node=a)["status"] == 403
    # A batch that names another node inside is refused too.
    assert upload(server, a, batch_for(b, 1, minute, 1))["status"] == 403
    response = server.client.post(
        f"/v1/nodes/{a.node_id}/telemetry", content=batch_for(a, 1, minute, 1), headers={**server.admin, **TELEMETRY}
    )
    assert response.status_code == 403  # not even the admin speaks for a node


def test_malformed_and_oversized_batches_are_refused(server: Harness) -> None:
    node = server.enroll("edge")
    assert upload(server, node, b"garbage")["status"] == 422
    minute = int(server.clock.now // 60)
    more_client_errors_than_errors = upload(server, node, batch_for(node, 1, minute, 10, errors=1, client_errors=2))
    assert more_client_errors_than_errors["status"] == 422
    assert "client_errors 2 must be between 0 and its errors (1)" in more_client_errors_than_errors["error"]
    shed_and_client_errors = upload(server, node, batch_for(node, 1, minute, 10, errors=2, client_errors=1, shed=2))
    assert shed_and_client_errors["status"] == 422
    assert (
        "shed 2 must be between 0 and its errors that were not the caller's fault (1)"
        in (shed_and_client_errors["error"])
    )
    huge = server.client.post(
        f"/v1/nodes/{node.node_id}/telemetry",
        content=b"x" * (17 << 20),
        headers={**node.headers, **TELEMETRY},
    )
    assert huge.status_code == 413


def test_counts_past_what_the_database_holds_are_refused_not_a_database_error(
    server: Harness, make_package: Callable[..., bytes]
) -> None:
    # A node's counts are claims. 2**70 requests reached the database: SQLite raised OverflowError (a 500) and
    # PostgreSQL a DataError (503 'database error', which the node retries for ever); sums of the same minute over
    # several batches went the same way.
    assert server.upload(make_package()).status_code == 201
    node = server.enroll("edge")
    minute = int(server.clock.now // 60)
    raw = json.loads(zstandard.ZstdDecompressor().decompress(batch_for(node, 1, minute, 10)))
    raw["minutes"]["requests"] = [2**70]
    huge = upload(server, node, zstandard.ZstdCompressor().compress(json.dumps(raw).encode()))
    assert huge["status"] == 422
    assert "requests: a count must be a whole number between 0 and" in huge["error"]

    assert upload(server, node, batch_for(node, 1, minute, telemetry.MAX_COUNT - 5))["stored"] is True
    past = upload(server, node, batch_for(node, 2, minute, 10))
    assert past["status"] == 422
    assert f"would count more than {telemetry.MAX_COUNT}" in past["error"]
    assert upload(server, node, batch_for(node, 3, minute + 1, 10))["stored"] is True  # the node goes on
    answer = server.client.get("/v1/telemetry", params={"model": "digits"}, headers=server.admin).json()
    assert [m["requests"] for m in answer["minutes"]] == [telemetry.MAX_COUNT - 5, 10]  # nothing of the refused batch
    # drift counts of the same minute and tensor add up as well (a JSON column: they passed 2**53 unchecked)
    drift = [DriftRow("digits", "1", minute + 2, "X", [telemetry.MAX_COUNT - 5, 1])]
    stored = TelemetryBatch(node_id=node.node_id, seq=4, created=0.0, drift=drift)
    assert upload(server, node, encode_batch(stored))["stored"] is True
    more_drift = upload(server, node, encode_batch(replace(stored, seq=5)))
    assert more_drift["status"] == 422
    assert f"drift of X would count more than {telemetry.MAX_COUNT}" in more_drift["error"]
    # a dropped kind longer than its column (a node's claim) is refused: stored cut short, the next batch's was a
    # duplicate key, taken for a resend that raced in, and that batch was acknowledged but lost
    long_kind = replace(stored, seq=6, drift=[], dropped={"k" * 33: 1})
    refused = upload(server, node, encode_batch(long_kind))
    assert refused["status"] == 422
    assert "is not one of events_sampled" in refused["error"]  # the kinds a buffer counts, each within the column


def one_request_with_drift(node: NodeCredentials, variant: str, minute: int, counts: list[int]) -> bytes:
    """A node's first batch: one request of digits 1 in `minute`, and its drift counts of X."""
    return encode_batch(
        TelemetryBatch(
            node_id=node.node_id,
            seq=1,
            created=0,
            minutes=[MinuteRow("digits", "1", variant, minute, 1)],
            drift=[DriftRow("digits", "1", minute, "X", counts)],
        )
    )


def test_drift_is_computed_against_the_packaged_reference(server: Harness, digits_onnx: Path, tmp_path: Path) -> None:
    sample = {"X": load_data().test_x[:300]}
    package = build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1", sample=sample)
    assert server.upload(tar_bytes(package)).status_code == 201
    reference = next(t for t in package.manifest.drift["tensors"] if t["tensor"] == "X")
    node = server.enroll("edge")
    minute = int(server.clock.now // 60)
    counts_same = [c * 2 for c in reference["counts"]]
    shifted = list(np.roll(np.asarray(reference["counts"]), 3))
    assert upload(
        server, node, one_request_with_drift(node, package.manifest.variant, minute, [int(c) for c in shifted])
    )["stored"]
    other = server.enroll("steady")
    assert upload(server, other, one_request_with_drift(other, package.manifest.variant, minute, counts_same))["stored"]
    nodes = {
        n["node"]: n
        for n in server.client.get("/v1/telemetry", params={"model": "digits"}, headers=server.admin).json()["nodes"]
    }
    drifting = nodes["edge"]["drift"][0]
    steady = nodes["steady"]["drift"][0]
    assert drifting["drifting"] is True
    assert drifting["p_value"] < 1e-6
    assert steady["drifting"] is False
    assert steady["psi"] < 0.01


def test_drift_references_stored_before_the_upload_refused_them_do_not_break_the_report(
    server: Harness, digits_onnx: Path, tmp_path: Path
) -> None:
    """A package stored before the upload refused two references of one tensor: the report leaves that version's
    drift out (with a warning) and answers the rest, instead of failing on every read."""
    package = build_package(
        digits_onnx, tmp_path / "pkg", name="digits", version="1", sample={"X": load_data().test_x[:300]}
    )
    assert server.upload(tar_bytes(package)).status_code == 201
    with server.plane.db.transaction() as session:
        variant = session.scalars(select(Variant)).one()
        tensors = variant.manifest["drift"]["tensors"]
        variant.manifest = {**variant.manifest, "drift": {**variant.manifest["drift"], "tensors": tensors + tensors}}
    node = server.enroll("edge")
    minute = int(server.clock.now // 60)
    assert upload(
        server, node, one_request_with_drift(node, package.manifest.variant, minute, [1] * len(tensors[0]["counts"]))
    )["stored"]
    answer = server.client.get("/v1/telemetry", params={"model": "digits"}, headers=server.admin)
    assert answer.status_code == 200, answer.text
    assert [n["node"] for n in answer.json()["nodes"]] == ["edge"]
    assert answer.json()["nodes"][0]["drift"] == []


def test_queries_and_metrics_need_the_admin(server: Harness) -> None:
    node = server.enroll("edge")
    assert server.client.get("/v1/telemetry", params={"model": "digits"}, headers=node.headers).status_code == 403
    assert server.client.get("/metrics", headers=node.headers).status_code == 403
    assert server.client.get("/metrics").status_code == 401
    assert server.client.get("/v1/telemetry", params={"model": "nope"}, headers=server.admin).status_code == 404
    text = server.client.get("/metrics", headers=server.admin).text
    assert 'strata_nodes{online="true",tier="device"} 1.0' in text
    assert "strata_telemetry_batches_total 0.0" in text


DAY = 86400.0
RETENTION = 90 * DAY


def retention_batch(node: NodeCredentials, seq: int, minutes: list[int]) -> bytes:
    """A batch with a minute row, an event and a drift row in each of `minutes`."""
    return encode_batch(
        TelemetryBatch(
            node_id=node.node_id,
            seq=seq,
            created=0.0,
            minutes=[MinuteRow("digits", "1", "cpu-generic-fp32", m, 1) for m in minutes],
            events=[
                EventRow(m * 60.0 + 30, "digits", "1", "cpu-generic-fp32", 800, 0, 1, "ok", "local", 2, "")
                for m in minutes
            ],
            drift=[DriftRow("digits", "1", m, "X", [1, 2]) for m in minutes],
        )
    )


def stored_rows(server: Harness) -> dict[str, list[Any]]:
    """What the database holds: minutes and drift by minute, events by time, batch records by seq."""
    with server.plane.db.transaction() as session:
        return {
            "minutes": sorted(session.scalars(select(TelemetryMinute.minute))),
            "events": sorted(session.scalars(select(TelemetryEvent.ts))),
            "drift": sorted(session.scalars(select(TelemetryDrift.minute))),
            "batches": sorted(session.scalars(select(StoredBatch.seq))),
        }


def test_the_retention_sweep_deletes_what_is_older_in_chunks_and_keeps_the_rest(
    server: Harness, make_package: Callable[..., bytes]
) -> None:
    assert server.upload(make_package()).status_code == 201
    node = server.enroll("edge")
    start = int(server.clock.now // 60)
    old = [start - 5 + i for i in range(5)]
    assert upload(server, node, retention_batch(node, 1, old))["stored"]
    server.clock.advance(RETENTION + 600)  # the cutoff is now start + 10 minutes
    cutoff_minute = start + 10
    new = [cutoff_minute, cutoff_minute + 1]  # the minute holding the cutoff is kept: the API still reaches it
    assert upload(server, node, retention_batch(node, 2, new))["stored"]

    requests = 'strata_inference_requests_total{model="digits",node="edge",version="1"} 7.0'
    assert requests in server.client.get("/metrics", headers=server.admin).text

    # 5 old rows of each kind, 2 per statement: every one goes, in 3 chunks
    deleted = server.plane.telemetry.sweep(RETENTION, chunk=2, pause_s=0)
    assert deleted == {"minutes": 5, "events": 5, "drift": 5, "batches": 1}
    assert stored_rows(server) == {
        "minutes": [EXPIRED_MINUTE, *new],  # the old minutes' counts, added up: out of the API's reach
        "events": [m * 60.0 + 30 for m in new],
        "drift": new,
        "batches": [2],  # batch 1 is older than the retention and the node has sent a newer one (see the rule)
    }
    assert server.plane.telemetry.sweep(RETENTION, chunk=2, pause_s=0) == dict.fromkeys(deleted, 0)
    metrics = server.client.get("/metrics", headers=server.admin).text
    assert requests in metrics  # a counter that went down would be a reset to Prometheus
    answer = server.client.get("/v1/telemetry", params={"model": "digits", "since": RETENTION}, headers=server.admin)
    assert [m["minute"] for m in answer.json()["minutes"]] == new
    for kind, count in deleted.items():
        assert f'strata_telemetry_expired_rows_total{{kind="{kind}"}} {count}.0' in metrics


def test_a_sweep_told_to_stop_ends_after_its_current_chunk(server: Harness, make_package: Callable[..., bytes]) -> None:
    assert server.upload(make_package()).status_code == 201
    node = server.enroll("edge")
    start = int(server.clock.now // 60)
    assert upload(server, node, retention_batch(node, 1, [start - 5 + i for i in range(5)]))["stored"]
    server.clock.advance(RETENTION + 600)
    stop = threading.Event()
    stop.set()  # the server is shutting down: one chunk of each kind, and no more
    deleted = server.plane.telemetry.sweep(RETENTION, chunk=2, pause_s=0, stop=stop)
    assert deleted == {"minutes": 2, "events": 2, "drift": 2, "batches": 0}
    assert server.plane.telemetry.sweep(RETENTION, chunk=2, pause_s=0)["events"] == 3  # the next sweep goes on


def test_a_batch_record_stays_while_its_node_may_still_resend_the_batch(
    server: Harness, make_package: Callable[..., bytes]
) -> None:
    assert server.upload(make_package()).status_code == 201
    node = server.enroll("edge")
    minute = int(server.clock.now // 60)
    first = retention_batch(node, 1, [minute])
    assert upload(server, node, first)["stored"]
    # The node's newest batch, however old: its acknowledgement may have been lost, so it may come again
    server.clock.advance(RETENTION + DAY)
    assert server.plane.telemetry.sweep(RETENTION, chunk=2, pause_s=0)["batches"] == 0
    assert upload(server, node, first) == {"status": 200, "seq": 1, "stored": False}
    # Superseded but within the retention: kept, and a resend of it is still refused as a duplicate
    minute = int(server.clock.now // 60)
    second = retention_batch(node, 2, [minute])
    assert upload(server, node, second)["stored"]
    server.clock.advance(3600)
    assert upload(server, node, retention_batch(node, 3, [minute + 60]))["stored"]
    assert server.plane.telemetry.sweep(RETENTION, chunk=2, pause_s=0)["batches"] == 1  # batch 1: old, superseded
    assert stored_rows(server)["batches"] == [2, 3]
    assert upload(server, node, second) == {"status": 200, "seq": 2, "stored": False}
    assert stored_rows(server)["minutes"] == [EXPIRED_MINUTE, minute, minute + 60]  # the resend was not stored


def test_the_server_sweeps_expired_telemetry_in_the_background(
    settings: ServerSettings,
    start_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    make_package: Callable[..., bytes],
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="strata.control.app"),
        start_server(replace(settings, telemetry_sweep_s=0.1)) as server,
    ):
        assert server.upload(make_package()).status_code == 201
        node = server.enroll("edge")
        assert upload(server, node, retention_batch(node, 1, [int(server.clock.now // 60) - 1]))["stored"]
        server.clock.advance(RETENTION + 60)
        deadline = time.monotonic() + 10  # the sweeper runs on the replica holding the rollout lease
        # it says what it deleted just after the deletion commits: wait for both (the server stops after the block)
        while (
            stored_rows(server)["events"] or "telemetry retention" not in caplog.text
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stored_rows(server) == {"minutes": [EXPIRED_MINUTE], "events": [], "drift": [], "batches": [1]}
        assert "telemetry retention 90d: deleted 1 minute row, 1 event, 1 drift row, 0 batch records" in caplog.text


YEAR = 365 * DAY


def test_telemetry_dated_past_the_servers_clock_is_left_out_and_counted_and_the_batch_acknowledged(
    server: Harness, make_package: Callable[..., bytes], caplog: pytest.LogCaptureFixture
) -> None:
    # A node's dates are claims: a clock a year ahead put rows past every retention cutoff (the sweep never deleted
    # them) and into every query from `since` on. The batch is still acknowledged: refused (422), the node would
    # drop its good rows with them; left unanswered, it would resend the batch for ever.
    assert server.upload(make_package()).status_code == 201
    node = server.enroll("edge")
    minute = int(server.clock.now // 60)  # the clock is 20 s into it
    kept = [minute, minute + 4]  # its row 220 s ahead, its event 250 s: within the 5 minutes a clock may run ahead
    future = [minute + 6, minute + int(YEAR // 60)]  # 340 s (its event 370 s), and a year ahead
    batch = retention_batch(node, 1, kept + future)
    with caplog.at_level(logging.WARNING, logger="strata.control.telemetry"):
        assert upload(server, node, batch) == {"status": 200, "seq": 1, "stored": True}
    # the requests of the minutes left out were served, only their time is unknown: their counts go to the series'
    # row of no time (as a minute too old for the retention's), so the totals on /metrics still count them
    assert stored_rows(server) == {
        "minutes": [EXPIRED_MINUTE, *kept],
        "events": [m * 60.0 + 30 for m in kept],
        "drift": kept,
        "batches": [1],
    }
    warning = f"node edge ({node.node_id}) sent telemetry dated up to {YEAR + 10:.0f}s past the server's clock"
    assert warning in caplog.text
    assert (
        "left out 2 minute rows, 2 events, 2 drift rows (2 requests in those minutes: counted in the totals on"
        " /metrics, not in any time window)"
    ) in caplog.text
    # counted where an operator looks: the node's dropped telemetry, and /metrics
    answer = server.client.get("/v1/telemetry", params={"model": "digits"}, headers=server.admin).json()
    assert answer["nodes"][0]["dropped"] == {"future_minutes": 2, "future_events": 2, "future_drift": 2}
    metrics = server.client.get("/metrics", headers=server.admin).text
    for kind in ("minutes", "events", "drift"):
        assert f'strata_telemetry_future_rows_total{{kind="{kind}"}} 2.0' in metrics
    requests = [line for line in metrics.splitlines() if line.startswith("strata_inference_requests_total{")]
    assert len(requests) == 1
    assert requests[0].endswith(" 4.0")  # every request the node reported, the future minutes' included
    # a resend is a duplicate: nothing stored, nothing counted again
    assert upload(server, node, batch) == {"status": 200, "seq": 1, "stored": False}
    assert server.plane.telemetry.counters.future == {"minutes": 2, "events": 2, "drift": 2}
    # and the retention sweep leaves nothing behind once the retention has passed
    server.clock.advance(RETENTION + 600)
    assert server.plane.telemetry.sweep(RETENTION, chunk=2, pause_s=0) == {
        "minutes": 2, "events": 2, "drift": 2, "batches": 0
    }  # fmt: skip
    assert stored_rows(server) == {"minutes": [EXPIRED_MINUTE], "events": [], "drift": [], "batches": [1]}


def test_the_kinds_counting_future_rows_fit_the_dropped_column_and_no_batch_may_name_them() -> None:
    # a node could otherwise forge (or add to) the control plane's own count of what it left out
    server_kinds = {*FUTURE_KINDS.values(), *UNKNOWN_KINDS.values(), OVER_BUDGET_KIND, DRIFT_OVER_BUDGET_KIND}
    assert len(server_kinds) == 7
    assert all(len(kind) <= telemetry.MAX_DROPPED_KIND for kind in server_kinds)
    assert not server_kinds & set(telemetry.DROPPED_KINDS)


def test_sampled_events_past_a_nodes_budget_are_left_out_errors_last_and_counted(
    settings: ServerSettings,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    make_package: Callable[..., bytes],
) -> None:
    # Each event is a row: uploading full batches back to back, one compromised node added about 50,000 rows a
    # second. Its minutes (the counts) are not budgeted; its events are, to a burst and then a rate.
    monkeypatch.setattr("strata.control.telemetry.EVENT_BURST", 30)  # the budget a server starts with: scaled down
    monkeypatch.setattr("strata.control.telemetry.EVENTS_PER_S", 1.0)
    with start_server(settings) as server:
        assert server.upload(make_package()).status_code == 201
        node = server.enroll("edge")
        minute = int(server.clock.now // 60)

        def batch(seq: int, errors: int, sampled: int) -> bytes:
            events = [
                EventRow(minute * 60.0 + i / 100, "digits", "1", "cpu-generic-fp32", 800, 0, 1, status, "local",
                         priority, "")
                for i, (status, priority) in enumerate([("ok", 0)] * sampled + [("internal", 2)] * errors)
            ]  # fmt: skip
            row = MinuteRow("digits", "1", "cpu-generic-fp32", minute, 100, errors)
            return encode_batch(TelemetryBatch(node.node_id, seq, 0.0, minutes=[row], events=events))

        assert upload(server, node, batch(1, errors=5, sampled=20))["stored"]  # 25 of 30: all kept
        assert upload(server, node, batch(2, errors=5, sampled=20))["stored"]  # 5 left: the errors
        server.clock.advance(10)  # 10 more
        assert upload(server, node, batch(3, errors=0, sampled=20))["stored"]
        with server.plane.db.transaction() as session:
            statuses = sorted(session.scalars(select(TelemetryEvent.status)))
        assert statuses == ["internal"] * 10 + ["ok"] * 30
        answer = server.client.get("/v1/telemetry", params={"model": "digits"}, headers=server.admin).json()
        assert answer["nodes"][0]["dropped"] == {OVER_BUDGET_KIND: 30}
        assert answer["minutes"][0]["requests"] == 300  # the counts all stored


def drift_batch(node: NodeCredentials, seq: int, minute: int, drift_minutes: Iterable[int], requests: int) -> bytes:
    """A batch of one minute row (`requests` in `minute`) and drift rows of tensors X and Y in each of
    `drift_minutes`."""
    drift = [DriftRow("digits", "1", m, tensor, [1, 2]) for m in drift_minutes for tensor in ("X", "Y")]
    row = MinuteRow("digits", "1", "cpu-generic-fp32", minute, requests)
    return encode_batch(TelemetryBatch(node.node_id, seq, 0.0, minutes=[row], drift=drift))


def test_drift_rows_past_a_nodes_budget_are_left_out_oldest_first_and_counted(
    settings: ServerSettings,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    make_package: Callable[..., bytes],
) -> None:
    # Each drift row is a row kept for the whole retention: four 672-byte uploads of one node stored 200,000 of them
    # (+45 MB), while its events were held to a budget. Drift rows now are too: a burst, then a rate.
    monkeypatch.setattr("strata.control.telemetry.DRIFT_BURST", 30)  # the budget a server starts with: scaled down
    monkeypatch.setattr("strata.control.telemetry.DRIFT_ROWS_PER_S", 1.0)
    with start_server(settings) as server:
        assert server.upload(make_package()).status_code == 201
        node = server.enroll("edge")
        minute = int(server.clock.now // 60)

        def batch(seq: int, minutes: range) -> bytes:
            return drift_batch(node, seq, minute, minutes, requests=100)

        assert upload(server, node, batch(1, range(minute - 9, minute + 1)))["stored"]  # 20 of 30: all kept
        assert upload(server, node, batch(2, range(minute - 19, minute - 9)))["stored"]  # 20 more: 10 left
        server.clock.advance(4)  # 4 more
        assert upload(server, node, batch(3, range(minute - 29, minute - 19)))["stored"]
        kept = stored_rows(server)["drift"]
        assert len(kept) == 34
        # past the budget the newest minutes of a batch are kept: what the drift gates read
        assert kept == sorted([*range(minute - 21, minute - 19), *range(minute - 14, minute + 1)] * 2)
        answer = server.client.get("/v1/telemetry", params={"model": "digits"}, headers=server.admin).json()
        assert answer["nodes"][0]["dropped"] == {DRIFT_OVER_BUDGET_KIND: 26}
        assert answer["minutes"][0]["requests"] == 300  # the counts all stored


def test_drift_rows_adding_to_stored_ones_and_resent_batches_take_nothing_from_the_budget(
    settings: ServerSettings,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    make_package: Callable[..., bytes],
) -> None:
    # An agent sends the minute under way in each upload (every 10 s): six times a minute the same keys. Charged per
    # row sent, an honest node of 80 tensors used 480 of its 120 a minute and lost the same 60 tensors' drift for
    # good within the hour; and a resent batch, stored once, took from the budget again.
    monkeypatch.setattr("strata.control.telemetry.DRIFT_BURST", 4)
    monkeypatch.setattr("strata.control.telemetry.DRIFT_ROWS_PER_S", 0.0)
    with start_server(settings) as server:
        assert server.upload(make_package()).status_code == 201
        node = server.enroll("edge")
        minute = int(server.clock.now // 60)

        def batch(seq: int, minutes: list[int]) -> bytes:
            return drift_batch(node, seq, minute, minutes, requests=10)

        for seq in range(1, 7):  # the minute under way, six uploads: two new keys, then additions to them
            assert upload(server, node, batch(seq, [minute]))["stored"]
        assert upload(server, node, batch(7, [minute + 1]))["stored"]  # the budget's last two keys
        for _ in range(2):  # resent: not stored again, nothing taken
            assert not upload(server, node, batch(7, [minute + 1]))["stored"]
        assert upload(server, node, batch(8, [minute + 2]))["stored"]  # past it: left out and counted
        with server.plane.db.transaction() as session:
            counts = {(row.minute, row.tensor): list(row.counts) for row in session.scalars(select(TelemetryDrift))}
        assert counts == {
            (minute, "X"): [6, 12],
            (minute, "Y"): [6, 12],
            (minute + 1, "X"): [1, 2],
            (minute + 1, "Y"): [1, 2],
        }
        answer = server.client.get("/v1/telemetry", params={"model": "digits"}, headers=server.admin).json()
        assert answer["nodes"][0]["dropped"] == {DRIFT_OVER_BUDGET_KIND: 2}


def test_ingest_reads_the_rows_a_batch_adds_to_a_statement_per_chunk_not_one_per_row(
    server: Harness, make_package: Callable[..., bytes]
) -> None:
    # One `session.get` per drift row held SQLite's write lock for 24 s over one node's 50,000-row upload (other
    # nodes' status reports failed with 503, the rollouts lease went unrenewed); minutes did the same, 2,000 a batch.
    assert server.upload(make_package()).status_code == 201
    node = server.enroll("edge")
    now = int(server.clock.now // 60)
    minutes = [MinuteRow("digits", "1", "cpu-generic-fp32", now - k, 2, 1, 2) for k in range(600)]
    drift = [DriftRow("digits", "1", now - k // 2, "XY"[k % 2], [1, 2]) for k in range(1200)]
    repeated = [minutes[0], drift[0]]  # a key twice in one batch adds up too
    chunks = -(-len(minutes) // LOOKUP_CHUNK) + -(-len(drift) // LOOKUP_CHUNK)
    for seq in (1, 2):  # the second batch adds to every row the first stored
        payload = encode_batch(
            TelemetryBatch(node.node_id, seq, 0.0, minutes=[*minutes, repeated[0]], drift=[*drift, repeated[1]])
        )
        with recorded_statements(server.plane.db.engine) as statements:
            assert upload(server, node, payload)["stored"]
        selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        assert len(selects) <= chunks + 10, len(selects)  # the node, its batch record, the registry, dropped kinds
    with server.plane.db.transaction() as session:
        requests = sorted(session.scalars(select(TelemetryMinute.requests)))
        counts = sorted(tuple(c) for c in session.scalars(select(TelemetryDrift.counts)))
    assert requests == [4] * 599 + [8]  # each row twice, the repeated one four times
    assert counts == [(2, 4)] * 1199 + [(4, 8)]


def test_telemetry_of_model_versions_the_registry_does_not_know_is_left_out_and_counted(
    server: Harness, make_package: Callable[..., bytes], caplog: pytest.LogCaptureFixture
) -> None:
    # A node's names are claims: minute rows dated 1970 under invented model names were folded into EXPIRED_MINUTE
    # rows the sweep never deletes, each a /metrics series for ever (50 uploads of 4.9 KB: 100,000 series, a 31 MB
    # scrape). Rows of a variant (minutes) or model version (drift) the registry does not know are left out and
    # counted, as rows dated too far ahead are; the batch is still stored and acknowledged.
    assert server.upload(make_package()).status_code == 201
    node = server.enroll("edge")
    minute = int(server.clock.now // 60)
    ours = MinuteRow("digits", "1", "cpu-generic-fp32", minute, 3)
    invented = [
        MinuteRow("digits", "1", "made-up-variant", minute, 1),
        MinuteRow("digits", "9", "cpu-generic-fp32", minute, 1),
        *(MinuteRow(f"m-{k}", "v", "x", 0, 1) for k in range(5)),  # dated 1970: once folded, kept for ever
    ]
    drift = [DriftRow("digits", "1", minute, "X", [1, 2]), DriftRow("digits", "9", minute, "X", [1, 2])]
    batch = encode_batch(TelemetryBatch(node.node_id, 1, 0.0, minutes=[ours, *invented], drift=drift))
    with caplog.at_level(logging.WARNING, logger="strata.control.telemetry"):
        assert upload(server, node, batch) == {"status": 200, "seq": 1, "stored": True}
    assert stored_rows(server) == {"minutes": [minute], "events": [], "drift": [minute], "batches": [1]}
    assert f"node edge ({node.node_id}) sent telemetry of 7 model versions the registry does not know" in caplog.text
    assert "(digits 1, digits 9, m-0 v, ...); left out 7 minute rows, 1 drift row" in caplog.text
    answer = server.client.get("/v1/telemetry", params={"model": "digits"}, headers=server.admin).json()
    assert answer["nodes"][0]["dropped"] == {"unknown_minutes": 7, "unknown_drift": 1}
    metrics = server.client.get("/metrics", headers=server.admin).text
    series = [line for line in metrics.splitlines() if line.startswith("strata_inference_requests_total{")]
    assert series == ['strata_inference_requests_total{model="digits",node="edge",version="1"} 3.0']
    assert 'strata_telemetry_unknown_rows_total{kind="minutes"} 7.0' in metrics
    assert 'strata_telemetry_unknown_rows_total{kind="drift"} 1.0' in metrics
    # long after, the sweep leaves the node's one series behind, and nothing of the invented names
    server.clock.advance(400 * DAY)
    server.plane.telemetry.sweep(RETENTION, chunk=2, pause_s=0)
    with server.plane.db.transaction() as session:
        assert session.execute(select(TelemetryMinute.model, TelemetryMinute.minute)).all() == [
            ("digits", EXPIRED_MINUTE)
        ]


def test_telemetry_older_than_the_retention_is_not_stored_only_to_be_swept(
    server: Harness, make_package: Callable[..., bytes]
) -> None:
    # A node back after a long outage sends what its buffer kept. What the sweep would delete at once is not stored:
    # events and drift are left out (counted as expired), a minute's counts go to its series' expired row at once,
    # as the sweep's would, so the /metrics request counters count every request the node reported.
    assert server.upload(make_package()).status_code == 201
    node = server.enroll("edge")
    first_kept = int((server.clock.now - RETENTION) // 60)  # the minute holding the cutoff: the API still reaches it
    minutes = [first_kept - 2, first_kept - 1, first_kept, int(server.clock.now // 60)]
    assert upload(server, node, retention_batch(node, 1, minutes)) == {"status": 200, "seq": 1, "stored": True}
    kept = minutes[2:]
    assert stored_rows(server) == {
        "minutes": [EXPIRED_MINUTE, *kept],
        "events": [m * 60.0 + 30 for m in kept],  # each 30 s into its minute; the cutoff is 20 s into `first_kept`
        "drift": kept,
        "batches": [1],
    }
    metrics = server.client.get("/metrics", headers=server.admin).text
    assert 'strata_inference_requests_total{model="digits",node="edge",version="1"} 4.0' in metrics
    for kind in ("minutes", "events", "drift"):
        assert f'strata_telemetry_expired_rows_total{{kind="{kind}"}} 2.0' in metrics
    nothing = {"minutes": 0, "events": 0, "drift": 0, "batches": 0}
    assert server.plane.telemetry.sweep(RETENTION, chunk=2, pause_s=0) == nothing


def test_a_telemetry_query_reads_a_bounded_number_of_rows(
    server: Harness, make_package: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`since` reaches back 90 days over the whole fleet: 100,000 stored minutes made a 25 MB answer in 7 s, all
    held by the server, and a read token could ask again and again. Past the bound the query is refused (422)."""
    monkeypatch.setattr("strata.control.api.telemetry.MAX_QUERY_ROWS", 50)
    assert server.upload(make_package()).status_code == 201
    nodes = [server.enroll(f"edge-{k}") for k in range(2)]
    now = int(server.clock.now // 60)
    row = {"model": "digits", "version": "1", "variant": "v", "requests": 1, "errors": 0, "items": 1}
    timing = {"latency_sum_us": 1, "queue_sum_us": 0, "latency": [1] + [0] * (BUCKETS - 1)}
    with server.plane.db.transaction() as session:
        for node in nodes:
            for k in range(30):
                session.add(TelemetryMinute(node_id=node.node_id, minute=now - k, **row, **timing))
    asked = {"model": "digits", "since": 90 * 86400}
    refused = server.client.get("/v1/telemetry", params=asked, headers=server.admin)
    assert refused.status_code == 422, refused.text
    assert "more than 50 rows of telemetry match: ask for one node" in refused.json()["error"]
    one = server.client.get("/v1/telemetry", params={**asked, "node": "edge-0"}, headers=server.admin)
    assert one.status_code == 200, one.text
    assert len(one.json()["minutes"]) == 30
