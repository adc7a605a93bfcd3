"""The console at `/ui` without a browser: what is served to whom, the session cookie's flags, the
Content-Security-Policy, and that actions need the admin scope, the console's own origin and the CSRF token; plus
the node list's paging and sorting in `/v1/nodes` that the fleet page relies on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from control_harness import Harness

from strata.control.ui.session import COOKIE, csrf_token


def token_of(server: Harness, scope: str) -> str:
    if scope == "admin":
        return server.admin["Authorization"].removeprefix("Bearer ")
    issued = server.client.post("/v1/api-tokens", json={"scope": scope}, headers=server.admin)
    assert issued.status_code == 201, issued.text
    token: str = issued.json()["token"]
    return token


def cookie(token: str) -> dict[str, str]:
    # TestClient speaks plain HTTP to the app, and a Secure cookie is never sent over it: set the header by hand.
    return {"Cookie": f"{COOKIE}={token}"}


def sign_in(server: Harness, token: str, **headers: str) -> Any:
    return server.client.post(
        "/ui/login",
        content=f"token={token}",
        headers={"Content-Type": "application/x-www-form-urlencoded", **headers},
        follow_redirects=False,
    )


def test_assets_are_public_but_pages_and_data_need_a_session(server: Harness) -> None:
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        asset = server.client.get(f"/ui/static/{name}")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(kind)
    for name in ("..%2Fsession.py", "console.html", "nothing.js", "login.html"):
        assert server.client.get(f"/ui/static/{name}").status_code == 404, name
    page = server.client.get("/ui/", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/ui/login"
    for path in ("/ui/api/session", "/ui/api/fleet", "/ui/api/models", "/ui/api/rollouts", "/ui/api/nodes/x"):
        refused = server.client.get(path)
        assert refused.status_code == 401, path
        assert "sign in" in refused.json()["error"] or "credential" in refused.json()["error"]
        # A bearer token is the API's credential, not the console's: the console reads only its cookie.
        assert server.client.get(path, headers=server.admin).status_code == 401
        assert server.client.get(path, headers=cookie("not-a-token")).status_code == 401
    assert server.client.get("/ui/api/fleet", headers=cookie(token_of(server, "admin"))).status_code == 200


def test_every_console_answer_carries_a_strict_content_security_policy(server: Harness) -> None:
    admin = cookie(token_of(server, "admin"))
    answers = [
        server.client.get("/ui/login"),
        server.client.get("/ui/", headers=admin),
        server.client.get("/ui/static/console.js"),
        server.client.get("/ui/api/fleet", headers=admin),
        server.client.get("/ui/api/fleet"),  # a 401 too
        server.client.get("/ui/static/missing.js"),  # and a 404
    ]
    for answer in answers:
        policy = answer.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["default-src"] == "'self'"
        assert directives["script-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'"
        assert "unsafe" not in policy  # neither 'unsafe-inline' nor 'unsafe-eval'
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
    page = answers[1].text
    assert '<script src="/ui/static/console.js"' in page
    assert "<script>" not in page  # no inline script for the policy to allow
    assert "onclick=" not in page
    assert "content-security-policy" not in server.client.get("/v1/health", headers=server.admin).headers


@pytest.mark.parametrize("scope", ["admin", "read"])
def test_sign_in_sets_a_hardened_session_cookie(server: Harness, scope: str) -> None:
    token = token_of(server, scope)
    answer = sign_in(server, token)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/"
    flags = [part.strip() for part in answer.headers["set-cookie"].split(";")]
    assert flags[0] == f"{COOKIE}={token}"
    assert COOKIE.startswith("__Host-")  # the browser accepts it only Secure, for this host, with Path=/
    assert {"Path=/", "Secure", "HttpOnly", "SameSite=Strict"} <= set(flags)
    assert not any(f.lower().startswith(("domain", "max-age", "expires")) for f in flags)
    session = server.client.get("/ui/api/session", headers=cookie(token)).json()
    assert session == {"scope": scope, "csrf": csrf_token(token)}


def test_sign_in_refuses_unknown_tokens_and_other_sites(server: Harness) -> None:
    wrong = sign_in(server, "not-a-token")
    assert wrong.status_code == 401
    assert "set-cookie" not in wrong.headers
    assert "unknown or revoked token" in wrong.text
    forged = sign_in(
        server, token_of(server, "admin"), Origin="https://evil.example", **{"Sec-Fetch-Site": "cross-site"}
    )
    assert forged.status_code == 403
    assert "set-cookie" not in forged.headers
    huge = sign_in(server, "x" * 10_000)
    assert huge.status_code == 413


@pytest.fixture
def rollout(server: Harness, make_package: Callable[..., bytes]) -> str:
    for version in ("1", "2"):
        assert server.upload(make_package(version=version)).status_code == 201
    server.enroll("edge-1", {"fleet": "f"})
    body = {"model": "digits", "version": "2", "selector": {"fleet": "f"}, "waves": "100%"}
    created = server.client.post("/v1/rollouts", json=body, headers=server.admin)
    assert created.status_code == 201, created.text
    rollout_id: str = created.json()["id"]
    return rollout_id


def test_actions_need_the_admin_scope_the_consoles_origin_and_the_csrf_token(server: Harness, rollout: str) -> None:
    admin, read = token_of(server, "admin"), token_of(server, "read")
    pause = f"/ui/api/rollouts/{rollout}/pause"
    refusals = [
        ({**cookie(admin)}, "CSRF"),  # a forged form post: the cookie rides along, the token does not
        ({**cookie(admin), "X-CSRF-Token": csrf_token(read)}, "CSRF"),  # another session's token
        ({**cookie(admin), "X-CSRF-Token": "0" * 64}, "CSRF"),
        ({**cookie(admin), "X-CSRF-Token": csrf_token(admin), "Origin": "https://evil.example"}, "own pages"),
        ({**cookie(admin), "X-CSRF-Token": csrf_token(admin), "Sec-Fetch-Site": "cross-site"}, "own pages"),
        ({**cookie(read), "X-CSRF-Token": csrf_token(read)}, "admin"),  # a read token sees but cannot act
    ]
    for headers, why in refusals:
        answer = server.client.post(pause, headers=headers)
        assert answer.status_code == 403, (headers, answer.text)
        assert why in answer.json()["error"]
    assert server.client.get(f"/v1/rollouts/{rollout}", headers=server.admin).json()["status"] == "running"
    # The API never takes the cookie as a credential, so it needs no CSRF defence of its own.
    assert server.client.post(f"/v1/rollouts/{rollout}/pause", headers=cookie(admin)).status_code == 401
    acted = server.client.post(
        pause, headers={**cookie(admin), "X-CSRF-Token": csrf_token(admin), "Origin": "https://testserver"}
    )
    assert acted.status_code == 200, acted.text
    assert acted.json()["status"] == "paused"
    for action, status in (("resume", "running"), ("abort", "aborted")):
        answer = server.client.post(
            f"/ui/api/rollouts/{rollout}/{action}", headers={**cookie(admin), "X-CSRF-Token": csrf_token(admin)}
        )
        assert answer.json()["status"] == status
    again = server.client.post(pause, headers={**cookie(admin), "X-CSRF-Token": csrf_token(admin)})
    assert again.status_code == 409
    unknown = server.client.post(
        f"/ui/api/rollouts/{rollout}/delete", headers={**cookie(admin), "X-CSRF-Token": csrf_token(admin)}
    )
    assert unknown.status_code == 404
    # Signing out needs the CSRF token too, and clears the cookie.
    assert server.client.post("/ui/logout", headers=cookie(read)).status_code == 403
    out = server.client.post("/ui/logout", headers={**cookie(read), "X-CSRF-Token": csrf_token(read)})
    assert out.status_code == 204
    assert "Max-Age=0" in out.headers["set-cookie"]


def test_console_pages_answer_with_the_fleet_models_and_rollouts(server: Harness, rollout: str) -> None:
    read = cookie(token_of(server, "read"))
    fleet = server.client.get("/ui/api/fleet", params={"selector": "fleet=f"}, headers=read).json()
    assert fleet["counts"]["total"] == 1
    assert fleet["counts"]["by_tier"] == {"device": 1}
    node_id = fleet["nodes"][0]["id"]
    node = server.client.get(f"/ui/api/nodes/{node_id}", headers=read).json()
    assert node["node"]["name"] == "edge-1"
    assert node["certificate_expires_at"] > server.clock.now
    assert server.client.get("/ui/api/nodes/nope", headers=read).status_code == 404
    models = server.client.get("/ui/api/models", headers=read).json()["models"]
    assert [v["version"] for v in models[0]["versions"]] == ["1", "2"]
    rollouts = server.client.get("/ui/api/rollouts", headers=read).json()["rollouts"]
    assert rollouts[0]["id"] == rollout
    assert rollouts[0]["waves_detail"][0]["nodes"] == 1
    bad = server.client.get("/ui/api/fleet", params={"sort": "password"}, headers=read)
    assert bad.status_code == 422
    assert "query.sort" in bad.json()["error"]


def test_node_list_pages_and_sorts_on_the_server(server: Harness) -> None:
    for i, region in enumerate(["eu", "us", "eu", "ap", "us"]):
        server.enroll(f"node-{i}", {"region": region})
    everything = server.client.get("/v1/nodes", headers=server.admin)
    assert [n["name"] for n in everything.json()] == [f"node-{i}" for i in range(5)]
    assert everything.headers["x-total-count"] == "5"
    page = server.client.get("/v1/nodes", params={"sort": "-name", "offset": 1, "limit": 2}, headers=server.admin)
    assert [n["name"] for n in page.json()] == ["node-3", "node-2"]
    assert page.headers["x-total-count"] == "5"
    # Ties keep the name order, so consecutive pages never overlap or skip a node.
    by_region = [
        n["name"]
        for offset in range(0, 5, 2)
        for n in server.client.get(
            "/v1/nodes", params={"sort": "region", "offset": offset, "limit": 2}, headers=server.admin
        ).json()
    ]
    assert by_region == ["node-3", "node-0", "node-2", "node-1", "node-4"]
    selected = server.client.get("/v1/nodes", params={"selector": "region=us", "limit": 1}, headers=server.admin)
    assert [n["name"] for n in selected.json()] == ["node-1"]
    assert selected.headers["x-total-count"] == "2"
    for params in ({"sort": "secret"}, {"limit": 0}, {"limit": 1001}, {"offset": -1}, {"selector": "region"}):
        refused = server.client.get("/v1/nodes", params=params, headers=server.admin)
        assert refused.status_code == 422, params
