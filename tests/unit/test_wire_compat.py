"""New status fields are additive: reports from older agents parse, and new ones round-trip."""

from __future__ import annotations

import hashlib
import json

import pytest
import zstandard

from strata.core.hashing import canonical_json
from strata.core.telemetry import BATCH_FORMAT, BUCKETS, decode_batch
from strata.core.wire import (
    MAX_LOG_LINES,
    DesiredModel,
    DesiredState,
    EnrollResponse,
    Failure,
    LogRequest,
    ModelStatus,
    NodeStatus,
    ProtocolError,
    ServingCounters,
    VariantRef,
)

OLD_REPORT = {
    "tier": "device",
    "labels": {"site": "lab"},
    "profile": "cpu-generic",
    "models": [{"name": "digits", "version": "1", "variant": "v", "digest": "sha256:" + "a" * 64, "activated_at": 5}],
    "failures": [{"model": "digits", "version": "2", "variant": None, "reason": "golden check failed", "at": 7.0}],
}


def test_a_report_without_the_new_fields_still_parses() -> None:
    status = NodeStatus.from_json(OLD_REPORT)
    assert status.models[0].serving is None
    assert status.models[0].probation is None
    assert status.failures[0].kind == "other"
    assert "serving" not in status.models[0].to_json()


def test_new_fields_round_trip_and_are_checked() -> None:
    model = ModelStatus("digits", "2", "v", "sha256:" + "b" * 64, 9.0, serving=ServingCounters(40, 2, 3.5, 9.0))
    model = ModelStatus(**{**model.__dict__, "probation": "running"})
    failure = Failure("digits", "3", None, "probation failed", 1.0, kind="probation")
    status = NodeStatus("device", {}, "cpu-generic", False, "", (model,), (failure,))
    assert NodeStatus.from_json(status.to_json()) == status
    assert status.models[0].serving is not None
    assert status.models[0].serving.error_rate == 0.05
    unknown_kind = Failure.from_json({**failure.to_json(), "kind": "cosmic-ray"})
    assert unknown_kind.kind == "other"
    with pytest.raises(ProtocolError):
        ModelStatus.from_json({**model.to_json(), "probation": "maybe"})
    with pytest.raises(ProtocolError):
        ServingCounters.from_json({"requests": 1, "errors": 2, "latency_p95_ms": None, "since": 0})


def test_unsigned_variants_keep_their_shape_and_etag() -> None:
    raw = {
        "id": "v",
        "profile": "cpu-generic",
        "runtime": "onnxruntime",
        "precision": "fp32",
        "digest": "sha256:" + "a" * 64,
        "blob": "b" * 64,
        "size": 3,
    }
    unsigned = VariantRef.from_json(raw)
    assert unsigned.signature is None
    assert unsigned.to_json() == raw
    state = DesiredState("n1", (DesiredModel("digits", "1", "1", (unsigned,)),))
    document = {"node_id": "n1", "models": [{"name": "digits", "version": "1", "deployment": "1", "variants": [raw]}]}
    before = f'"sha256:{hashlib.sha256(canonical_json(document)).hexdigest()}"'
    assert state.etag == before
    signed = VariantRef.from_json({**raw, "signature": "c" * 64})
    assert signed.to_json()["signature"] == "c" * 64
    with pytest.raises(ProtocolError, match="signature"):
        VariantRef.from_json({**raw, "signature": "not-a-hash"})


def test_enrollment_answers_and_reports_without_supply_fields_still_parse() -> None:
    plain = {"node_id": "n1", "certificate": "CERT", "ca": "CA", "not_after": 1.0}
    old = EnrollResponse.from_json(plain)
    assert (old.release_keys, dict(old.tuf_roots)) == ((), {})
    assert old.to_json() == plain
    pinned = EnrollResponse("n1", "CERT", "CA", 1.0, ("PEM",), {"image": "{}", "director": "{}"})
    assert EnrollResponse.from_json(pinned.to_json()) == pinned
    with pytest.raises(ProtocolError):
        EnrollResponse.from_json({**plain, "release_keys": [1]})
    assert NodeStatus.from_json(OLD_REPORT).supply is None
    status = NodeStatus.from_json({**OLD_REPORT, "supply": "verified"})
    assert status.to_json()["supply"] == "verified"
    with pytest.raises(ProtocolError, match="supply"):
        NodeStatus.from_json({**OLD_REPORT, "supply": "trust-me"})
    assert Failure.from_json({**OLD_REPORT["failures"][0], "kind": "tuf"}).kind == "tuf"


def test_a_log_request_is_additive_in_the_desired_state() -> None:
    old = {"node_id": "n1", "models": []}
    assert DesiredState.from_json(old).log_request is None  # a server from before it
    # An agent from before it reads a desired state as this one does: keys it does not know are left alone.
    assert DesiredState.from_json({**old, "from_a_newer_server": {"id": 1}}) == DesiredState("n1", ())
    asked = DesiredState("n1", (), log_request=LogRequest("ab12", 200))
    assert DesiredState.from_json(asked.to_json()) == asked
    assert asked.to_json()["log_request"] == {"id": "ab12", "lines": 200}
    assert DesiredState("n1", ()).to_json() == old  # without one: the shape and ETag it always had
    assert asked.etag != DesiredState("n1", ()).etag  # the ask changes the ETag: it wakes the node's long poll
    for bad in ({"id": "ab12", "lines": 0}, {"id": "../x", "lines": 5}, {"id": "ab12", "lines": MAX_LOG_LINES + 1}):
        with pytest.raises(ProtocolError, match="log request"):
            DesiredState.from_json({**old, "log_request": bad})


@pytest.mark.parametrize("columns", [{}, {"client_errors": [5, 0]}], ids=["before-client-errors", "before-shed"])
def test_a_telemetry_batch_from_a_node_before_client_errors_or_shed_decodes_with_none(
    columns: dict[str, list[int]],
) -> None:
    # What an agent from before `client_errors` (or from before `shed`) sent: every failed request in `errors`, none
    # (or only the caller's) told apart.
    latency = [0] * BUCKETS
    latency[4] = 30
    old = {
        "format": BATCH_FORMAT,
        "node": "n1",
        "seq": 4,
        "created": 1000.5,
        "dropped": {},
        "minutes": {
            "minute": [29_000_000, 1],
            "model": [0, 0],
            "version": [1, 1],
            "variant": [2, 2],
            "requests": [30, 30],
            "errors": [23, 0],
            "items": [30, 30],
            "latency_sum_us": [24_000, 24_000],
            "queue_sum_us": [0, 0],
            "latency": [latency, latency],
            **columns,
        },
        "events": {key: [] for key in ("ts_ms", "model", "version", "variant", "latency_us", "queue_us", "batch")}
        | {key: [] for key in ("status", "tier", "priority", "summary")},
        "drift": {"minute": [], "model": [], "version": [], "tensor": [], "counts": []},
        "strings": ["digits", "1", "cpu-generic-fp32"],
    }
    batch = decode_batch(zstandard.ZstdCompressor().compress(json.dumps(old).encode()))
    client_errors = columns.get("client_errors", [0, 0])
    assert [(m.minute, m.requests, m.errors, m.client_errors, m.shed) for m in batch.minutes] == [
        (29_000_000, 30, 23, client_errors[0], 0),
        (29_000_001, 30, 0, 0, 0),
    ]
