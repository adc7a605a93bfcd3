"""HTTPS with mutual TLS for the control plane under uvicorn, and the limits on its connections.

uvicorn verifies client certificates (against the fleet CA) but does not tell the application which one was
presented; this protocol adds the ASGI TLS extension (`scope["extensions"]["tls"]`, with the verified leaf in
`client_cert_chain`) so the API can authorize a node by the id its certificate names.

uvicorn also lets a connection that sends no request (after its TLS handshake), or a request head a byte now and
then, stay open for ever: its keep-alive timeout starts only after a response, and any byte stops it; and one that
never begins TLS stays for the event loop's 60 s handshake timeout. Anyone who can reach the port could hold
connections until the server ran out of file descriptors, and then it could open neither a node's connection nor
its own database files. So (`ConnectionLimits`) the TLS handshake must end within `header_timeout_s` (`server_loop`),
a request head must be complete within it of the handshake or of the previous response (408, closed; a connection
that sent nothing is closed), a body must bring `MIN_BODY_RATE` bytes a second in each window of `header_timeout_s`
after its head (not a deadline: a package upload may rightly take hours; a body the application is not reading yet
is not judged), at most MAX_PIPELINE requests may be sent ahead of their answers, and past `max_connections` open
connections a new one is closed at once, which keeps the descriptors the server needs for its own work.
Connections still in their TLS handshake are not counted against the cap: they last `header_timeout_s` at most. An
answer the client does not read is bounded by the close: once answered, a connection idle for `header_timeout_s`
is closed (as uvicorn's keep-alive timeout does, after 5 s), and the TLS close gives the client the loop's
`ssl_shutdown_timeout` (30 s) to take what is left, then drops it; the pipeline's cap bounds how much is left.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Final, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from strata.core.logformat import Quieted

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS: Final = 50_000
REFUSED_LOG_EVERY_S: Final = 60.0
# A body's floor rate after its grace: far below any link a node or an operator uploads over (a GPRS modem sends
# 3-5 KB/s), and it makes holding `max_connections` bodies open cost an attacker that many KiB a second.
MIN_BODY_RATE: Final = 1024
MAX_PIPELINE: Final = 16  # requests queued behind the one being answered (no client of strata pipelines at all)
_HEAD_TIMEOUT_ANSWER: Final = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    """`--max-connections` and `--header-timeout` of `strata server`, per server process."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout_s: float = 10.0


class ConnectionCounts:
    """This process's connection counts, for /metrics (one server per process; tests that run several in one
    process read differences)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0
        self.refused = 0  # closed at once: `max_connections` were open
        self.header_timeouts = 0  # closed with no complete request head in `header_timeout_s`
        self.slow_bodies = 0  # closed: a body came slower than MIN_BODY_RATE after its grace
        self.pipelined = 0  # closed: more than MAX_PIPELINE requests sent ahead of their answers
        self._quieted = Quieted(REFUSED_LOG_EVERY_S)

    def refuse(self, limit: int) -> None:
        with self.lock:
            self.refused += 1
            if self._quieted.due("refused", time.monotonic()):
                log.warning(
                    "%d connections open, the most this server takes (--max-connections): closing new ones at once"
                    " (%d so far); see strata_server_connections_refused_total",
                    limit,
                    self.refused,
                )


COUNTS: Final = ConnectionCounts()
_handshake_timeout_s = ConnectionLimits.header_timeout_s  # this process's server's (`protocol_with`)


if sys.platform == "win32":  # uvloop is not built for Windows
    _LoopBase = asyncio.SelectorEventLoop
else:  # as uvicorn chooses where it is installed (strata[server] installs it)
    from uvloop import Loop as _LoopBase


class _ServerLoop(_LoopBase):
    """The event loop whose TLS listeners end a handshake that has not finished in the header timeout instead of
    the loop's default 60 s."""

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", _handshake_timeout_s)
        # uvloop's server is not an asyncio.Server, but has all it does (asyncio's own type of this method)
        return cast(asyncio.Server, await super().create_server(*args, **kwargs))


def server_loop() -> asyncio.AbstractEventLoop:
    """The server's event loop (`_ServerLoop`); uvicorn takes it as `loop="strata.control.tls:server_loop"`."""
    return _ServerLoop()


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection, or None on a plain one."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None if cipher is None else cipher[0],
    }


class MutualTlsHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the TLS extension in every request's scope and the limits on what a
    connection may hold (`ConnectionLimits`, set per server by `protocol_with`): the connection cap, the request
    head timeout, the body's and the answer's floor rates and the pipeline's depth."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _tls: dict[str, Any] | None = None
    _counted = False
    _head_timer: asyncio.TimerHandle | None = None
    _head_begun = False  # a byte of a request head not yet complete has come
    _answered = False  # a request of this connection has been answered (an idle one since is only kept alive)
    _body_timer: asyncio.TimerHandle | None = None
    _body_bytes = 0  # body bytes received in the window being judged

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvicorn's protocol narrows the argument to a stream transport, which its server always hands it
        super().connection_made(cast(asyncio.Transport, transport))
        if len(self.connections) > self.limits.max_connections:
            COUNTS.refuse(self.limits.max_connections)
            self.transport.abort()  # at once: no close_notify exchange to wait on while the descriptors run out
            return
        with COUNTS.lock:
            COUNTS.open += 1
        self._counted = True
        self._tls = tls_extension(transport)
        self._await_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        if self._tls is not None:
            scope = cast(dict[str, Any], self.scope)  # uvicorn's scope TypedDict has no `extensions` key
            scope["extensions"] = {"tls": self._tls}

    def on_headers_complete(self) -> None:
        self._stop(self._head_timer)
        self._head_timer, self._head_begun = None, False
        super().on_headers_complete()
        if self.transport.is_closing():  # the rest of a chunk is parsed after a cut
            return
        if len(self.pipeline) > MAX_PIPELINE:  # requests sent ahead of their answers, queued whole by uvicorn
            with COUNTS.lock:
                COUNTS.pipelined += 1
            self.transport.abort()
            return
        self._judge_body_from(self.loop.time() + self.limits.header_timeout_s)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop(self._body_timer)
        self._body_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._answered = True
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._await_head()  # the next request's head: uvicorn's keep-alive timeout stops at its first byte

    def handle_websocket_upgrade(self) -> None:
        self._release()  # the connection is the websocket protocol's from here on: this one hears no more of it
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def _release(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            self._stop(timer)
        self._head_timer = self._body_timer = None
        if self._counted:
            self._counted = False
            with COUNTS.lock:
                COUNTS.open -= 1

    @staticmethod
    def _stop(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    def _await_head(self) -> None:
        self._stop(self._head_timer)
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a request under way is not cut (its head was complete)
        if self._answered and not self._head_begun:
            # A kept-alive connection left idle, as uvicorn's own keep-alive timeout ends it: closed, not cut, so an
            # answer the transport still holds (a large one, to a slow client) goes out first.
            self.transport.close()
            return
        with COUNTS.lock:
            COUNTS.header_timeouts += 1
        self._cut(self._head_begun)

    def _judge_body_from(self, start: float) -> None:
        """Judge the bytes of the body that come from now until `header_timeout_s` after `start` (the first
        window, from the head, is twice as long: its grace)."""
        self._stop(self._body_timer)
        self._body_bytes = 0
        self._body_timer = self.loop.call_at(start + self.limits.header_timeout_s, self._judge_body, start)

    def _judge_body(self, start: float) -> None:
        """A window of the body has passed: cut it if fewer than MIN_BODY_RATE bytes a second came in it, unless
        the application has not read what came (its reading is paused: not the client's to send)."""
        self._body_timer = None
        now = self.loop.time()
        if self.transport.is_closing():
            return
        if not self.flow.read_paused and self._body_bytes < (now - start) * MIN_BODY_RATE:
            with COUNTS.lock:
                COUNTS.slow_bodies += 1
            self._cut(self.cycle is not None and not self.cycle.response_started)
            return
        self._judge_body_from(now)

    def _cut(self, answer: bool) -> None:
        """End the connection: with a 408 when the client is owed one (it began a request not yet answered)."""
        if answer:
            self.transport.write(_HEAD_TIMEOUT_ANSWER)
            self.transport.close()
        else:
            self.transport.abort()


def protocol_with(limits: ConnectionLimits) -> type[MutualTlsHttpProtocol]:
    """The protocol class of one server: `MutualTlsHttpProtocol` under `limits` (whose header timeout is also the
    TLS handshake's in `server_loop`: one server per process)."""
    global _handshake_timeout_s
    _handshake_timeout_s = limits.header_timeout_s
    return cast(
        type[MutualTlsHttpProtocol], type("MutualTlsHttpProtocol", (MutualTlsHttpProtocol,), {"limits": limits})
    )


def server_context_args(cert: str, key: str, ca: str, limits: ConnectionLimits | None = None) -> dict[str, Any]:
    """uvicorn Config arguments for HTTPS that asks for (and verifies) client certificates from the fleet CA, with
    `limits` on the connections (default: `ConnectionLimits()`).

    Certificates are optional at the TLS layer because operators authenticate with bearer tokens and enrolling
    nodes have none yet; the API refuses node calls without one.
    """
    return {
        "ssl_certfile": cert,
        "ssl_keyfile": key,
        "ssl_ca_certs": ca,
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "http": protocol_with(limits or ConnectionLimits()),
        "loop": "strata.control.tls:server_loop",
    }
