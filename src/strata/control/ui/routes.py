"""The console's routes under `/ui`: sign-in and sign-out, the static page and its assets (no credential), and
the JSON its pages read (`/ui/api/...`, with the session cookie) and the rollout actions (admin, CSRF token).

Routers only parse, call `ConsoleData` or a service, and serialise, like `/v1`'s; errors answer in the API's one
JSON shape. `SecurityHeaders` adds the Content-Security-Policy and its companions to every `/ui` answer.
"""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any, Final
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strata.control.api.deps import BoundedRoute
from strata.control.auth import Access, Authenticator, Principal, authorize
from strata.control.inventory import MAX_PAGE, parse_sort
from strata.control.plane import ControlPlane
from strata.control.rollouts import RolloutView
from strata.control.ui.console import ConsoleData
from strata.control.ui.session import (
    COOKIE,
    CSRF_HEADER,
    SECURITY_HEADERS,
    cleared_cookie,
    csrf_token,
    csrf_valid,
    same_origin,
    session_cookie,
)
from strata.core.counts import give_back
from strata.core.errors import AuthError, Forbidden, NotFound, StrataError, Unavailable
from strata.core.wire import parse_selector

PREFIX: Final = "/ui"
MAX_LOGIN_BODY: Final = 4096
EVENTS_TICK_S: Final = 2.0  # the longest a page waits to refresh when nothing bumps the fleet generation
EVENTS_STREAM_S: Final = 300.0  # then the stream ends and the browser's EventSource reconnects
MAX_EVENT_STREAMS: Final = 256  # open event streams per server process; more are answered 503
# Open event streams per API token (a few tabs): one token, read-only too, cannot take the whole server's streams
# and leave every other operator's console without live updates.
MAX_EVENT_STREAMS_PER_TOKEN: Final = 8
_ASSET: Final = re.compile(r"\A[a-z0-9-]+\.(js|css|svg)\Z")
_TYPES: Final = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
_ACTIONS: Final = ("pause", "resume", "abort")

router = APIRouter(prefix=PREFIX, include_in_schema=False, route_class=BoundedRoute)


def _static(name: str) -> bytes:
    return resources.files("strata.control.ui").joinpath("static", name).read_bytes()


class SecurityHeaders:
    """ASGI middleware: the console's security headers on every answer under `/ui` (other paths pass untouched,
    at the cost of one string comparison: the agents' polls go through here too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode().lower() not in SECURITY_HEADERS]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_secured)


def _plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


def _data(request: Request) -> ConsoleData:
    data: ConsoleData = request.app.state.console
    return data


def _session(request: Request) -> tuple[Principal, str]:
    """The signed-in operator and the session's secret (the token its cookie holds).

    Raises:
        AuthError: no cookie, or a token that is unknown or revoked.
    """
    secret = request.cookies.get(COOKIE)
    if not secret:
        raise AuthError("not signed in to the console: sign in at /ui/login")
    principal = _plane(request).authenticator.authenticate(secret)
    authorize(principal, Access.READ)
    return principal, secret


Session = Annotated[tuple[Principal, str], Depends(_session)]


def _acting(request: Request, session: Session) -> Principal:
    """An operator who may act: admin scope, a request from the console's own pages, with the CSRF token.

    Raises:
        Forbidden: a read-only token, another site's request, or a missing or wrong CSRF token.
    """
    principal, secret = session
    authorize(principal, Access.ADMIN)
    if not same_origin(request.headers, request.headers.get("host")):
        raise Forbidden("a console action must come from the console's own pages")
    if not csrf_valid(secret, request.headers.get(CSRF_HEADER)):
        raise Forbidden("missing or wrong CSRF token: reload the console and try again")
    return principal


Acting = Annotated[Principal, Depends(_acting)]


def _page(name: str, status: int = 200, error: str = "") -> Response:
    body = _static(name).decode().replace("{{error}}", html.escape(error))
    return Response(body, status_code=status, media_type="text/html", headers={"cache-control": "no-store"})


@router.get("")
def root() -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/", status_code=303)


@router.get("/")
def console(request: Request) -> Response:
    """The console's one page (its script draws each view), or the sign-in page without a valid session."""
    try:
        _session(request)
    except (AuthError, Forbidden):
        return RedirectResponse(f"{PREFIX}/login", status_code=303)
    return _page("console.html")


@router.get("/login")
def login_page() -> Response:
    return _page("login.html")


@router.post("/login")
async def login(request: Request) -> Response:
    """Sign in: a form posting `token` (an API token of either scope). Sets the session cookie and goes to the
    console; a wrong token shows the form again with a 401."""
    if not same_origin(request.headers, request.headers.get("host")):
        return _page("login.html", 403, "sign in from this server's own page")
    body = b""
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_LOGIN_BODY:
            return _page("login.html", 413, "that is not an API token")
    token = (parse_qs(body.decode(errors="replace")).get("token") or [""])[0].strip()
    plane = _plane(request)
    try:
        principal = await asyncio.to_thread(plane.authenticator.authenticate, token)
        authorize(principal, Access.READ)
    except (AuthError, Forbidden):
        return _page("login.html", 401, "unknown or revoked token")
    response = RedirectResponse(f"{PREFIX}/", status_code=303)
    response.headers["set-cookie"] = session_cookie(token)
    response.headers["cache-control"] = "no-store"
    return response


