"""Operator tokens are named, listed and revoked (`GET` and `DELETE /v1/api-tokens`): a revoked token is refused at
once (its cached principal too) and by another replica of the same database within the change feed's bound; the
last admin token is kept; a read-only token can do neither; use is recorded in batches, not per request. The same
cross-replica recheck drops a node certificate another replica replaced."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable

import pytest
from control_harness import Harness, StartServer, recorded_statements, writes
from sqlalchemy import select
from test_console import cookie, sign_in

from strata.control.db import ApiToken
from strata.control.settings import ServerSettings
from strata.core.errors import Conflict


def issue(server: Harness, scope: str, name: str | None = None) -> tuple[str, dict[str, str]]:
    """A new token's id and the headers that present it."""
    body = {"scope": scope} if name is None else {"scope": scope, "name": name}
    issued = server.client.post("/v1/api-tokens", json=body, headers=server.admin)
    assert issued.status_code == 201, issued.text
    return issued.json()["id"], {"Authorization": f"Bearer {issued.json()['token']}"}


def listed(server: Harness) -> dict[str, dict[str, object]]:
    answer = server.client.get("/v1/api-tokens", headers=server.admin)
    assert answer.status_code == 200, answer.text
    return {token["id"]: token for token in answer.json()}


def test_a_revoked_token_is_refused_at_once_though_it_was_cached(server: Harness) -> None:
    token_id, grafana = issue(server, "read", " grafana ")
    assert server.client.get("/v1/nodes", headers=grafana).status_code == 200  # looked up once, then cached
    assert server.client.get("/v1/nodes", headers=grafana).status_code == 200
    assert sign_in(server, grafana["Authorization"].removeprefix("Bearer ")).status_code == 303
    session = cookie(grafana["Authorization"].removeprefix("Bearer "))
    assert server.client.get("/ui/api/session", headers=session).status_code == 200

    shown = listed(server)[token_id]
    assert set(shown) == {"id", "name", "scope", "created_at", "last_used_at"}  # never the secret or its hash
    assert (shown["name"], shown["scope"]) == ("grafana", "read")

    revoked = server.client.delete(f"/v1/api-tokens/{token_id}", headers=server.admin)
    assert revoked.status_code == 204
    refused = server.client.get("/v1/nodes", headers=grafana)
    assert refused.status_code == 401
    assert refused.json()["error"] == "unknown or revoked token"
    assert server.client.get("/ui/api/session", headers=session).status_code == 401  # the console session ends
    assert token_id not in listed(server)
    again = server.client.delete(f"/v1/api-tokens/{token_id}", headers=server.admin)
    assert again.status_code == 404
    assert server.client.get("/v1/nodes", headers=server.admin).status_code == 200  # the others stay


def test_an_unknown_token_id_is_not_found(server: Harness) -> None:
    answer = server.client.delete("/v1/api-tokens/no-such-token", headers=server.admin)
    assert answer.status_code == 404
    assert "no operator token 'no-such-token'" in answer.json()["error"]


def test_a_read_only_token_can_neither_list_nor_revoke(server: Harness) -> None:
    token_id, reader = issue(server, "read")
    assert server.client.get("/v1/api-tokens", headers=reader).status_code == 403
    refused = server.client.delete(f"/v1/api-tokens/{token_id}", headers=reader)
    assert refused.status_code == 403
    assert refused.json()["error"] == "this needs an admin credential"
    assert server.client.get("/v1/nodes", headers=reader).status_code == 200  # not even itself


