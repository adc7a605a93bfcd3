"""The Open Inference Protocol routes the gateway serves or forwards, matched strictly (a pure decision).

The gateway forwards a request to other tiers (the node's parents over mutual TLS, cloud endpoints) only when it
is one of the protocol's routes the agent itself serves: `GET /v2`, `GET /v2/models/{m}[/versions/{v}]`,
`GET .../ready` and `POST .../infer`. Its own routes are `GET /v2/health/live`, `GET /v2/health/ready` and
`GET /metrics`; nothing else is answered but 404, and a known route asked with another method 405.

A path is matched segment by segment and refused whole when it has an empty segment, a dot segment, a
backslash, a percent sign (the server has decoded the path once: one left is an encoded escape), or a model
name or version outside `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`; the path sent on is rebuilt from the parts
matched, never copied from the request, and carries no query string (the protocol has none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_PATH: Final = 600  # /v2/models/{128}/versions/{128}/infer is about 300

# what a route does: the gateway answers the first three itself, and forwards the others
LIVE: Final = "live"
READY: Final = "ready"
METRICS: Final = "metrics"
SERVER_METADATA: Final = "server_metadata"
MODEL_METADATA: Final = "model_metadata"
MODEL_READY: Final = "model_ready"
INFER: Final = "infer"
_LOCAL_KINDS: Final = frozenset((LIVE, READY, METRICS))


@dataclass(frozen=True)
class OipRoute:
    """A matched route: what it is, the model and version it names, and the method it is sent on with."""

    kind: str
    model: str | None = None
    version: str | None = None

    @property
    def forwarded(self) -> bool:
        """Whether the gateway sends it down the tiers (else it answers itself)."""
        return self.kind not in _LOCAL_KINDS

    @property
    def method(self) -> str:
        """The method the route is served on (HEAD is accepted for GET, and sent on as GET)."""
        return "POST" if self.kind == INFER else "GET"

    @property
    def path(self) -> str:
        """The path to send on, built from the matched parts."""
        if self.kind == LIVE:
            return "/v2/health/live"
        if self.kind == READY:
            return "/v2/health/ready"
        if self.kind == METRICS:
            return "/metrics"
        if self.kind == SERVER_METADATA or self.model is None:
            return "/v2"
        path = f"/v2/models/{quote(self.model, safe='')}"
        if self.version is not None:
            path += f"/versions/{quote(self.version, safe='')}"
        if self.kind == MODEL_READY:
            path += "/ready"
        elif self.kind == INFER:
            path += "/infer"
        return path


@dataclass(frozen=True)
class RouteRefusal:
    """Why a request matches no route: 404 (no such route, or a path refused whole) or 405 (with Allow)."""

    status: int
    reason: str
    allow: str | None = None


def match_route(method: str, path: str) -> OipRoute | RouteRefusal:
    """The route `method path` asks for (`path` as the HTTP server decoded it, without its query), or why none.

    Only the routes in the module's docstring match; see there what makes a path refused whole.
    """
    route = _match_path(path)
    if isinstance(route, RouteRefusal):
        return route
    allowed = ("GET", "HEAD") if route.method == "GET" else ("POST",)
    if method not in allowed:
        return RouteRefusal(405, f"{method} is not allowed on {route.path}", ", ".join(allowed))
    return route


def _match_path(path: str) -> OipRoute | RouteRefusal:
    unsafe = RouteRefusal(404, "no route: the path has an empty or dot segment, or an escaped or unsafe character")
    if len(path) > _MAX_PATH:
        return RouteRefusal(404, "no route: the path is too long")
    if not path.startswith("/") or "\\" in path or "%" in path or not path.isprintable():
        return unsafe
    parts = tuple(path[1:].split("/"))
    if any(part in ("", ".", "..") for part in parts):
        return unsafe
    match parts:
        case ("v2",):
            return OipRoute(SERVER_METADATA)
        case ("v2", "health", "live"):
            return OipRoute(LIVE)
        case ("v2", "health", "ready"):
            return OipRoute(READY)
        case ("metrics",):
            return OipRoute(METRICS)
        case ("v2", "models", model, "versions", version, *action):
            return _model_route(model, version, tuple(action))
        case ("v2", "models", model, *action):
            return _model_route(model, None, tuple(action))
    return RouteRefusal(404, "no such Open Inference Protocol route")


def _model_route(model: str, version: str | None, action: tuple[str, ...]) -> OipRoute | RouteRefusal:
    if not NAME_PATTERN.fullmatch(model) or (version is not None and not NAME_PATTERN.fullmatch(version)):
        return RouteRefusal(
            404, "no route: a model name or version must be 1-128 of [A-Za-z0-9._-], alphanumeric first"
        )
    match action:
        case ():
            return OipRoute(MODEL_METADATA, model, version)
        case ("ready",):
            return OipRoute(MODEL_READY, model, version)
        case ("infer",):
            return OipRoute(INFER, model, version)
    return RouteRefusal(404, "no such Open Inference Protocol route")
