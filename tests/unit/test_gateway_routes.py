"""The gateway's pure decisions: which requests are Open Inference Protocol routes it forwards, and which fleet
nodes of a topology become targets (over mutual TLS, each checked to be the node named)."""

from __future__ import annotations

import ssl

import pytest

from strata.route.oip_routes import INFER, MODEL_READY, OipRoute, RouteRefusal, match_route
from strata.route.peer import PeerIdentityError, PeerTls, find_peer_identity_error, node_checked
from strata.route.topology import Topology


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v2", "/v2"),
        ("HEAD", "/v2/models/m", "/v2/models/m"),
        ("GET", "/v2/models/m/versions/1.0/ready", "/v2/models/m/versions/1.0/ready"),
        ("POST", "/v2/models/m_2-x.y/infer", "/v2/models/m_2-x.y/infer"),
        ("POST", "/v2/models/m/versions/3/infer", "/v2/models/m/versions/3/infer"),
    ],
)
def test_protocol_routes_are_matched_and_rebuilt(method: str, path: str, expected: str) -> None:
    route = match_route(method, path)
    assert isinstance(route, OipRoute)
    assert route.forwarded
    assert route.path == expected


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/secret/../../../admin/secret",
        "/v2/../admin",
        "/v2/models/./x/ready",
        "/v2/models/x/infer/../../../y",
        "/v2/models/x\\..\\admin/ready",
        "/v2/models/%2e%2e/ready",
        "/v2//models/x",
        "/v2/models/x/",
        "v2/models/x",
        "/v2/models/.x",
        "/v2/models/x\x00/ready",
        "/v2/models/" + "a" * 129,
        "/v2/models",
        "/v2/repository/index",
        "/admin",
    ],
)
def test_anything_else_is_404(path: str) -> None:
    refusal = match_route("GET", path)
    assert isinstance(refusal, RouteRefusal)
    assert refusal.status == 404


def test_a_known_route_with_another_method_is_405_with_allow() -> None:
    assert match_route("DELETE", "/v2/models/m") == RouteRefusal(
        405, "DELETE is not allowed on /v2/models/m", "GET, HEAD"
    )
    assert match_route("GET", "/v2/models/m/infer") == RouteRefusal(
        405, "GET is not allowed on /v2/models/m/infer", "POST"
    )
    assert match_route("POST", "/metrics") == RouteRefusal(405, "POST is not allowed on /metrics", "GET, HEAD")


def test_model_and_version_are_kept_for_the_router() -> None:
    assert match_route("POST", "/v2/models/a/versions/2/infer") == OipRoute(INFER, "a", "2")
    assert match_route("GET", "/v2/models/a/ready") == OipRoute(MODEL_READY, "a", None)


def contexts() -> tuple[dict[str | None, ssl.SSLContext], PeerTls]:
    made: dict[str | None, ssl.SSLContext] = {}

    def peer(node_id: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        made[node_id] = node_checked(context, node_id) if node_id else context
        return made[node_id]

    return made, peer


def test_fleet_nodes_of_a_topology_are_reached_only_over_https_each_checked_to_be_the_node_named() -> None:
    made, peer = contexts()
    topology = Topology(
        "self-id", "dev", "device", "https://10.0.0.1:9443",
        parents=(("edge-a", "https://10.0.0.2:9443", "edge-a-id"), ("edge-b", "http://10.0.0.3:8080", "edge-b-id"),
                 ("odd", "https://10.0.0.4:9443", None)),
        cloud=(("https://triton.example", "https://triton.example", None), ("c1", "https://10.0.0.9:9443", "c1-id")),
    )  # fmt: skip

    targets, refused = topology.plan(peer_tls=peer)

    assert [(t.tier, t.url, t.node_id) for t in targets] == [
        ("local", "https://10.0.0.1:9443", "self-id"),
        ("parent", "https://10.0.0.2:9443", "edge-a-id"),
        ("cloud", "https://triton.example", None),
        ("cloud", "https://10.0.0.9:9443", "c1-id"),
    ]
    assert [t.tls for t in targets] == [made["self-id"], made["edge-a-id"], None, made["c1-id"]]
    assert made["edge-a-id"].sslobject_class is not ssl.SSLObject
    assert len(refused) == 2
    assert "only over https" in refused[0]
    assert "names no node" in refused[1]
    # without the node's certificate (an operator's gateway), no fleet node is a target
    targets, refused = topology.plan()
    assert [t.url for t in targets] == ["https://triton.example"]


def test_node_checked_refuses_a_context_that_verifies_nothing() -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="verifies certificates"):
        node_checked(context, "n")


def test_the_identity_error_is_found_behind_the_wrappers() -> None:
    inner = PeerIdentityError("the peer's certificate names node b, not node a (the one expected there)")
    outer = ConnectionError("connect failed")
    outer.__cause__ = ssl.SSLError("wrapped")
    outer.__cause__.__cause__ = inner
    assert find_peer_identity_error(outer) is inner
    assert str(inner).startswith("the peer's certificate names node b")
    assert find_peer_identity_error(ValueError("x")) is None


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b'{"error": "node revoked", "code": "unauthenticated"}', "refused this caller for node n1: node revoked"),
        (b"<html>proxy says no</html>", "refused this caller for node n1: <html>proxy says no</html>"),
        (b'["not", "an", "object"]', 'refused this caller for node n1: ["not", "an", "object"]'),
        (b'{"error": "a\\u001b[2Jb"}', "refused this caller for node n1: a\\x1b[2Jb"),  # escapes stay written out
        (b"[" * 100_000, "refused this caller for node n1: " + "[" * 200),  # past the parser's depth
    ],
)  # fmt: skip
def test_a_refused_topology_says_the_control_planes_words_not_its_json(body: bytes, said: str) -> None:
    """The gateway logged the control plane's JSON answer whole ({"error": ..., "code": ...}) when it was refused."""
    import asyncio

    import httpx

    from strata.core.errors import AuthError
    from strata.route.topology import fetch_topology

    transport = httpx.MockTransport(lambda _request: httpx.Response(401, content=body))
    with pytest.raises(AuthError) as refused:
        asyncio.run(fetch_topology("https://cp.example", "n1", "t", transport=transport))
    assert str(refused.value).endswith(said)