@router.post("/logout")
def logout(session: Session, request: Request) -> Response:
    """Sign out (with the CSRF token in its header): the browser drops the cookie."""
    _, secret = session
    if not csrf_valid(secret, request.headers.get(CSRF_HEADER)):
        raise Forbidden("missing or wrong CSRF token: reload the console and try again")
    response = Response(status_code=204)
    response.headers["set-cookie"] = cleared_cookie()
    return response


@router.get("/static/{name}")
def asset(name: str) -> Response:
    """The console's scripts and styles, shipped in the package: no credential (they hold no data)."""
    if not _ASSET.match(name):
        raise NotFound(f"no console asset {name[:60]!r}")
    try:
        content = _static(name)
    except (FileNotFoundError, IsADirectoryError):
        raise NotFound(f"no console asset {name!r}") from None
    return Response(content, media_type=_TYPES[name.rsplit(".", 1)[1]], headers={"cache-control": "no-cache"})


# --- the pages' data ------------------------------------------------------------------------------------------

_NO_STORE: Final = {"cache-control": "no-store"}


@router.get("/api/session")
def session_info(session: Session, response: Response) -> dict[str, Any]:
    """Who is signed in: the scope (what the page offers) and the CSRF token its actions send."""
    principal, secret = session
    response.headers.update(_NO_STORE)
    return {"scope": principal.scope, "csrf": csrf_token(secret)}


@router.get("/api/fleet")
def fleet(
    request: Request,
    _session: Session,
    response: Response,
    selector: str = "",
    sort: str | None = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> dict[str, Any]:
    response.headers.update(_NO_STORE)
    return _data(request).fleet(parse_selector(selector), parse_sort(sort), offset, limit)


@router.get("/api/nodes/{node_id}")
def node(request: Request, node_id: str, _session: Session, response: Response) -> dict[str, Any]:
    response.headers.update(_NO_STORE)
    return _data(request).node(node_id)


@router.get("/api/models")
def models(request: Request, _session: Session, response: Response) -> dict[str, Any]:
    response.headers.update(_NO_STORE)
    return _data(request).models()


@router.get("/api/rollouts")
def rollouts(request: Request, _session: Session, response: Response) -> dict[str, Any]:
    response.headers.update(_NO_STORE)
    return _data(request).rollouts()


@router.post("/api/rollouts/{rollout_id}/{action}")
def rollout_action(request: Request, rollout_id: str, action: str, _operator: Acting) -> dict[str, Any]:
    """Pause, resume or abort (every node back to what it had) a rollout, as `/v1/rollouts/{id}/...` does."""
    service = _plane(request).rollouts
    if action not in _ACTIONS:
        raise NotFound(f"no rollout action {action[:40]!r}; one of {list(_ACTIONS)}")
    view: RolloutView = getattr(service, action)(rollout_id)
    return {"id": view.id, "status": view.status, "message": view.message}


@router.get("/api/events")
async def events(request: Request, session: Session) -> StreamingResponse:
    """Server-sent events: `generation` as soon as the fleet's desired states change, `tick` every couple of
    seconds otherwise (status reports and rollout progress do not bump the generation); the page refreshes its
    data on either. The stream ends after a few minutes (the browser reconnects) and at shutdown."""
    feed = _plane(request).feed
    by_token: dict[str, int] = request.app.state.console_streams_by_token
    if sum(by_token.values()) >= MAX_EVENT_STREAMS:
        # each open stream wakes every couple of seconds on the loop that answers the nodes' long polls
        raise Unavailable(f"{MAX_EVENT_STREAMS} console event streams are open on this server; retry later")
    token = session[0].token_id or ""
    if by_token.get(token, 0) >= MAX_EVENT_STREAMS_PER_TOKEN:
        raise Unavailable(
            f"{MAX_EVENT_STREAMS_PER_TOKEN} console event streams are open with this token; close a tab or retry later"
        )
    by_token[token] = by_token.get(token, 0) + 1
    authenticator, secret = _plane(request).authenticator, session[1]

    async def stream() -> AsyncIterator[bytes]:
        try:
            loop = asyncio.get_running_loop()
            ends = loop.time() + EVENTS_STREAM_S
            seen = -1
            yield b"retry: 2000\n\n"
            while not feed.closed and loop.time() < ends and await _still_valid(authenticator, secret):
                generation = feed.generation
                yield f"event: {'generation' if generation != seen else 'tick'}\ndata: {generation}\n\n".encode()
                seen = generation
                await feed.wait_beyond(seen, EVENTS_TICK_S)
        finally:
            give_back(by_token, token)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=_NO_STORE)


async def _still_valid(authenticator: Authenticator, secret: str) -> bool:
    """Whether the session's token still holds: a stream opened before its revocation ends at its next tick (it
    went on for its five minutes, holding its place in the stream bounds). A token in the cache costs nothing; one
    not there (a revocation evicts it) is looked up off the event loop."""
    if authenticator.authenticate_cached(secret) is not None:
        return True
    try:
        await asyncio.to_thread(authenticator.authenticate, secret)
    except StrataError:  # revoked, or the database failed: the browser reconnects and signs in again if it can
        return False
    return True


def install_console(app: FastAPI) -> None:
    """Serve the console at `/ui` on `app` (whose `state.plane` is set)."""
    app.state.console = ConsoleData(app.state.plane)
    app.state.console_streams_by_token = {}  # open event streams by API token id (their sum: the server's)
    app.include_router(router)
    # Someone who types the server's host and port into a browser meets the console (its sign-in page), not a 404.
    # The redirect says only where the console is, to anyone, as the console's own pages do.
    app.add_api_route("/", root, methods=["GET"], include_in_schema=False)
    app.add_middleware(SecurityHeaders)
