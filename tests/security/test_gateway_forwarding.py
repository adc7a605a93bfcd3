"""Attacks on `strata gateway` as an open proxy: a real gateway process whose cloud endpoint is a loopback HTTP
server that records every request it receives (the attacker's observation point on the far side).

Whatever the caller sends (dot segments, encoded dots, slashes and backslashes, empty segments, odd model
names, other methods, query strings, its own credentials), only the Open Inference Protocol routes the agent
serves may arrive there, on a path rebuilt by the gateway; everything else is answered 404 or 405 at the gateway.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from strata.localfleet import GatewayHandle, LocalFleet

# what may ever reach a target: the forwarded OIP routes, and the gateway's own health probes
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_MODEL = rf"/v2/models/{_NAME}(/versions/{_NAME})?"
ALLOWED = [
    ("GET", re.compile(r"/v2")),
    ("GET", re.compile(r"/v2/health/ready")),
    ("GET", re.compile(_MODEL)),
    ("GET", re.compile(_MODEL + "/ready")),
    ("POST", re.compile(_MODEL + "/infer")),
]


@dataclass
class Recorder:
    """A loopback HTTP server that answers 200 to anything and remembers what it was asked."""

    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self) -> ThreadingHTTPServer:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                with recorder.lock:
                    recorder.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = json.dumps({"ok": True}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = _any

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        with self.lock:
            return list(self.seen)

    def forwarded(self) -> list[tuple[str, str]]:
        """What arrived, less the gateway's health probes."""
        return [(m, p) for m, p, _ in self.requests() if p != "/v2/health/ready" and not p.endswith("/ready")]


@dataclass
class Setup:
    gateway: GatewayHandle
    recorder: Recorder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    recorder = Recorder()
    server = recorder.serve()
    cloud = f"http://127.0.0.1:{server.server_address[1]}"
    with LocalFleet(tmp_path_factory.mktemp("gw")) as fleet:
        gateway = fleet.start_gateway("proxy", ["--cloud", cloud, "--health-interval", "30", "--timeout", "5"])
        yield Setup(gateway, recorder)
    server.shutdown()
    server.server_close()


