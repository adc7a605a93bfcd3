"""A small HTTP/1.1 server on asyncio streams and h11: the transport under the node's inference API.

Why not uvicorn or FastAPI: the agent must stay under 70 MB resident with a small model active. python +
numpy + onnxruntime + one small session take ~56 MB and asyncio (with ssl) ~7 MB more; h11 adds 0.5 MB,
while uvicorn + starlette would add ~7.6 MB and FastAPI ~11 MB. h11 is the HTTP/1.1 parser uvicorn itself
uses, so framing (Content-Length, chunked bodies, keep-alive, `Expect: 100-continue`) is the same well-tested
code; this module only adds the connection loop, limits and shutdown.

The contract: a handler `async (Request) -> Response` sees whole requests (body read up to `max_body_bytes`)
and returns whole responses. The server answers 400 to malformed HTTP, 413 to bodies over the limit, 431 to
oversized headers (then closes), and 500 `{"error": "internal error"}` when the handler raises (logged with
its traceback); handlers are expected to turn every expected error into a 4xx themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

import h11

from strata.core.errors import ConfigError

log = logging.getLogger(__name__)

_READ_SIZE: Final = 256 * 1024
_COALESCE_BYTES: Final = 64 * 1024  # responses up to this size go out in one write (one packet when small)
_LINGER_SECONDS: Final = 2.0  # after refusing a request, how long to swallow what the peer still sends


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request, read whole.

    `path` is percent-decoded and has no query; `query` keeps the last value of a repeated key; `headers`
    has lowercase names, and repeated headers joined with ", ".
    """

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes
    client: tuple[str, int] | None = None
    peer: str | None = None  # the node id a verified client certificate names (TLS listeners only)


