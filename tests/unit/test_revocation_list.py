"""The pure parts of peer revocation: which entries stay listed, the wire shape, and the peer check."""

from __future__ import annotations

import hashlib

import pytest

from strata.agent.peers import REVOKED, PeerGate, refusal
from strata.control.revocation import unexpired
from strata.core.wire import MAX_REVOKED_CERTIFICATES, DesiredState, ProtocolError

A, B = "a" * 64, "b" * 64


def test_only_unexpired_certificates_stay_listed() -> None:
    assert unexpired([(A, 100.0), (B, 50.0)], now=60.0) == {A}
    assert unexpired([(A, 100.0)], now=100.0) == set()  # expired at its not_after: the handshake refuses it anyway
    assert unexpired([], now=0.0) == set()


def test_the_revocation_list_is_additive_on_the_wire() -> None:
    plain = DesiredState("n1", ())
    assert plain.to_json() == {"node_id": "n1", "models": []}  # no revocations: the shape and ETag it always had
    listed = DesiredState("n1", (), revoked_certificates=frozenset({B, A}))
    assert listed.to_json()["revoked_certificates"] == [A, B]  # sorted: one ETag for one list
    assert DesiredState.from_json(listed.to_json()) == listed
    assert listed.etag != plain.etag
    for bad in (["not-a-hash"], [A.upper()], "a" * 64, [A] * (MAX_REVOKED_CERTIFICATES + 1)):
        with pytest.raises(ProtocolError, match="revoked_certificates"):
            DesiredState.from_json({**plain.to_json(), "revoked_certificates": bad})


def test_a_peer_is_refused_by_the_sha256_of_its_certificate() -> None:
    der = b"0\x82certificate"
    digest = hashlib.sha256(der).hexdigest()
    assert refusal(der, {digest}) == REVOKED
    assert refusal(der, {A}) is None
    assert refusal(None, {digest}) is None
    state: list[DesiredState | None] = [None]
    gate = PeerGate(lambda: state[0])
    assert gate.refusal(der) is None  # before the first desired state, nothing is known to be revoked
    state[0] = DesiredState("n1", (), revoked_certificates=frozenset({digest}))
    assert gate.refusal(der) == REVOKED
    state[0] = DesiredState("n1", ())
    assert gate.refusal(der) is None