def send(gateway: GatewayHandle, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One request with the request target exactly as written (http.client does not normalize it)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=15)
    try:
        connection.request(method, target, body=body or None, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


ESCAPES = [
    ("DELETE", "/v2/models/secret/../../../admin/secret?x=1"),
    ("GET", "/v2/../admin"),
    ("GET", "/v2/./models/m/ready"),
    ("POST", "/v2/models/x/infer/../../../y"),
    ("GET", "/v2/models/%2e%2e/%2e%2e/admin"),
    ("GET", "/v2/models/%2E%2E/%2E%2E/%2E%2E/admin/secret"),
    ("GET", "/v2/models/x%2F..%2F..%2F..%2Fadmin/ready"),
    ("GET", "/v2/models/x%2f..%2f..%2fadmin"),
    ("GET", "/v2/models/x%5c..%5c..%5cadmin/ready"),
    ("GET", "/v2/models/%252e%252e/ready"),
    ("POST", "/v2/models/x/versions/..%2F..%2F..%2Fadmin/infer"),
    ("GET", "//v2/models/m/ready"),
    ("GET", "/v2//models/m/ready"),
    ("GET", "/v2/models/m/ready/"),
    ("GET", "/v2/models/.hidden/ready"),
    ("GET", "/v2/models/-x/ready"),
    ("GET", "/v2/models/a%20b"),
    ("GET", "/v2/models/a%00b/ready"),
    ("GET", "/v2/models/" + "a" * 129),
    ("GET", "/v2/repository/index"),
    ("POST", "/v2/repository/models/m/load"),
    ("POST", "/v2/models/m/versions/1/infer/extra"),
    ("GET", "/v2/models"),
    ("GET", "/admin"),
    ("GET", "/"),
]


@pytest.mark.parametrize(("method", "target"), ESCAPES)
def test_paths_outside_the_protocol_are_404_and_never_reach_a_target(setup: Setup, method: str, target: str) -> None:
    before = len(setup.recorder.forwarded())
    status, headers, body = send(setup.gateway, method, target)
    assert status == 404, (status, body)
    assert "strata-served-by" not in headers  # answered by the gateway itself
    assert len(setup.recorder.forwarded()) == before


WRONG_METHODS = [
    ("DELETE", "/v2/models/secret", "GET, HEAD"),
    ("PUT", "/v2/models/m/infer", "POST"),
    ("PATCH", "/v2", "GET, HEAD"),
    ("OPTIONS", "/v2/models/m/ready", "GET, HEAD"),
    ("GET", "/v2/models/m/infer", "POST"),
    ("POST", "/v2/models/m/ready", "GET, HEAD"),
    ("DELETE", "/v2/health/ready", "GET, HEAD"),
    ("POST", "/metrics", "GET, HEAD"),
]


@pytest.mark.parametrize(("method", "target", "allow"), WRONG_METHODS)
def test_other_methods_on_known_routes_are_405_and_never_reach_a_target(
    setup: Setup, method: str, target: str, allow: str
) -> None:
    before = len(setup.recorder.forwarded())
    status, headers, body = send(setup.gateway, method, target)
    assert (status, headers.get("allow")) == (405, allow), body
    assert len(setup.recorder.forwarded()) == before


def test_metrics_are_the_gateways_own_and_never_forwarded(setup: Setup) -> None:
    status, headers, body = send(setup.gateway, "GET", "/metrics")
    assert status == 200
    assert b"strata_gateway_requests_total" in body
    assert "strata-served-by" not in headers
    assert not [p for _, p, _ in setup.recorder.requests() if "metrics" in p]


def test_known_routes_arrive_rebuilt_without_query_string_or_the_callers_credentials(setup: Setup) -> None:
    asks = [
        ("GET", "/v2?debug=1", "GET", "/v2"),
        ("GET", "/v2/models/digits?x=../../admin", "GET", "/v2/models/digits"),
        ("HEAD", "/v2/models/digits/versions/1", "GET", "/v2/models/digits/versions/1"),
        ("POST", "/v2/models/digits/versions/2.1-rc_1/infer?x=1", "POST", "/v2/models/digits/versions/2.1-rc_1/infer"),
        ("POST", "/v2/models/m%2Ex/infer", "POST", "/v2/models/m.x/infer"),  # one decoded dot in a name is a name
    ]
    secret = {
        "authorization": "Bearer caller-secret",
        "cookie": "session=caller-secret",
        "x-forwarded-for": "10.9.9.9",
        "proxy-authorization": "Basic Y2FsbGVyOnNlY3JldA==",
        "content-type": "application/json",
        "inference-header-content-length": "2",
        "strata-budget-ms": "5000",
    }
    for method, target, expected_method, expected_path in asks:
        before = len(setup.recorder.requests())
        status, headers, _ = send(setup.gateway, method, target, b"{}" if method == "POST" else b"", secret)
        assert (status, headers["strata-served-by"]) == (200, "cloud"), target
        arrived = [r for r in setup.recorder.requests()[before:] if not r[1].endswith("health/ready")]
        assert [(m, p) for m, p, _ in arrived][-1:] == [(expected_method, expected_path)]
        received = arrived[-1][2]
        assert not {"authorization", "cookie", "x-forwarded-for", "proxy-authorization"} & set(received)
        assert "caller-secret" not in json.dumps(received)
        if method == "POST":
            assert (received["content-type"], received["inference-header-content-length"]) == ("application/json", "2")


def test_nothing_but_protocol_routes_ever_arrived(setup: Setup) -> None:
    """Runs last in this module: every request the far side saw, from every test above, was an OIP route."""
    seen = setup.recorder.requests()
    assert seen  # the known routes did arrive
    for method, path, _ in seen:
        assert any(m == method and rx.fullmatch(path) for m, rx in ALLOWED), (method, path)


def test_the_gateway_log_has_no_unhandled_error(setup: Setup, tmp_path: Path) -> None:
    log = setup.gateway.process.log_path.read_text(errors="replace")
    assert "Traceback" not in log


def test_the_gateway_log_holds_no_line_per_forwarded_request(setup: Setup) -> None:
    """httpx logged every request the gateway sent at INFO: a line per forwarded request and per health probe."""
    assert setup.recorder.requests()  # requests were forwarded (the tests above)
    log = setup.gateway.process.log_path.read_text(errors="replace")
    assert "HTTP Request:" not in log
    assert "gateway listening on" in log  # the gateway's own lines stay
