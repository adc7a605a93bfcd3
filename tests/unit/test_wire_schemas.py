"""The wire is defined once: `strata.core.wire`'s dataclasses, and the control plane's pydantic bodies held to them.

The failure record is one shape (the agent's state file, its status report and the control plane's schema), and
every kind the agent can record (mypy holds the agent to `FailureKind`) reaches the control plane as itself. Every
pydantic body the API validates matches its wire dataclass field by field (names, order, types, which are required),
the kinds are Literals both sides share, and every message reads back the same through the body.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel

from strata.agent.state import FailureRecord, NodeState
from strata.agent.store import ArtifactStore
from strata.control.schemas import (
    CertificateBody,
    DesiredModelBody,
    DesiredStateBody,
    EnrollRequestBody,
    EnrollResponseBody,
    FailureBody,
    LogRequestBody,
    ModelStatusBody,
    NodeStatusBody,
    ServingCountersBody,
    VariantRefBody,
)
from strata.core.wire import (
    FAILURE_KINDS,
    PROBATION_STATES,
    SUPPLY_MODES,
    TIERS,
    CertificateRenewal,
    DesiredModel,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    Failure,
    FailureKind,
    LogRequest,
    ModelStatus,
    NodeStatus,
    ProbationState,
    ProtocolError,
    ServingCounters,
    SupplyMode,
    Tier,
    VariantRef,
    tier_of,
)

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


# --- every wire message against the API's body, field by field -----------------------------------------------

PAIRS: dict[type, type[BaseModel]] = {
    EnrollRequest: EnrollRequestBody,
    EnrollResponse: EnrollResponseBody,
    CertificateRenewal: CertificateBody,
    VariantRef: VariantRefBody,
    DesiredModel: DesiredModelBody,
    LogRequest: LogRequestBody,
    DesiredState: DesiredStateBody,
    ServingCounters: ServingCountersBody,
    ModelStatus: ModelStatusBody,
    Failure: FailureBody,
    NodeStatus: NodeStatusBody,
}
BODIES = {body: wire for wire, body in PAIRS.items()}
# Fields the API requires though the message has a default, and why.
STRICTER = {
    (EnrollRequest, "csr"): "a node enrolls with a certificate request over its own key; the server keys no node",
}


def _shape(annotation: Any) -> Any:
    """A type as the JSON sees it: sequences are one kind, mappings another, a body stands for its wire class."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _shape(args[0])
    if origin in (tuple, list, frozenset, set):
        return ("sequence", _shape(args[0]))
    if origin in (dict, collections.abc.Mapping):
        return ("mapping", _shape(args[0]), _shape(args[1]))
    if origin in (typing.Union, types.UnionType):
        return ("union", frozenset(_shape(arg) for arg in args))
    if origin is Literal:
        return ("literal", args)
    return BODIES.get(annotation, annotation)


@pytest.mark.parametrize(("wire", "body"), PAIRS.items(), ids=lambda cls: cls.__name__)
def test_every_api_body_matches_its_wire_dataclass_field_by_field(wire: type, body: type[BaseModel]) -> None:
    hints = typing.get_type_hints(wire)
    fields = dataclasses.fields(wire)
    assert list(body.model_fields) == [f.name for f in fields]
    for f in fields:
        info = body.model_fields[f.name]
        assert _shape(info.annotation) == _shape(hints[f.name]), f.name
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        # The body may be more lenient than the constructor (JSON may leave out what the parser defaults, see the
        # test below), never stricter, but where the server asks more than the message's shape on purpose.
        if (wire, f.name) not in STRICTER:
            assert not (info.is_required() and has_default), f.name


def test_the_kinds_on_the_wire_are_literals_the_api_enumerates() -> None:
    assert typing.get_args(Tier) == TIERS == ("device", "near-edge", "cloud")
    assert typing.get_args(ProbationState) == PROBATION_STATES
    assert typing.get_args(SupplyMode) == SUPPLY_MODES
    schema = NodeStatusBody.model_json_schema()
    assert schema["properties"]["tier"]["enum"] == list(TIERS)
    with pytest.raises(ValueError, match="tier"):
        NodeStatusBody.model_validate({**STATUS, "tier": "fog"})
    with pytest.raises(ProtocolError, match="tier 'fog' is not one of"):
        NodeStatus.from_json({**STATUS, "tier": "fog"})
    with pytest.raises(ProtocolError, match="tier"):
        tier_of("fog")


VARIANT = VariantRef("cpu", "cpu-generic", "onnxruntime", "fp32", "sha256:" + "a" * 64, "b" * 64, 1234, "c" * 64)
SAMPLES: list[Any] = [
    DesiredState(
        "node-1",
        (DesiredModel("digits", "2", "dep-1", (VARIANT,)),),
        frozenset({"d" * 64}),
        LogRequest("log1", 50),
    ),
    NodeStatus(
        "near-edge",
        {"site": "berlin"},
        "x86_64-avx2",
        True,
        "1.0",
        (
            ModelStatus(
                "digits",
                "2",
                "cpu",
                "sha256:" + "e" * 64,
                5.0,
                "1",
                "sha256:" + "f" * 64,
                ServingCounters(9, 1, 2.5, 4.0),
                "running",
            ),
        ),
        (Failure("digits", "3", None, "no", 6.0, 2, "tuf"),),
        '"etag"',
        "https://10.0.0.2:8443",
        "verified",
    ),
    EnrollResponse("node-1", "CERT", "CA", 9.0, ("KEY",), {"image": "{}"}),
    CertificateRenewal("CERT", 9.0),
]


SAMPLES += [VARIANT, SAMPLES[0].models[0], SAMPLES[0].log_request, *SAMPLES[1].models, SAMPLES[1].failures[0]]
SAMPLES += [SAMPLES[1].models[0].serving]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_reads_back_the_same_through_the_api_body(message: Any) -> None:
    body = PAIRS[type(message)]
    sent = json.loads(json.dumps(message.to_json()))
    assert type(message).from_json(body.model_validate(sent).model_dump()) == message


def _accepts(read: Any, raw: dict[str, Any]) -> bool:
    try:
        read(raw)
    except (ProtocolError, ValueError):
        return False
    return True


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_the_api_body_and_the_wire_parser_agree_on_every_field_left_out(message: Any) -> None:
    body = PAIRS[type(message)]
    sent = json.loads(json.dumps(message.to_json()))
    for key in sent:
        short = {k: v for k, v in sent.items() if k != key}
        assert _accepts(body.model_validate, short) == _accepts(type(message).from_json, short), key


def test_an_enrollment_request_reads_back_the_same_through_the_api_body() -> None:
    request = EnrollRequest("tok", "gw-1", "near-edge", {"site": "x"}, "cpu-generic", False, "1.0", {"cpu": 2}, "CSR")
    assert EnrollRequestBody.model_validate(request.to_json()).to_core() == request
