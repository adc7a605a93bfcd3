"""What changed between two status reports of a node: the events of `strata model history`."""

from __future__ import annotations

from strata.control.history import Change, activation_events
from strata.core.wire import ModelStatus, NodeStatus


def status(*models: ModelStatus) -> NodeStatus:
    return NodeStatus(tier="device", labels={}, profile="cpu-generic", emulated=False, agent_version="", models=models)


def running(name: str, version: str, previous: str | None = None) -> ModelStatus:
    return ModelStatus(
        name=name,
        version=version,
        variant="v",
        digest=f"sha256:{version * 64}"[:71],
        activated_at=float(version),
        previous_version=previous,
        previous_digest=f"sha256:{previous * 64}"[:71] if previous else None,
    )


def test_first_report_activations_and_changes() -> None:
    assert activation_events(None, status(running("digits", "1"))) == [
        Change("digits", "activated", "1", "v", running("digits", "1").digest, None, 1.0)
    ]
    assert activation_events(status(running("digits", "1")), status(running("digits", "1"))) == []
    [update] = activation_events(status(running("digits", "1")), status(running("digits", "2", previous="1")))
    assert (update.kind, update.version, update.previous_version) == ("activated", "2", "1")


def test_going_back_to_the_previous_slot_is_a_rollback_and_a_missing_model_a_removal() -> None:
    [back] = activation_events(status(running("digits", "2", previous="1")), status(running("digits", "1")))
    assert (back.kind, back.version, back.previous_version) == ("rolled_back", "1", "2")
    [gone] = activation_events(status(running("digits", "1"), running("faces", "4")), status(running("digits", "1")))
    assert (gone.model, gone.kind, gone.version, gone.previous_version) == ("faces", "removed", None, "4")