def test_the_last_admin_token_is_kept_and_a_revoked_token_file_is_not_adopted_again(
    settings: ServerSettings, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    with start_server(settings) as server:
        (first,) = [t for t, token in listed(server).items() if token["scope"] == "admin"]  # the admin.token file's
        kept = server.client.delete(f"/v1/api-tokens/{first}", headers=server.admin)
        assert kept.status_code == 409
        assert "last admin token" in kept.json()["error"]
        assert "strata token api --scope admin" in kept.json()["error"]
        second, other_admin = issue(server, "admin", "break-glass")
        assert server.client.delete(f"/v1/api-tokens/{first}", headers=other_admin).status_code == 204
        assert server.client.get("/v1/nodes", headers=server.admin).status_code == 401
        assert server.client.delete(f"/v1/api-tokens/{second}", headers=other_admin).status_code == 409
    # The file still holds the revoked token: a restart does not adopt it again (it stays refused) and says so.
    with caplog.at_level(logging.WARNING), start_server(settings) as restarted:
        assert restarted.client.get("/v1/nodes", headers=restarted.admin).status_code == 401
        assert restarted.client.get("/v1/nodes", headers=other_admin).status_code == 200
        assert [t["name"] for t in restarted.client.get("/v1/api-tokens", headers=other_admin).json()] == [
            "break-glass"
        ]
    assert "was revoked (strata token revoke)" in caplog.text


@pytest.mark.parametrize(
    ("name", "status", "error"),
    [
        ("x" * 65, 422, "at most 64 characters"),
        ("", 400, "1 to 64"),
        ("a\x1b[31mb", 400, "control characters"),
        ("ci\u202eanafarg", 400, "bidi overrides"),  # a right-to-left override: printed, it reads "cigrafana"
        ("grafana\u200b", 400, "zero-width"),  # reads as "grafana", which `strata token revoke grafana` is not
    ],
    ids=["long", "empty", "escape", "bidi", "zero-width"],
)
def test_a_token_name_is_bounded_text(server: Harness, name: str, status: int, error: str) -> None:
    answer = server.client.post("/v1/api-tokens", json={"scope": "read", "name": name}, headers=server.admin)
    assert answer.status_code == status, answer.text
    assert error in answer.json()["error"]


def test_use_is_recorded_in_batches_not_per_request(server: Harness) -> None:
    token_id, reader = issue(server, "read", "ci")
    assert listed(server)[token_id]["last_used_at"] is None
    server.clock.advance(5)
    engine = server.plane.db.engine
    with recorded_statements(engine) as statements:
        for _ in range(3):
            assert server.client.get("/v1/health", headers=reader).status_code == 200
    assert not [w for w in writes(statements) if "api_tokens" in w]
    used = server.clock()
    assert listed(server)[token_id]["last_used_at"] == used  # this replica's memory, before any flush
    server.plane.flush_presence()
    with server.plane.db.transaction() as session:
        stored = session.get(ApiToken, token_id)
        assert stored is not None
        assert stored.last_used_at == used


def test_a_token_revoked_through_one_replica_is_refused_by_the_other_within_two_seconds(
    settings: ServerSettings, start_server: StartServer
) -> None:
    """Two control planes on one database (SQLite file or PostgreSQL), as replicas behind a load balancer: each
    caches the token it looked up; one revokes it; the other refuses it once it sees the fleet change counter move
    (polled every 0.2 s on SQLite, NOTIFY on PostgreSQL)."""
    with start_server(settings) as a, start_server(settings) as b:
        token_id, reader = issue(a, "read", "grafana")
        assert b.client.get("/v1/nodes", headers=reader).status_code == 200  # cached on b
        assert a.client.get("/v1/nodes", headers=reader).status_code == 200  # and on a
        started = time.monotonic()
        assert a.client.delete(f"/v1/api-tokens/{token_id}", headers=a.admin).status_code == 204
        assert a.client.get("/v1/nodes", headers=reader).status_code == 401
        while b.client.get("/v1/nodes", headers=reader).status_code == 200:
            assert time.monotonic() - started < 5, "replica b still accepts the revoked token"
            time.sleep(0.05)
        took = time.monotonic() - started
        print(f"replica b refused the revoked token {took:.2f} s after the revocation")
        assert took < 2.0
        assert b.client.get("/v1/nodes", headers=b.admin).status_code == 200


def test_a_node_re_enrolled_through_one_replica_is_refused_its_old_certificate_by_the_other(
    settings: ServerSettings, start_server: StartServer
) -> None:
    """The same recheck covers node certificates: the old machine's certificate, cached by replica b, stopped
    working on a only; b kept taking it as the node (its desired state, its status reports) until b restarted."""
    with start_server(settings) as a, start_server(settings) as b:
        old = a.enroll("edge-1")
        kept = a.enroll("edge-2")
        assert b.desired(old).status_code == 200  # cached on b
        assert b.desired(kept).status_code == 200
        new = a.enroll("edge-1", reenroll=True)  # `strata nodes reenroll` and `strata agent --replace`
        assert a.desired(old).status_code == 401
        started = time.monotonic()
        while b.desired(old).status_code != 401:
            assert time.monotonic() - started < 5, "replica b still takes the replaced certificate as the node"
            time.sleep(0.05)
        assert b.desired(new).status_code == 200
        assert b.desired(kept).status_code == 200
        assert b.plane.authenticator.certificate_cached(ssl.PEM_cert_to_DER_cert(kept.certificate)) is not None


def test_two_replicas_revoking_the_last_two_admin_tokens_at_once_leave_one(
    settings: ServerSettings, start_server: StartServer
) -> None:
    """Each replica revokes one of the two admin tokens at the same moment, each slowed between counting the admin
    tokens left and committing: the second waits for the first (`lease.serialize`), counts one and is refused."""
    with start_server(settings) as a, start_server(settings) as b:
        (first,) = [t for t, token in listed(a).items() if token["scope"] == "admin"]
        second, _ = issue(a, "admin", "break-glass")
        for replica in (a, b):
            clock = replica.plane.authenticator._clock  # read once the admin tokens are counted, before the commit

            def slow(clock: Callable[[], float] = clock) -> float:
                time.sleep(0.5)
                return clock()

            replica.plane.authenticator._clock = slow
        outcomes: list[str] = []

        def revoke(replica: Harness, token_id: str) -> None:
            try:
                replica.plane.authenticator.revoke_token(token_id)
                outcomes.append("revoked")
            except Conflict:
                outcomes.append("conflict")

        threads = [threading.Thread(target=revoke, args=args) for args in ((a, first), (b, second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(outcomes) == ["conflict", "revoked"]
        with b.plane.db.transaction() as session:
            left = session.scalars(select(ApiToken.id).where(ApiToken.revoked_at.is_(None))).all()
        assert len(left) == 1