@dataclass(slots=True)
class Response:
    """One HTTP response; the server adds Content-Length (and Connection: close when it closes)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def json(cls, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
        """A JSON response (`application/json`)."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        return cls(status, {"content-type": "application/json", **(headers or {})}, body)

    @classmethod
    def error(cls, status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
        """The `{"error": message}` body every strata HTTP error carries."""
        return cls.json(status, {"error": message}, headers)


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class ServerLimits:
    """Every limit of the HTTP server in one place (bytes and seconds)."""

    max_body_bytes: int = 64 << 20
    max_header_bytes: int = 64 << 10
    keep_alive_timeout: float = 5.0  # an idle connection waits this long for its next request
    read_timeout: float = 30.0  # once a request has begun, each read waits at most this long


class _RequestTooLarge(Exception):
    pass


class _Connection:
    """Per-connection state that `stop` looks at: idle connections are closed at once, busy ones finish."""

    __slots__ = ("idle", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.idle = True
        self.writer = writer


class HttpServer:
    """Serve `handler` over HTTP/1.1 with keep-alive, inside the running event loop.

    Usage: `await server.start(host, port)`, read `server.port` (useful with port 0), `await server.stop()`.
    """

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits | None = None,
        peer_identity: Callable[[Any], str | None] | None = None,
    ) -> None:
        """`peer_identity` turns a TLS connection's ssl object into the caller's identity (`Request.peer`)."""
        self._peer_identity = peer_identity
        self._handler = handler
        self._limits = limits or ServerLimits()
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._closing = False

    @property
    def port(self) -> int:
        """The port actually bound (the one the OS chose when started with port 0).

        Raises:
            RuntimeError: the server is not started.
        """
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the HTTP server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, host: str = "127.0.0.1", port: int = 0, ssl: SSLContext | None = None) -> None:
        """Bind and start accepting connections (over TLS with `ssl`); returns once listening.

        Raises:
            ConfigError: the address cannot be bound (in use, not local, no permission).
            RuntimeError: the server is already started.
        """
        if self._server is not None:
            raise RuntimeError("the HTTP server is already started")
        self._closing = False
        try:
            self._server = await asyncio.start_server(self._serve_connection, host, port, limit=_READ_SIZE, ssl=ssl)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, close idle connections, let requests in flight finish for up to `grace` seconds,
        then cancel what is left. Safe to call when not started."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        server.close()
        for connection in list(self._connections.values()):
            if connection.idle:
                connection.writer.close()  # its pending read sees end of file and the connection ends
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(writer)
        self._connections[task] = connection
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_header_bytes)
        peer = writer.get_extra_info("peername")
        client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
        ssl_object = writer.get_extra_info("ssl_object")
        peer_node = self._peer_identity(ssl_object) if ssl_object is not None and self._peer_identity else None
        try:
            while not self._closing:
                try:
                    request = await self._read_request(conn, reader, writer, connection, client)
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    message = "request headers are too large" if status == 431 else f"malformed HTTP request: {exc}"
                    await self._send_error_and_close(conn, reader, writer, status, message)
                    return
                except _RequestTooLarge:
                    message = f"request body is larger than {self._limits.max_body_bytes} bytes"
                    await self._send_error_and_close(conn, reader, writer, 413, message)
                    return
                if request is None:
                    return
                if peer_node is not None:
                    request = dataclasses.replace(request, peer=peer_node)
                response = await self._call_handler(request)
                if self._closing:
                    response.headers["connection"] = "close"
                await self._send(conn, writer, response, head_only=request.method == "HEAD")
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError):
            pass  # the peer went away or stalled: just close
        except asyncio.CancelledError:
            pass  # `stop` ran out of grace; ending quietly also spares Python 3.11's start_server a logged error
        except h11.LocalProtocolError:
            log.exception("cannot send an HTTP response; closing the connection")
        finally:
            del self._connections[task]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: _Connection,
        client: tuple[str, int] | None,
    ) -> Request | None:
        """Read one whole request; None when the peer closed between requests.

        Raises:
            h11.RemoteProtocolError: malformed HTTP, or headers over the limit.
            _RequestTooLarge: the body is over the limit.
            TimeoutError: the peer was idle too long.
        """
        limits = self._limits
        head: h11.Request | None = None
        chunks: list[bytes] = []
        size = 0
        received = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                # idle: waiting for the first byte of the next request, which `stop` may interrupt
                connection.idle = head is None and not received
                timeout = limits.keep_alive_timeout if connection.idle else limits.read_timeout
                async with asyncio.timeout(timeout):
                    data = await reader.read(_READ_SIZE)
                connection.idle = False
                received = True
                conn.receive_data(data)  # b"" tells h11 the peer closed
            elif isinstance(event, h11.Request):
                head = event
                # h11 bounds only a head still arriving; one that came whole in a single read is checked here
                if len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers) > limits.max_header_bytes:
                    raise h11.RemoteProtocolError("request headers are too large", error_status_hint=431)
                declared = _content_length(event)
                if declared is not None and declared > limits.max_body_bytes:
                    raise _RequestTooLarge
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limits.max_body_bytes:
                    raise _RequestTooLarge
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                return _make_request(head, body, client)
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:  # h11.PAUSED cannot happen: we read a request only at the start of a cycle
                raise h11.RemoteProtocolError(f"unexpected HTTP event {event!r}")

    async def _call_handler(self, request: Request) -> Response:
        try:
            return await self._handler(request)
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return Response.error(500, "internal error")

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response, head_only: bool
    ) -> None:
        body = response.body
        headers = [*response.headers.items(), ("content-length", str(len(body)))]
        parts = [conn.send(h11.Response(status_code=response.status, headers=headers)) or b""]
        if body and not head_only:
            # passthrough: with Content-Length framing h11 hands the body back as is, no copy
            parts.extend(conn.send_with_data_passthrough(h11.Data(data=body)) or ())
        parts.append(conn.send(h11.EndOfMessage()) or b"")
        if len(body) <= _COALESCE_BYTES:
            writer.write(b"".join(parts))
        else:
            for part in parts:
                if part:
                    writer.write(part)
        await writer.drain()

    async def _send_error_and_close(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        status: int,
        message: str,
    ) -> None:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            response = Response.error(status, message, {"connection": "close"})
            with contextlib.suppress(h11.LocalProtocolError):
                await self._send(conn, writer, response, head_only=False)
        # Swallow the rest of what the peer sends (a refused body, say): closing with unread data would reset
        # the connection, and a client still uploading would see the reset instead of our answer.
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(_LINGER_SECONDS):
                while await reader.read(_READ_SIZE):
                    pass


def _content_length(head: h11.Request) -> int | None:
    for name, value in head.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked that it is a number
    return None


def _make_request(head: h11.Request, body: bytes, client: tuple[str, int] | None) -> Request:
    headers: dict[str, str] = {}
    for raw_name, raw_value in head.headers:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    target = head.target.decode("latin-1")
    path, _, query = target.partition("?")
    return Request(
        method=head.method.decode("latin-1"),
        path=unquote(path),
        query=dict(parse_qsl(query, keep_blank_values=True)) if query else {},
        headers=headers,
        body=body,
        client=client,
    )
