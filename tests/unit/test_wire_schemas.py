"""The failure record is one shape: the agent's state file, its status report and the control plane's schema.

Every kind the agent can record (mypy holds the agent to `FailureKind`) reaches the control plane as itself; the
pydantic body the API validates matches the wire dataclass field by field.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from strata.agent.state import FailureRecord, NodeState
from strata.agent.store import ArtifactStore
from strata.control.schemas import FailureBody, NodeStatusBody
from strata.core.wire import FAILURE_KINDS, Failure, FailureKind, NodeStatus

STATUS = {"tier": "device", "labels": {}, "profile": "cpu-generic"}


def test_failure_kinds_are_the_literal_and_include_vault() -> None:
    assert typing.get_args(FailureKind) == FAILURE_KINDS
    assert "vault" in FAILURE_KINDS  # the agent records it when its vault worker is down
    assert FailureRecord is Failure  # the state file keeps the record the report carries


@pytest.mark.parametrize("kind", FAILURE_KINDS)
def test_every_kind_survives_the_state_file_the_wire_and_the_api(kind: FailureKind, tmp_path: Path) -> None:
    record = Failure("digits", "2", "cpu", "it broke", 7.0, 3, kind)
    store = ArtifactStore(tmp_path)
    store.save_state(NodeState().with_failure("sha256:" + "a" * 64, record))
    (kept,) = store.load_state().failures.values()
    assert kept == record
    status = NodeStatus("device", {}, "cpu-generic", False, "", (), (kept,))
    sent = json.loads(json.dumps(status.to_json()))
    assert NodeStatus.from_json(sent).failures == (record,)
    # The server's path: the API body validates the report, the service reads it back through the wire type.
    assert NodeStatus.from_json(NodeStatusBody.model_validate(sent).model_dump()).failures == (record,)


def test_an_unknown_kind_reads_as_other_in_the_api_as_on_the_wire() -> None:
    raw = {**Failure("digits", "2", None, "?", 1.0).to_json(), "kind": "cosmic-ray"}
    assert FailureBody.model_validate(raw).kind == "other"
    assert Failure.from_json(raw).kind == "other"
    with pytest.raises(ValueError, match="kind"):
        FailureBody.model_validate({**raw, "kind": 5})


def test_the_failure_body_matches_the_wire_dataclass_field_by_field() -> None:
    wire = typing.get_type_hints(Failure)
    names = [f.name for f in dataclasses.fields(Failure)]
    assert list(FailureBody.model_fields) == names
    for name in names:
        assert FailureBody.model_fields[name].annotation == wire[name], name
    # Defaults: a body with only the required fields reads as the wire parser reads the same JSON.
    minimal = {"model": "digits", "version": "2", "reason": "x", "at": 1.0}
    assert Failure(**FailureBody.model_validate(minimal).model_dump()) == Failure.from_json(minimal)
    required = {name for name, info in FailureBody.model_fields.items() if info.is_required()}
    assert required == set(minimal)


def test_a_failure_record_of_the_wrong_shape_sets_the_state_file_aside(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    bad = {**Failure("digits", "2", None, "x", 1.0).to_json(), "at": "yesterday"}
    (tmp_path / "state.json").write_text(json.dumps({"failures": {"k": bad}}))
    assert store.load_state() == NodeState()
    assert (tmp_path / "state.corrupt").exists()
