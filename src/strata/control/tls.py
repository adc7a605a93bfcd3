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
that sent nothing is closed), a body must keep coming at `MIN_BODY_RATE` on average once `header_timeout_s` have
passed since its head (not a deadline: a package upload may rightly take hours; a body the application is not
reading yet is not judged), and past `max_connections` open connections a new one is closed at once, which keeps
the descriptors the server needs for its own work.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Final, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

FD_RESERVE: Final = 256  # descriptors kept for the server's own work: database, blobs, logs, its own clients
REFUSED_LOG_EVERY_S: Final = 60.0
# A body's floor rate after its grace: far below any link a node or an operator uploads over (a GPRS modem sends
# 3-5 KB/s), and it makes holding `max_connections` bodies open cost an attacker that many KiB a second.
MIN_BODY_RATE: Final = 1024
_HEAD_TIMEOUT_ANSWER: Final = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    """`--max-connections` and `--header-timeout` of `strata server`, per server process."""

    max_connections: int = 50_000
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
        self._refused_logged = 0.0

    def refuse(self, limit: int) -> None:
        with self.lock:
            self.refused += 1
            now, quiet = time.monotonic(), self._refused_logged
            if now - quiet >= REFUSED_LOG_EVERY_S or quiet == 0.0:
                self._refused_logged = now
                log.warning(
                    "%d connections open, the most this server takes (--max-connections): closing new ones at once"
                    " (%d so far); see strata_server_connections_refused_total",
                    limit,
                    self.refused,
                )


COUNTS: Final = ConnectionCounts()
_handshake_timeout_s = ConnectionLimits.header_timeout_s  # this process's server's (`protocol_with`)


def server_loop() -> asyncio.AbstractEventLoop:
    """The server's event loop (uvloop where installed, as uvicorn would choose), whose TLS listeners end a
    handshake that has not finished in the header timeout instead of the loop's default 60 s. uvicorn takes it as
    `loop="strata.control.tls:server_loop"`."""
    try:
        import uvloop
    except ImportError:  # uvloop is not built for every platform
        base: type[asyncio.AbstractEventLoop] = asyncio.SelectorEventLoop
    else:
        base = uvloop.Loop

    class Loop(base):  # type: ignore[valid-type,misc]  # a base chosen at run time
        async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", _handshake_timeout_s)
            return cast(asyncio.Server, await super().create_server(*args, **kwargs))

    return cast(asyncio.AbstractEventLoop, Loop())


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (as Go's runtime does for every program:
    a shell's or systemd's default soft limit of 1024 would stop a server at about a thousand nodes); return the
    soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft >= wanted:
        return int(soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:  # a container may refuse it: the soft limit stays
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, wanted, exc)
        return int(soft)
    return int(wanted)


def effective_max_connections(wanted: int, open_files: int) -> int:
    """The connection cap a server process can keep: `wanted`, but never within `FD_RESERVE` descriptors of the
    open files limit (that bound at least 16)."""
    return min(wanted, max(16, open_files - FD_RESERVE))


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
    """uvicorn's httptools protocol, plus the TLS extension in every request's scope, the connection cap and the
    request head timeout (`ConnectionLimits`, set per server by `protocol_with`)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _tls: dict[str, Any] | None = None
    _head_timer: asyncio.TimerHandle | None = None
    _head_begun = False  # a byte of the awaited request head has come
    _counted = False
    _body_timer: asyncio.TimerHandle | None = None
    _body_since = 0.0  # event-loop time the body's floor rate is counted from (after its grace)
    _body_bytes = 0  # body bytes received since then

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
        self._stop_awaiting_head()
        super().on_headers_complete()
        self._stop_timing_body()
        self._body_since = self.loop.time() + self.limits.header_timeout_s
        self._body_bytes = 0
        self._body_timer = self.loop.call_at(self._body_since, self._judge_body)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_timing_body()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._await_head()  # the next request's head: uvicorn's keep-alive timeout stops at its first byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_awaiting_head()
        self._stop_timing_body()
        if self._counted:
            self._counted = False
            with COUNTS.lock:
                COUNTS.open -= 1
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._stop_awaiting_head()
        self._head_begun = False
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _stop_awaiting_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _stop_timing_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _judge_body(self) -> None:
        """At the moment the body's bytes since `_body_since` fall below MIN_BODY_RATE: cut it, unless more came
        meanwhile (then look again when they would fall below) or the application has not read what came (its
        reading is paused: the time counts from now)."""
        self._body_timer = None
        now = self.loop.time()
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the application's to read, not the client's to send
            self._body_since, self._body_bytes = now, 0
        elif self._body_bytes < (now - self._body_since) * MIN_BODY_RATE:
            with COUNTS.lock:
                COUNTS.slow_bodies += 1
            if self.cycle is not None and not self.cycle.response_started:
                self.transport.write(_HEAD_TIMEOUT_ANSWER)
                self.transport.close()
            else:
                self.transport.abort()
            return
        due = self._body_since + self._body_bytes / MIN_BODY_RATE
        self._body_timer = self.loop.call_at(max(due, now + 0.5), self._judge_body)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a request under way is not cut (its head was complete)
        with COUNTS.lock:
            COUNTS.header_timeouts += 1
        if self._head_begun:  # a client that began a request learns why it ends
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
