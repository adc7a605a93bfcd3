"""Who may call what: the admin token's life cycle, 401 for missing or unknown credentials, 403 across nodes."""

from __future__ import annotations

import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from control_harness import Harness, StartServer, cert_headers, csr_for, node_key_and_csr

from strata.control.api.system import READY_CACHE_S
from strata.control.revocation import MAX_LIVE_CERTIFICATES
from strata.control.settings import ServerSettings
from strata.testing.postgres import PostgresCluster

# Every route of the API with a path that names real-looking ids; the auth check runs before any lookup.
ROUTES = [
    ("GET", "/v1/health"),
    ("GET", "/v1/openapi.json"),
    ("POST", "/v1/enrollment-tokens"),
    ("GET", "/v1/nodes"),
    ("GET", "/v1/nodes/abc"),
    ("DELETE", "/v1/nodes/abc"),
    ("GET", "/v1/nodes/abc/desired"),
    ("PUT", "/v1/nodes/abc/status"),
    ("POST", "/v1/packages"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/digits"),
    ("GET", "/v1/models/digits/versions/1"),
    ("POST", "/v1/deployments"),
    ("GET", "/v1/deployments"),
    ("DELETE", "/v1/deployments/1"),
    ("GET", "/v1/blobs/sha256/" + "0" * 64),
]


def test_admin_token_is_written_once_and_kept_across_restarts(
    settings: ServerSettings, start_server: StartServer
) -> None:
    with start_server(settings) as first:
        token = settings.admin_token_path.read_text()
        assert stat.S_IMODE(settings.admin_token_path.stat().st_mode) == 0o600
        assert first.client.get("/v1/health", headers=first.admin).status_code == 200
    with start_server(settings) as second:
        assert settings.admin_token_path.read_text() == token
        assert second.admin == first.admin
        assert second.client.get("/v1/health", headers=second.admin).json()["status"] == "ok"


def test_a_token_file_unknown_to_a_fresh_database_is_adopted_not_overwritten(
    settings: ServerSettings, start_server: StartServer
) -> None:
    settings.data_dir.mkdir(parents=True)
    settings.admin_token_path.write_text("operator-chosen-secret\n")
    with start_server(settings) as server:
        assert settings.admin_token_path.read_text() == "operator-chosen-secret\n"
        headers = {"Authorization": "Bearer operator-chosen-secret"}
        assert server.client.get("/v1/nodes", headers=headers).status_code == 200


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-known-token", "Basic dXNlcjpwYXNz"])
def test_every_route_refuses_missing_or_unknown_credentials(
    server: Harness, method: str, path: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = server.client.request(method, path, headers=headers)
    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"
    assert response.headers["WWW-Authenticate"] == "Bearer"


# The enrollment call's credential is the one-time token in its body (tests/integration/control/test_api_enrollment.py).
BODY_CREDENTIAL = {("POST", "/v1/enroll")}


def test_only_liveness_and_readiness_answer_without_a_credential(server: Harness) -> None:
    """Every route of the API, read from its OpenAPI document (so a new route is covered the day it is added):
    all but the two probes refuse a caller without a credential."""
    app = server.client.app.app  # TestClient.app is the TlsTestShim around the app
    answered: dict[tuple[str, str], int] = {}
    for template, operations in app.openapi()["paths"].items():
        for method in operations:
            if (method.upper(), template) in BODY_CREDENTIAL:
                continue
            status = server.client.request(method.upper(), re.sub(r"\{[^}]+\}", "abc", template)).status_code
            if status != 401:
                answered[(method.upper(), template)] = status
    assert answered == {("GET", "/healthz"): 200, ("GET", "/readyz"): 200}
    assert server.client.get("/healthz").text == "ok"
    assert server.client.get("/readyz").text == "ok"


def test_readiness_fails_while_the_database_is_gone(server: Harness, request: pytest.FixtureRequest) -> None:
    url = server.plane.db.engine.url
    if url.get_backend_name() == "sqlite":
        database = server.plane.settings.data_dir / "strata.db"
        database.rename(database.with_suffix(".gone"))
        database.mkdir()  # a folder where the file was: every connection fails

        def restore() -> None:
            database.rmdir()
            database.with_suffix(".gone").rename(database)
    else:
        # PostgreSQL refuses every new connection to the database, a superuser's too
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        cluster.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS false')

        def restore() -> None:
            cluster.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS true')

    server.plane.db.engine.dispose()  # the pooled connections go: the next ping opens a new one
    try:
        # the answer is cached for READY_CACHE_S (the probe needs no credential: a flood must not become a flood of
        # database round trips)
        answer = _readiness_within(server, 503, READY_CACHE_S * 3)
        assert (answer.status_code, answer.text) == (503, "not ready")
        assert server.client.get("/healthz").status_code == 200  # alive, only not ready
    finally:
        restore()
    assert _readiness_within(server, 200, READY_CACHE_S * 3).status_code == 200


def test_readiness_fails_while_the_blob_store_cannot_be_written(server: Harness) -> None:
    """A full disk or a read-only blob folder leaves the database answering: the probe writes a byte to find out."""
    scratch = server.plane.settings.tmp_dir
    scratch.rmdir()
    scratch.write_bytes(b"")  # a file where the scratch folder was: nothing can be written in it, even by root
    try:
        answer = _readiness_within(server, 503, READY_CACHE_S * 3)
        assert (answer.status_code, answer.text) == (503, "not ready")
    finally:
        scratch.unlink()
        scratch.mkdir()
    assert _readiness_within(server, 200, READY_CACHE_S * 3).status_code == 200


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # a file deleted under the server: SQLite's case
def test_readiness_fails_when_the_sqlite_file_is_deleted_under_a_pooled_connection(
    server: Harness, tmp_path: Path
) -> None:
    database = server.plane.settings.data_dir / "strata.db"
    assert _readiness_within(server, 200, READY_CACHE_S * 3).status_code == 200  # a pooled connection is open
    kept = tmp_path / "kept.db"
    database.rename(kept)  # the pooled connection still answers SELECT 1 from the file it has open
    try:
        assert _readiness_within(server, 503, READY_CACHE_S * 3).status_code == 503
    finally:
        kept.rename(database)
    assert _readiness_within(server, 200, READY_CACHE_S * 3).status_code == 200


def _readiness_within(server: Harness, status: int, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        answer = server.client.get("/readyz")
        if answer.status_code == status or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def test_a_token_of_an_unknown_scope_is_refused(server: Harness) -> None:
    """Which scope may call which route: test_every_route_lets_in_exactly_the_callers_its_entry_names."""
    assert server.client.post("/v1/api-tokens", json={"scope": "root"}, headers=server.admin).status_code in (400, 422)


def test_a_renewed_certificate_replaces_the_old_one_at_once(server: Harness) -> None:
    node = server.enroll("edge-1")
    renewed = server.client.post(
        f"/v1/nodes/{node.node_id}/certificate", json={"csr": csr_for(node.key, "edge-1")}, headers=node.headers
    )
    assert renewed.status_code == 200, renewed.text
    assert server.client.get(f"/v1/nodes/{node.node_id}/desired", headers=node.headers).status_code == 401
    fresh = cert_headers(renewed.json()["certificate"])
    assert server.client.get(f"/v1/nodes/{node.node_id}/desired", headers=fresh).status_code == 200


def test_a_renewal_whose_answer_was_lost_is_answered_again(server: Harness) -> None:
    """The control plane renewed and the answer never reached the node: it held only the certificate that renewal
    replaced, refused everywhere, renewal included, and needed enrolling again. Asked again with that certificate
    (over the same key, as the agent renews), the renewal's answer is given again; nothing new is issued."""
    node = server.enroll("edge-1")
    path = f"/v1/nodes/{node.node_id}/certificate"
    csr = csr_for(node.key, "edge-1")
    lost = server.client.post(path, json={"csr": csr}, headers=node.headers)
    assert lost.status_code == 200, lost.text
    again = server.client.post(path, json={"csr": csr}, headers=node.headers)
    assert again.status_code == 200, again.text
    assert again.json() == lost.json()
    assert server.client.get(f"/v1/nodes/{node.node_id}/desired", headers=node.headers).status_code == 401
    current = cert_headers(again.json()["certificate"])
    assert server.client.get(f"/v1/nodes/{node.node_id}/desired", headers=current).status_code == 200
    # another node's certificate does not ask for it
    other = server.enroll("edge-2")
    assert server.client.post(path, json={"csr": csr}, headers=other.headers).status_code == 403
    # a renewal onto another key (which would leave the replaced certificate nothing to be answered with) is refused
    rekeyed = server.client.post(path, json={"csr": node_key_and_csr("edge-1")}, headers=current)
    assert rekeyed.status_code == 401, rekeyed.text
    assert "over the key it holds" in rekeyed.json()["error"]
    # nor once the node is revoked
    assert server.client.delete(f"/v1/nodes/{node.node_id}", headers=server.admin).status_code == 204
    assert server.client.post(path, json={"csr": csr}, headers=current).status_code == 401


def test_a_node_renewing_in_a_loop_cannot_grow_every_nodes_revocation_list(server: Harness) -> None:
    """Each certificate a node holds is listed in every node's desired state once it is revoked: a compromised node
    renewing in a loop (200 renewals took a second) grew the whole fleet's desired states by 67 bytes each."""
    bad, good = server.enroll("edge-bad"), server.enroll("edge-good")
    headers, csr = bad.headers, csr_for(bad.key, "edge-bad")
    for _ in range(MAX_LIVE_CERTIFICATES - 1):  # its enrollment's certificate is the first
        renewed = server.client.post(f"/v1/nodes/{bad.node_id}/certificate", json={"csr": csr}, headers=headers)
        assert renewed.status_code == 200, renewed.text
        headers = cert_headers(renewed.json()["certificate"])
    refused = server.client.post(f"/v1/nodes/{bad.node_id}/certificate", json={"csr": csr}, headers=headers)
    assert refused.status_code == 409, refused.text
    assert "renew again when the first expires" in refused.json()["error"]
    assert server.client.get(f"/v1/nodes/{bad.node_id}/desired", headers=headers).status_code == 200  # still in
    assert server.client.delete(f"/v1/nodes/{bad.node_id}", headers=server.admin).status_code == 204
    assert len(server.desired(good).json()["revoked_certificates"]) == MAX_LIVE_CERTIFICATES
    # An agent renews at two thirds of a lifetime: once its older certificates expire it renews again.
    node = server.enroll("edge-1")
    server.clock.advance(server.plane.settings.node_cert_hours * 3600 * 2 / 3)
    csr = csr_for(node.key, "edge-1")
    renewed = server.client.post(f"/v1/nodes/{node.node_id}/certificate", json={"csr": csr}, headers=node.headers)
    assert renewed.status_code == 200, renewed.text


def test_a_revoked_node_is_cut_off_at_once(server: Harness) -> None:
    node = server.enroll("edge-1")
    assert server.client.get(f"/v1/nodes/{node.node_id}/desired", headers=node.headers).status_code == 200
    assert server.client.delete(f"/v1/nodes/{node.node_id}", headers=server.admin).status_code == 204
    refused = server.client.get(f"/v1/nodes/{node.node_id}/desired", headers=node.headers)
    assert refused.status_code == 401
    assert "revoked" in refused.json()["error"]


def test_a_certificate_from_another_ca_is_refused(server: Harness) -> None:
    import datetime as dt

    from strata.trust.ca import FleetCA

    other = FleetCA.create("someone else's CA", dt.datetime.now(dt.UTC))
    node = server.enroll("edge-1")
    forged = other.sign_node_csr(node_key_and_csr("edge-1").encode(), node.node_id, dt.datetime.now(dt.UTC))
    response = server.client.get(f"/v1/nodes/{node.node_id}/desired", headers=cert_headers(forged.pem.decode()))
    assert response.status_code == 401


def test_a_node_may_not_read_or_write_another_nodes_records(server: Harness) -> None:
    a = server.enroll("edge-a")
    b = server.enroll("edge-b")
    status = {"tier": "device", "labels": {}, "profile": "cpu-generic"}
    assert server.client.get(f"/v1/nodes/{b.node_id}/desired", headers=a.headers).status_code == 403
    assert server.client.get(f"/v1/nodes/{b.node_id}", headers=a.headers).status_code == 403
    assert server.client.put(f"/v1/nodes/{b.node_id}/status", json=status, headers=a.headers).status_code == 403
    # Its own records are fine.
    assert server.client.get(f"/v1/nodes/{a.node_id}/desired", headers=a.headers).status_code == 200
    assert server.client.get(f"/v1/nodes/{a.node_id}", headers=a.headers).json()["name"] == "edge-a"
    assert server.client.put(f"/v1/nodes/{a.node_id}/status", json=status, headers=a.headers).status_code == 204


def test_only_the_node_itself_reports_its_status(server: Harness) -> None:
    node = server.enroll("edge-1")
    status = {"tier": "device", "labels": {}, "profile": "cpu-generic"}
    response = server.client.put(f"/v1/nodes/{node.node_id}/status", json=status, headers=server.admin)
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"


def test_health_answers_admin_and_nodes(server: Harness) -> None:
    node = server.enroll("edge-1")
    for headers in (server.admin, node.headers):
        body = server.client.get("/v1/health", headers=headers).json()
        assert body["status"] == "ok"
        assert body["version"]


def test_openapi_document_is_served_to_the_admin_only(server: Harness) -> None:
    document = server.client.get("/v1/openapi.json", headers=server.admin).json()
    paths = document["paths"]
    assert "/v1/nodes/{node_id}/desired" in paths
    assert "/v1/openapi.json" not in paths
    assert "application/x-tar" in paths["/v1/packages"]["post"]["requestBody"]["content"]
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert server.client.get(path).status_code == 404


def test_errors_are_json_in_one_shape(server: Harness) -> None:
    unknown_route = server.client.get("/v1/nope", headers=server.admin)
    assert unknown_route.status_code == 404
    assert set(unknown_route.json()) == {"error", "code"}
    bad_body = server.client.post("/v1/deployments", content=b"{not json", headers=server.admin)
    assert bad_body.status_code == 422
    assert set(bad_body.json()) == {"error", "code"}
    wrong_type = server.client.post("/v1/enrollment-tokens", json={"ttl_seconds": "soon"}, headers=server.admin)
    assert wrong_type.status_code == 422
    assert "ttl_seconds" in wrong_type.json()["error"]


# --- who may call each route, for every route the app serves ---------------------------------------------------

# Who passes each route's identity check: "admin" and "read" (operator tokens of either scope), "node" (a node's
# fleet certificate, on its own records where the path names a node) and "other" (that certificate on another
# node's records). Every route of the app must be here or in OWN_CREDENTIAL: a new route fails
# test_every_route_lets_in_exactly_the_callers_its_entry_names until someone decides who may call it.
ADMIN_ONLY = frozenset({"admin"})
OPERATORS = frozenset({"admin", "read"})
NODE_ITSELF = frozenset({"node"})
OPERATORS_OR_NODE_ITSELF = frozenset({"admin", "read", "node"})
ANY_CALLER = frozenset({"admin", "read", "node"})
WHO: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/metrics"): OPERATORS,
    ("GET", "/v1/health"): ANY_CALLER,
    ("GET", "/v1/openapi.json"): OPERATORS,
    ("POST", "/v1/api-tokens"): ADMIN_ONLY,
    ("GET", "/v1/api-tokens"): ADMIN_ONLY,
    ("DELETE", "/v1/api-tokens/{token_id}"): ADMIN_ONLY,
    ("POST", "/v1/enrollment-tokens"): ADMIN_ONLY,
    ("POST", "/v1/reenrollment-tokens"): ADMIN_ONLY,
    # blobs: a read-only token downloads no weights; a node only what its desired state names (none here); and
    # neither learns whether a blob it may not read is stored (it was a 404 to them, a 403 once stored)
    ("GET", "/v1/blobs/sha256/{sha256}"): ADMIN_ONLY,
    ("HEAD", "/v1/blobs/sha256/{sha256}"): ADMIN_ONLY,
    ("GET", "/v1/deployments"): OPERATORS,
    ("POST", "/v1/deployments"): ADMIN_ONLY,
    ("GET", "/v1/deployments/{deployment_id}"): OPERATORS,
    ("DELETE", "/v1/deployments/{deployment_id}"): ADMIN_ONLY,
    ("GET", "/v1/events"): OPERATORS,
    ("GET", "/v1/models"): OPERATORS,
    ("GET", "/v1/models/{name}"): OPERATORS,
    ("GET", "/v1/models/{name}/history"): OPERATORS,
    ("GET", "/v1/models/{name}/versions/{version}"): OPERATORS,
    ("PUT", "/v1/models/{name}/versions/{version}/variants/{variant}/signature"): ADMIN_ONLY,
    ("POST", "/v1/packages"): ADMIN_ONLY,
    ("GET", "/v1/pins"): OPERATORS,
    ("POST", "/v1/pins"): ADMIN_ONLY,
    ("DELETE", "/v1/pins/{pin_id}"): ADMIN_ONLY,
    ("GET", "/v1/rollouts"): OPERATORS,
    ("POST", "/v1/rollouts"): ADMIN_ONLY,
    ("GET", "/v1/rollouts/{rollout_id}"): OPERATORS,
    ("POST", "/v1/rollouts/{rollout_id}/abort"): ADMIN_ONLY,
    ("POST", "/v1/rollouts/{rollout_id}/pause"): ADMIN_ONLY,
    ("POST", "/v1/rollouts/{rollout_id}/resume"): ADMIN_ONLY,
    ("GET", "/v1/telemetry"): OPERATORS,
    ("GET", "/v1/tuf/image/{filename:path}"): ANY_CALLER,
    ("GET", "/v1/nodes"): OPERATORS,
    ("GET", "/v1/nodes/{node_id}"): OPERATORS_OR_NODE_ITSELF,
    ("PATCH", "/v1/nodes/{node_id}"): ADMIN_ONLY,
    ("DELETE", "/v1/nodes/{node_id}"): ADMIN_ONLY,
    ("GET", "/v1/nodes/{node_id}/desired"): OPERATORS_OR_NODE_ITSELF,
    ("GET", "/v1/nodes/{node_id}/topology"): OPERATORS_OR_NODE_ITSELF,
    ("GET", "/v1/tuf/director/{node_id}/{filename:path}"): OPERATORS_OR_NODE_ITSELF,
    # the near-edge node of the device's site too (tests/integration/control/test_api_blobs.py)
    ("GET", "/v1/nodes/{node_id}/packages/{digest}"): OPERATORS_OR_NODE_ITSELF,
    ("PUT", "/v1/nodes/{node_id}/status"): NODE_ITSELF,
    ("POST", "/v1/nodes/{node_id}/telemetry"): NODE_ITSELF,
    ("POST", "/v1/nodes/{node_id}/certificate"): NODE_ITSELF,
    ("POST", "/v1/nodes/{node_id}/attestation/challenge"): NODE_ITSELF,
    ("POST", "/v1/nodes/{node_id}/attestation"): NODE_ITSELF,
    ("POST", "/v1/nodes/{node_id}/tpm/challenge"): NODE_ITSELF,
    ("POST", "/v1/nodes/{node_id}/tpm/activate"): NODE_ITSELF,
    # the tail of a node's log is the admin's to ask for and read; only the node answers
    ("POST", "/v1/nodes/{node_id}/log-requests"): ADMIN_ONLY,
    ("GET", "/v1/nodes/{node_id}/log-requests/{request_id}"): ADMIN_ONLY,
    ("POST", "/v1/nodes/{node_id}/log-requests/{request_id}"): NODE_ITSELF,
}
# Routes whose credential is not a bearer token or a node certificate, each tested where it is said.
OWN_CREDENTIAL = {
    ("GET", "/healthz"): "none: the liveness probe",
    ("GET", "/readyz"): "none: the readiness probe",
    ("POST", "/v1/enroll"): "the one-time enrollment token in the body (test_api_enrollment.py)",
    ("GET", "/v1/ca"): "a valid enrollment token (test_api_enrollment.py)",
    ("GET", "/"): "none: a redirect to the console",
    ("GET", "/ui"): "none: a redirect to the console",
    ("GET", "/ui/"): "the console's session cookie (test_console.py)",
    ("GET", "/ui/login"): "none: the sign-in page",
    ("POST", "/ui/login"): "the API token it signs in with (test_console.py)",
    ("POST", "/ui/logout"): "the session cookie and its CSRF token (test_console.py)",
    ("GET", "/ui/static/{name}"): "none: the console's scripts and styles",
    ("GET", "/ui/api/session"): "the session cookie (test_console.py)",
    ("GET", "/ui/api/fleet"): "the session cookie (test_console.py)",
    ("GET", "/ui/api/nodes/{node_id}"): "the session cookie (test_console.py)",
    ("GET", "/ui/api/models"): "the session cookie (test_console.py)",
    ("GET", "/ui/api/rollouts"): "the session cookie (test_console.py)",
    ("GET", "/ui/api/events"): "the session cookie (test_console.py)",
    ("POST", "/ui/api/rollouts/{rollout_id}/{action}"): "an admin session, its origin and CSRF token (test_console.py)",
}
# What a refusal for who the caller is says (`strata.control.auth`); a 403 for what was asked (a package that is
# not in the node's desired state) comes after the caller passed.
IDENTITY_REFUSALS = {
    "this needs an admin credential",
    "this needs an operator credential",
    "only the node itself may do this",
    "a node may only read its own records",
    "only the device, an operator, or the near-edge node at its site may ask this",
    "a read-only token does not download packages or weights; this needs an admin token",
    "this blob is not part of the node's desired state",  # the blob asked for is in no node's desired state
}


def every_route(app: Any) -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves, in its OpenAPI document or not."""
    found: set[tuple[str, str]] = set()

    def walk(routes: Any) -> None:
        for route in routes:
            # FastAPI (0.120 on) keeps an included router as one entry that lists its routes as "contexts"
            contexts = getattr(route, "effective_route_contexts", None)
            if contexts is not None:
                walk(contexts())
            elif getattr(route, "routes", None) is not None:  # a Mount
                walk(route.routes)
            else:
                found.update((method, route.path) for method in getattr(route, "methods", None) or ())

    walk(app.routes)
    return found


def test_every_route_lets_in_exactly_the_callers_its_entry_names(server: Harness) -> None:
    """Every route the app serves, enumerated (so a route added without deciding who may call it fails here), is
    called by the admin, a read-only token, a node on its own records and a node on another's; each is refused
    with 403 exactly when its entry in WHO does not name it (no body is sent: a caller let in gets a 4xx for
    that, never a change)."""
    app = server.client.app.app  # TestClient.app is the TlsTestShim around the app
    routes = every_route(app)
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert {(m, re.sub(r"\{(\w+)\}", r"{\1}", p)) for m, p in documented} <= {  # the walk sees them all
        (m, re.sub(r"\{(\w+):\w+\}", r"{\1}", p)) for m, p in routes
    }
    unclassified = routes - set(WHO) - set(OWN_CREDENTIAL)
    assert not unclassified, f"decide who may call {sorted(unclassified)}: add them to WHO or OWN_CREDENTIAL"
    assert not (set(WHO) | set(OWN_CREDENTIAL)) - routes, "WHO names routes the app no longer serves"

    node = server.enroll("edge-a")
    other = server.enroll("edge-b")
    reader = {"Authorization": f"Bearer {token_of(server, 'read')}"}
    callers = {
        "admin": (server.admin, "no-such-node"),
        "read": (reader, "no-such-node"),
        "node": (node.headers, node.node_id),
        "other": (node.headers, other.node_id),
    }
    wrong: list[str] = []
    for (method, template), allowed in sorted(WHO.items()):
        for caller, (headers, node_id) in callers.items():
            if caller == "other" and "{node_id}" not in template:
                continue  # the same call as "node"
            path = template.replace("{node_id}", node_id).replace("{filename:path}", "root.json")
            path = re.sub(r"\{(sha256|digest)\}", "0" * 64, path)
            path = re.sub(r"\{[^}]+\}", "abc", path)
            answer = server.client.request(method, path, headers=headers)
            refused = answer.status_code == 403 and _error_of(answer) in IDENTITY_REFUSALS
            if answer.status_code in (401, 500) or refused == (caller in allowed):
                wrong.append(f"{method} {template} by {caller}: {answer.status_code} {answer.text[:120]}")
    assert not wrong, "\n".join(wrong)


def token_of(server: Harness, scope: str) -> str:
    issued = server.client.post("/v1/api-tokens", json={"scope": scope}, headers=server.admin)
    assert issued.status_code == 201, issued.text
    token: str = issued.json()["token"]
    return token


def _error_of(answer: Any) -> str:
    if not answer.content:  # HEAD
        return next(iter(IDENTITY_REFUSALS)) if answer.status_code == 403 else ""
    error: str = answer.json().get("error", "")
    return error


def test_an_error_quoting_a_long_name_is_cut_not_echoed(server: Harness) -> None:
    """An error that quotes what the caller sent (here a node name in the path) answers a message a person reads,
    not the caller's kilobytes back."""
    answer = server.client.get(f"/v1/nodes/{'n' * 12_000}", headers=server.admin)
    assert answer.status_code == 404, answer.text[:200]
    assert len(answer.json()["error"]) <= 1024
    assert answer.json()["error"].endswith("characters, cut)")
