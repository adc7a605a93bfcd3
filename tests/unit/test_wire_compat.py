"""New status fields are additive: reports from older agents parse, and new ones round-trip."""

from __future__ import annotations

import pytest

from strata.core.wire import Failure, ModelStatus, NodeStatus, ProtocolError, ServingCounters

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
