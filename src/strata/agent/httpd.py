"""A small HTTP/1.1 server on an asyncio protocol and httptools: the transport under the node's inference API.

Why not uvicorn or FastAPI: the agent must stay under 70 MB resident with a small model active. python +
numpy + onnxruntime + one small session take ~56 MB and asyncio (with ssl) ~7 MB more; httptools adds 0.3 MB,
while uvicorn + starlette would add ~7.6 MB and FastAPI ~11 MB. httptools wraps llhttp, the HTTP/1.1 parser of
Node.js, which uvicorn uses too, so framing (Content-Length, chunked bodies, keep-alive, `Expect:
100-continue`, smuggling checks) is well-tested C; this module adds the connection state, limits and shutdown.
Why a protocol rather than asyncio streams and a pure-Python parser: a request then costs the loop about a
fifth of the CPU (~60 µs instead of ~300 µs on a 2-core node), which is most of what a small model's request
costs; the inference server's throughput is the HTTP layer's.

The contract: a handler `async (Request) -> Response` sees whole requests (body read up to `max_body_bytes`)
and returns whole responses; requests on one connection are answered in order, one handler at a time. The
server answers 400 to malformed HTTP, 413 to bodies over the limit, 431 to oversized headers, 408 to a request
whose head or body takes longer than its deadline, 503 past the connection cap or the body budget (then
closes, after reading what the peer still sends for a moment), and 500 `{"error": "internal error"}` when the
handler raises (logged with its traceback); handlers are expected to turn every expected error into a 4xx
themselves.

What a caller can hold (`ServerLimits`): at most `max_connections` connections (past it a new one gets 503 and
lingers 2 s, with at most 64 such refused connections open at once; more are closed at once, unanswered), and the
request bodies of all connections together at most `max_body_bytes_in_flight` bytes. The server accepts for
itself, one connection at a time, and counts a connection from its accept (over TLS, not from its handshake's
end); over TLS at most `max_handshakes` handshakes are under way (more connections wait in the kernel's backlog),
at most `max_address_handshakes` from one address (four times that from an IPv6 /64) while half of those are taken
(more are closed at once), and a handshake must end within `handshake_timeout`. A body is charged to that budget
when its Content-Length arrives (chunked ones as they arrive), before it is read, and released when its answer is
written or its connection ends; a body that would not fit is refused with 503 at once, so a few stalled
uploads cannot make the process grow without bound. The head of a request must arrive within
`header_timeout` of its first byte and the whole request within `body_timeout`, however slowly the peer trickles
bytes (slowloris), and an idle connection is closed after `keep_alive_timeout`. A head may hold at most
`max_header_bytes` and `max_header_count` headers (431 past either). Pipelined requests are charged to the same
budget when parsed (their head's bytes plus what their Python objects cost), except the one a connection is being
answered on; reading pauses at 16 waiting, and past 64 waiting after one read the next is refused (503) and the
rest of the read dropped. A peer that reads none of its answers for `body_timeout` is cut off, and so is one
that does not take the answers still buffered when its connection closes; `stop` drops a TLS connection once
only the client's side of the TLS close is left to wait for (an idle keep-alive client sends it when it next
reads, which may be never). When a MiB of requests has been let go and none is in flight, the cyclic GC runs and
`release_memory` (the agent passes `malloc_trim`) gives the heap back to the OS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import functools
import gc
import ipaddress
import json
import logging
import mmap
import os
import re
import socket
import struct
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from ssl import SSLContext
from typing import Any, Final, cast
from urllib.parse import parse_qsl, unquote

import httptools

from strata.core.counts import give_back
from strata.core.errors import ConfigError
from strata.core.logformat import Quieted
from strata.core.words import clip

log = logging.getLogger(__name__)

_COALESCE_BYTES: Final = 64 * 1024  # responses up to this size go out in one write (one packet when small)
_LINGER_SECONDS: Final = 2.0  # after refusing a request, how long to swallow what the peer still sends
# Connections refused at the cap that may linger so at once; past them one is closed as it is accepted, unanswered.
# Without this bound a caller opening connections faster than they linger held every descriptor the process had
# (asyncio then stopped accepting for a second at a time, and the agent could open neither its state nor a package).
MAX_LINGERING_REFUSALS: Final = 64
_MAX_PIPELINED: Final = 16  # parsed requests waiting on one connection before reading pauses
# one read can hold thousands of small pipelined requests and httptools parses all it is fed: past this many
# waiting on one connection the next is refused (503) and the rest of the read is dropped, unparsed
_MAX_QUEUED: Final = 64
_REQUEST_COST: Final = 1024  # what a parsed request costs in Python objects beyond its head's bytes
_HEADER_COST: Final = 160  # and each of its headers (two str and a dict entry)
_HEADER_NAME = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # \Z: "$" also matches before a final newline
_SERVER_HEADERS: Final = frozenset(("content-length", "connection"))  # the server writes these itself


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
        """The `{"error": message}` body every strata HTTP error carries, the message cut to
        `words.MAX_MESSAGE_CHARS` (it may quote what the caller sent)."""
        return cls.json(status, {"error": clip(message)}, headers)


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class ServerLimits:
    """Every limit of the HTTP server in one place (bytes and seconds); see the module docstring.

    Raises:
        ConfigError: a limit is not positive.
    """

    max_body_bytes: int = 64 << 20  # one request's body
    max_header_bytes: int = 16 << 10  # one request's head (431 past it); Node.js allows 16 KiB too
    max_header_count: int = 100  # one request's headers (431 past it); Apache's LimitRequestFields
    keep_alive_timeout: float = 5.0  # an idle connection waits this long for its next request
    read_timeout: float = 30.0  # once a request has begun, each read waits at most this long
    max_connections: int = 1024  # open at once; more are answered 503 and closed
    max_body_bytes_in_flight: int = 128 << 20  # the bodies of all connections together (503 past it)
    header_timeout: float = 10.0  # a request's head must arrive within this long of its first byte
    body_timeout: float = 60.0  # and the whole request (head and body) within this long
    # connections the kernel holds before they are accepted; asyncio's default of 100 makes a burst of new
    # clients retry their SYN after a second or more (uvicorn uses 2048 too)
    backlog: int = 2048
    # TLS listeners: handshakes under way at once (each holds asyncio's 256 KiB TLS read buffer before anyone is
    # known: 32 MiB at most); past it new connections wait in the kernel's backlog; and of those, from one address
    # (four times that from an IPv6 /64) while half the slots are taken (past it a new one is closed at once). A
    # handshake must end within `handshake_timeout`.
    max_handshakes: int = 128
    max_address_handshakes: int = 16
    handshake_timeout: float = 5.0  # a TLS handshake takes milliseconds on a LAN, a second or two over a satellite
    # what one authenticated peer (`Request.peer`, from its certificate) may hold of the above: on a tier listener
    # one compromised device must not take every connection or the whole body budget from the other devices of its
    # site. None: no share (the serve port, whose callers carry no identity).
    max_peer_connections: int | None = None
    max_peer_body_bytes_in_flight: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_header_bytes",
            "max_header_count",
            "max_connections",
            "max_body_bytes_in_flight",
            "max_handshakes",
            "max_address_handshakes",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"HTTP server limit {name} must be positive")
        for name in ("keep_alive_timeout", "read_timeout", "header_timeout", "body_timeout", "handshake_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"HTTP server timeout {name} must be positive")
        for name in ("max_peer_connections", "max_peer_body_bytes_in_flight"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"HTTP server limit {name} must be positive")

    def with_peer_shares(self) -> ServerLimits:
        """These limits with one peer's share set: a quarter of the connections and of the body budget (at least
        one request's body), so a single identity leaves room for the others."""
        return dataclasses.replace(
            self,
            max_peer_connections=max(1, self.max_connections // 4),
            max_peer_body_bytes_in_flight=max(self.max_body_bytes, self.max_body_bytes_in_flight // 4),
        )


_RELEASE_AFTER_BYTES: Final = 1 << 20  # bodies this large leave heap behind worth giving back to the OS
_RELEASE_DELAY: Final = 0.5  # seconds with no body in flight before that happens
# Stopping, a TLS connection closed with all it was sent handed to the kernel waits only for the client's side of
# the TLS close; a client that has not sent it this long after (an idle keep-alive client, which sends it when it
# next reads) is dropped.
_TLS_CLOSE_WAIT_S: Final = 0.25
# a process holding more connections than another on a shared listener leaves a new one to it this long (then
# takes it: the other may be stuck); long enough for a busy loop to come round, short beside a TLS handshake
_CROWDED_PAUSE_S = 0.005
_ACCEPTS_PER_TURN: Final = 16  # connections an accept loop takes before it lets the event loop run other work
_ACCEPT_RETRY_S: Final = 1.0  # after accept failed for want of descriptors or memory (asyncio's ACCEPT_RETRY_DELAY)
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept's errors for a connection its caller reset before it was accepted (Linux passes on pending network errors)
_GONE_BEFORE_ACCEPT: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.ECONNRESET})
_WARN_EVERY_S: Final = 60.0


_SIOCOUTQNSD: Final = 0x894B  # linux/sockios.h: bytes in a socket's send queue not yet sent


def _unsent(transport: asyncio.BaseTransport) -> int | None:
    """Bytes the kernel holds for a connection's socket that it has not sent yet, None when that cannot be read.
    Not sent, rather than not acknowledged (SIOCOUTQ): a peer that vanished never acknowledges our close_notify,
    and waiting for that held a stop for its whole grace."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    held: int = struct.unpack("i", raw)[0]
    return held


async def _readable(listener: socket.socket) -> None:
    """Wait until `listener` has a connection queued (or an error to report)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def woken() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(listener.fileno(), woken)
    try:
        await ready
    finally:
        loop.remove_reader(listener.fileno())


async def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening, non-blocking sockets on each address of `host` (as asyncio's `create_server` makes them).

    Raises:
        ConfigError: `host` does not resolve, or an address cannot be bound (in use, not local, no permission).
    """
    try:  # "" is every interface, as for create_server
        infos = await asyncio.get_running_loop().getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                listener = socket.socket(family, kind, proto)
            except OSError:  # a family this machine lacks (IPv6 turned off): skipped, as create_server does
                continue
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind(address)
            listener.listen(backlog)
            listener.setblocking(False)
    except OSError as exc:
        for listener in listeners:
            listener.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    if not listeners:
        raise ConfigError(f"cannot listen on {host}:{port}: no address of it can have a socket here")
    return listeners


def _share_keys(host: str) -> tuple[str, ...]:
    """The shares of the TLS handshakes a caller's address counts against: its own, and for IPv6 also its /64's
    (four times as large): one machine may hold a whole /64 and pick a new source address for each connection,
    while on a SLAAC network a /64 is also every other host of the site's LAN. An IPv4-mapped address is IPv4."""
    if ":" not in host:
        return (host,)
    with contextlib.suppress(ValueError):
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
        if address.ipv4_mapped is not None:
            return (str(address.ipv4_mapped),)
        return (str(address), str(ipaddress.IPv6Network((address, 64), strict=False)))
    return (host,)


class AcceptShare:
    """How many connections each of the processes accepting on one listening socket holds, in memory they share:
    a memfd the agent makes (`create`) and hands down beside the listener (`attach`), one 64-bit slot a process
    (the agent's is 0). A process leaves a new connection to another holding at least two fewer
    (`HttpServer._take`): 32 keep-alive clients over two processes split 16 to 16 (SO_REUSEPORT's hash of their
    addresses split them 10 to 22), however the event loops' timers round a wait. A slot is ABSENT while its
    process is not serving (not started, or dead: the agent marks it), so nobody leaves connections to it."""

    ABSENT: Final = -1

    def __init__(self, fd: int, index: int, processes: int) -> None:
        """Raises:
        OSError: the memory cannot be mapped.
        """
        if not 0 <= index < processes:
            raise ValueError(f"process {index} is not one of {processes}")
        self.fd = fd
        self._map = mmap.mmap(fd, 8 * processes)
        self._index = index
        self._processes = processes

    @classmethod
    def create(cls, processes: int) -> AcceptShare:
        """The agent's (slot 0), every slot ABSENT: in a memfd, or where there is none (not Linux) an unlinked
        temporary file.

        Raises:
            OSError: neither can be made.
        """
        memfd_create = getattr(os, "memfd_create", None)
        if memfd_create is not None:
            fd = memfd_create("strata-accept-share", os.MFD_CLOEXEC)
        else:  # not Linux: an unlinked temporary file is shared memory as well
            with tempfile.TemporaryFile() as backing:
                fd = os.dup(backing.fileno())
        try:
            os.ftruncate(fd, 8 * processes)
            share = cls(fd, 0, processes)
        except BaseException:
            os.close(fd)
            raise
        for index in range(processes):
            share.mark_absent(index)
        return share

    def publish(self, held: int) -> None:
        """Say that this process holds `held` connections."""
        struct.pack_into("q", self._map, 8 * self._index, held)

    def mark_absent(self, index: int) -> None:
        """Process `index` serves no more (or not yet)."""
        struct.pack_into("q", self._map, 8 * index, self.ABSENT)

    def crowded(self, held: int) -> bool:
        """Whether another serving process holds at least two connections fewer than this one's `held`."""
        slots = struct.unpack_from(f"{self._processes}q", self._map)
        return any(0 <= other < held - 1 for index, other in enumerate(slots) if index != self._index)


class HttpServer:
    """Serve `handler` over HTTP/1.1 with keep-alive, inside the running event loop.

    Usage: `await server.start(host, port)`, read `server.port` (useful with port 0), `await server.stop()`.
    """

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits | None = None,
        peer_identity: Callable[[Any], str | None] | None = None,
        peer_refusal: Callable[[bytes | None], str | None] | None = None,
        release_memory: Callable[[], object] | None = None,
        head_refusal: Callable[[Request], str | None] | None = None,
    ) -> None:
        """`peer_identity` turns a TLS connection's ssl object into the caller's identity (`Request.peer`);
        `peer_refusal`, given the peer certificate's DER, says why its requests are refused (403, then close),
        or None. It is asked for every request, before its body is read, so a verdict that changes (a revocation)
        reaches connections already open. `head_refusal`, given a request's head (its body empty), says why it
        is refused (401, then close) or None: a caller without the serving token is turned away before its body
        is charged to the budget or read, and gets no `100 Continue`. `release_memory` gives freed heap back to the
        OS (run on the default executor, see the module doc)."""
        self.peer_identity = peer_identity
        self.peer_refusal = peer_refusal
        self.head_refusal = head_refusal
        self._handler = handler
        self._limits = limits or ServerLimits()
        # its sockets, their accept loops, the connections accepted and not yet served (over TLS: in their
        # handshake), and over TLS those by the caller's address and the slots that bound them
        self._listeners: list[socket.socket] = []
        self._shared = False  # other processes accept on the same listening sockets
        self._share: AcceptShare | None = None  # and say how many connections each holds
        self._acceptors: list[asyncio.Task[None]] = []
        self._opening: set[asyncio.Task[None]] = set()
        self._address_handshakes: dict[str, int] = {}
        self._handshake_slots: asyncio.Semaphore | None = None
        self.refused_at_accept = 0  # connections closed as they were accepted (over a cap or an address's share)
        self._quieted = Quieted(_WARN_EVERY_S)  # each kind of listener trouble is logged once a minute
        self._connections: set[_Connection] = set()
        self._accepted = 0  # connections being served (those refused at the cap are not counted)
        self._body_bytes = 0  # request bodies charged to the budget, all connections together
        self._peer_connections: dict[str, int] = {}  # connections served, by peer identity (with a peer share)
        self._peer_bytes: dict[str, int] = {}  # bytes charged to the budget, by peer identity (with a peer share)
        self._released = 0  # body bytes released since memory was last given back
        self._release_memory = release_memory
        self._release_timer: asyncio.TimerHandle | None = None
        self.closing = False

    @property
    def listeners(self) -> list[socket.socket]:
        """The listening sockets (empty until started), to hand to other processes that accept on them."""
        return list(self._listeners)

    @property
    def port(self) -> int:
        """The port actually bound (the one the OS chose when started with port 0).

        Raises:
            RuntimeError: the server is not started.
        """
        if not self._listeners:
            raise RuntimeError("the HTTP server is not started")
        port: int = self._listeners[0].getsockname()[1]
        return port

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: SSLContext | None = None,
        *,
        share: AcceptShare | None = None,
        sockets: Sequence[socket.socket] = (),
    ) -> None:
        """Bind and start accepting connections (over TLS with `ssl`); returns once listening. `sockets`: accept
        on these listening sockets instead of binding `host` and `port` (another process's, inherited). `share`:
        other processes accept on the same sockets (`listeners` handed to them), and each publishes there how many
        connections it holds: a process leaves a new connection to one holding at least two fewer (`AcceptShare`).

        Why one accept queue for every serving process and not SO_REUSEPORT, a queue each: the kernel spreads
        connections over SO_REUSEPORT listeners by a hash of their addresses, blind to how busy each process is.
        32 keep-alive clients over two processes measured 10 to 22 (and 11 to 21, 20 to 12): the busier process
        was the node's limit while the other had a core to spare. And a process that exits resets the connections
        waiting in its own queue.

        Raises:
            ConfigError: the address cannot be bound (in use, not local, no permission).
            RuntimeError: the server is already started.
        """
        if self._listeners:
            raise RuntimeError("the HTTP server is already started")
        self.closing = False
        self._address_handshakes.clear()
        # The server accepts for itself, one connection at a time, and counts each from its accept. asyncio's
        # listener took every connection the kernel had queued at once (a descriptor each, up to the backlog), and
        # over TLS gave each a 256 KiB read buffer for the 60 s its handshake may take: 1,000 silent connections
        # cost 300 MB and a thousand descriptors, and a caller opening connections fast held every descriptor.
        if sockets:
            for listener in sockets:
                listener.setblocking(False)
            self._listeners = list(sockets)
        else:
            self._listeners = await _listen(host, port, self._limits.backlog)
        self._share = share
        self._shared = share is not None or bool(sockets)
        self._publish()
        if ssl is not None:
            self._handshake_slots = asyncio.Semaphore(self._limits.max_handshakes)
        loop = asyncio.get_running_loop()
        self._acceptors = [loop.create_task(self._accept(listener, ssl)) for listener in self._listeners]

    async def _accept(self, listener: socket.socket, context: SSLContext | None) -> None:
        """A listener's accept loop. It closes at once a connection past `max_connections` open or being opened
        (plain: past them and the 64 refusals that may linger). Over TLS it takes a connection only while fewer
        than `max_handshakes` are under way (the others wait in the kernel's backlog, costing this process
        nothing), and, while half of those are under way, closes at once one from an address with
        `max_address_handshakes` under way (or an IPv6 /64 with four times that)."""
        loop = asyncio.get_running_loop()
        slots = self._handshake_slots if context is not None else None
        port = int(listener.getsockname()[1])
        taken = 0
        while True:
            if slots is not None:
                await slots.acquire()
            taken += 1
            if taken % _ACCEPTS_PER_TURN == 0:  # sock_accept and a free slot return without waiting while the
                await asyncio.sleep(0)  # backlog holds connections: let the loop's other work run now and then
            try:
                conn, address = await (self._take(listener) if self._shared else loop.sock_accept(listener))
            except OSError as exc:
                if slots is not None:
                    slots.release()
                if exc.errno in _GONE_BEFORE_ACCEPT:  # that connection is gone, the next one is not
                    continue
                # out of descriptors or memory (as asyncio's own listener: wait a second), or an error this loop
                # does not know: a short wait, so that one that repeats cannot spin the loop
                pause = _ACCEPT_RETRY_S if exc.errno in _OUT_OF_RESOURCES else 0.1
                self._warn("accept", f"cannot accept connections on port {port} ({exc}); trying again in {pause:g} s")
                await asyncio.sleep(pause)
                continue
            except BaseException:
                if slots is not None:
                    slots.release()
                raise
            host = str(address[0]) if isinstance(address, tuple) and address else ""
            refusal = self._admit(host, context is not None)
            if refusal is not None:
                if slots is not None:
                    slots.release()
                conn.close()
                self._refused(refusal, port)
                continue
            began: list[bool] = []
            task = loop.create_task(self._open(conn, context, began))
            self._opening.add(task)
            self._publish()
            task.add_done_callback(functools.partial(self._opened, conn, host, context is not None, began))

    async def _take(self, listener: socket.socket) -> tuple[socket.socket, Any]:
        """Accept a connection on a listener other processes accept on too (`start`): at once, unless another
        process holds at least two connections fewer (`AcceptShare.crowded`); then only once one is queued and
        `_CROWDED_PAUSE_S` later, if that process has not taken it meanwhile (it may be stuck).

        Raises:
            OSError: accept failed (as `sock_accept`).
        """
        while True:
            if self._share is not None and self._share.crowded(self._held()):
                await _readable(listener)
                await asyncio.sleep(_CROWDED_PAUSE_S)
            try:
                conn, address = listener.accept()
            except BlockingIOError:  # none queued, or another process took it
                await _readable(listener)
                continue
            conn.setblocking(False)
            return conn, address

    def _held(self) -> int:
        """Connections this server holds: served, being refused, or accepted and being opened."""
        return len(self._connections) + len(self._opening)

    def _publish(self) -> None:
        """Say how many connections this process holds to the others accepting on its listener."""
        if self._share is not None:
            self._share.publish(self._held())

    def _admit(self, host: str, tls: bool) -> str | None:
        """Why a connection just accepted from `host` is closed at once, or None (it is counted as opening)."""
        if self.closing:
            return "the server is stopping"
        limits = self._limits
        if not tls:  # past the cap a connection is answered 503 (`add`), and a few such may linger
            if self._accepted + self.refusing + len(self._opening) >= limits.max_connections + MAX_LINGERING_REFUSALS:
                return f"{limits.max_connections} connections open and {MAX_LINGERING_REFUSALS} being refused"
            return None
        if self._accepted + len(self._opening) >= limits.max_connections:
            return f"{limits.max_connections} connections open or opening"
        keys = _share_keys(host)
        # the shares apply once half the slots are taken: until then the callers behind one NAT address may use
        # more, and one of them holding its share cannot lock the others out of a quiet listener
        if 2 * len(self._opening) >= limits.max_handshakes:
            shares = (limits.max_address_handshakes, 4 * limits.max_address_handshakes)[: len(keys)]
            for key, share in zip(keys, shares, strict=True):
                if self._address_handshakes.get(key, 0) >= share:
                    return f"{key} has {share} TLS handshakes under way, its share while the listener is busy"
        for key in keys:
            self._address_handshakes[key] = self._address_handshakes.get(key, 0) + 1
        return None

    def _refused(self, reason: str, port: int) -> None:
        """Count a connection closed at accept, and say why (at most once a minute)."""
        self.refused_at_accept += 1
        self._warn(
            "refused",
            f"closing new connections on port {port} as they arrive: {reason} ({self.refused_at_accept} so far)",
        )

    def _warn(self, kind: str, message: str) -> None:
        """Log a listener's trouble, at most once a minute for each `kind`."""
        if self._quieted.due(kind, time.monotonic()):
            log.warning("%s", message)

    async def _open(self, conn: socket.socket, context: SSLContext | None, began: list[bool]) -> None:
        """Serve an accepted connection (`_Connection`), over TLS once its handshake ends in `handshake_timeout`.
        From here on asyncio owns the socket: it closes its transport, and the socket, when this fails."""
        began.append(True)
        loop = asyncio.get_running_loop()
        if context is None:
            await loop.connect_accepted_socket(lambda: _Connection(self), conn)
        else:
            await loop.connect_accepted_socket(
                lambda: _Connection(self), conn, ssl=context, ssl_handshake_timeout=self._limits.handshake_timeout
            )

    def _opened(self, conn: socket.socket, host: str, tls: bool, began: list[bool], task: asyncio.Task[None]) -> None:
        """An accepted connection is served, or failed to be: its socket is closed if `_open` never ran (a task
        cancelled before its first step, at a stop), and its handshake's slot and its address's counts are given
        back. A done-callback, not a `finally`, for that reason. Once `_open` ran, asyncio closes what failed: a
        TLS transport cancelled just after its handshake is still shutting down, and closing its socket here would
        free a descriptor the selector still watches."""
        self._opening.discard(task)
        self._publish()
        if not began:
            conn.close()
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, OSError):  # a handshake's failures are OSErrors
            log.error("could not serve an accepted connection", exc_info=error)
        if tls:
            for key in _share_keys(host):
                give_back(self._address_handshakes, key)
            assert self._handshake_slots is not None
            self._handshake_slots.release()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, close idle connections, let requests in flight finish for up to `grace` seconds,
        then cancel what is left. Safe to call when not started."""
        listeners, self._listeners = self._listeners, []
        if not listeners:
            return
        self.closing = True
        starting = [*self._acceptors, *self._opening]  # the accept loops, and the connections being opened
        self._acceptors = []
        for task in starting:
            task.cancel()
        if starting:
            await asyncio.gather(*starting, return_exceptions=True)
        for listener in listeners:
            listener.close()
        connections = list(self._connections)
        for connection in connections:
            connection.close_when_idle()
        if connections:
            dropper = asyncio.get_running_loop().create_task(self._drop_tls_closes(connections))
            try:
                _, pending = await asyncio.wait([c.closed for c in connections], timeout=grace)
                if pending:
                    for connection in connections:
                        connection.cancel()
                    await asyncio.wait(pending, timeout=grace)
            finally:
                dropper.cancel()

    async def _drop_tls_closes(self, connections: list[_Connection]) -> None:
        """Stopping: drop each TLS connection that waits only for its client's side of the TLS close. asyncio
        closes TLS by sending close_notify and waiting for the client's, which a client holding an idle
        keep-alive connection (in an httpx pool: a gateway's, after it forwarded a request) sends only when it next
        reads: each such connection held `stop` for its grace and then the cancellation's (10 s), and an agent
        whose gateway still ran took that long to stop."""
        while True:
            await asyncio.sleep(_TLS_CLOSE_WAIT_S)
            for connection in connections:
                connection.drop_if_only_tls_close_left()

    def add(self, connection: _Connection, peer: str | None = None) -> str | None:
        """Track a new connection from `peer`; why it is refused when it is over the connection cap or the peer's
        share of it (it is tracked, to be refused), else None."""
        self._connections.add(connection)
        if self._accepted >= self._limits.max_connections:
            return f"the server has {self._limits.max_connections} connections open"
        share = self._limits.max_peer_connections
        if peer is not None and share is not None:
            held = self._peer_connections.get(peer, 0)
            if held >= share:
                return f"node {peer} has {share} connections open, its share of this listener"
            self._peer_connections[peer] = held + 1
        self._accepted += 1
        return None

    def discard(self, connection: _Connection, accepted: bool, peer: str | None = None) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self._publish()
            if accepted:
                self._accepted -= 1
                if peer is not None:
                    give_back(self._peer_connections, peer)

    @property
    def connections(self) -> int:
        """Connections being served now (not counting those being refused)."""
        return self._accepted

    @property
    def refusing(self) -> int:
        """Connections refused at the cap that are still open (answered 503, lingering before their close)."""
        return len(self._connections) - self._accepted

    @property
    def handshakes(self) -> int:
        """Connections accepted and not yet served: over TLS, those in their handshake."""
        return len(self._opening)

    @property
    def body_bytes_in_flight(self) -> int:
        """Request body bytes charged to the budget now."""
        return self._body_bytes

    def charge(self, size: int, force: bool = False, peer: str | None = None) -> bool:
        """Charge `size` bytes (bodies, and the heads of parsed requests) to the budget, and to `peer`'s share of
        it; False (nothing charged) when they do not fit, unless `force` (a connection's one request being
        answered: bounded per connection by the header limits, so health probes are answered while bodies fill
        the budget)."""
        share = self._limits.max_peer_body_bytes_in_flight if peer is not None else None
        if not force:
            if self._body_bytes + size > self._limits.max_body_bytes_in_flight:
                return False
            if share is not None and self._peer_bytes.get(peer or "", 0) + size > share:
                return False
        self._body_bytes += size
        if share is not None and peer is not None:
            self._peer_bytes[peer] = self._peer_bytes.get(peer, 0) + size
        return True

    def release(self, size: int, peer: str | None = None) -> None:
        """Give `size` charged bytes back; once none are in flight after large ones, return the heap."""
        if size <= 0:
            return
        self._body_bytes -= size
        if peer is not None:
            give_back(self._peer_bytes, peer, size)
        self.freed(size)

    def freed(self, size: int) -> None:
        """`size` bytes of requests were let go: once a MiB of them is and nothing is in flight, return the heap."""
        self._released += size
        if self._body_bytes == 0 and self._released >= _RELEASE_AFTER_BYTES and self._release_memory is not None:
            if self._release_timer is not None:
                self._release_timer.cancel()
            self._release_timer = asyncio.get_running_loop().call_later(_RELEASE_DELAY, self._give_memory_back)

    def _give_memory_back(self) -> None:
        self._release_timer = None
        if self._body_bytes or self._release_memory is None:
            return
        self._released = 0
        # asyncio's socket transports are reference cycles (one holds its own bound method): closed ones, with
        # their buffers, wait for the cyclic GC, which may not run for a long while on a quiet server
        gc.collect()
        with contextlib.suppress(RuntimeError):  # the default executor is shut down: the process is ending
            asyncio.get_running_loop().run_in_executor(None, self._release_memory)

    @property
    def limits(self) -> ServerLimits:
        return self._limits

    async def call_handler(self, request: Request) -> Response:
        try:
            return await self._handler(request)
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return Response.error(500, "internal error")


class _Refuse(Exception):
    """Raised inside a parser callback to refuse the request with this status and message."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


_BUSY_HEADERS: Final = {"retry-after": "1"}
_AUTH_HEADERS: Final = {"www-authenticate": 'Bearer realm="strata"'}


@dataclass(slots=True)
class _Parsed:
    request: Request
    keep_alive: bool
    charged: int = 0  # body bytes charged to the server's budget until this request is answered


class _Connection(asyncio.Protocol):
    """One client connection: parses requests as bytes arrive (httptools calls the `on_*` methods), answers
    them in order, and owns the connection's timers. Everything runs on the event loop."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._limits = server.limits
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client: tuple[str, int] | None = None
        self._peer: str | None = None
        self._tls = False
        self._accepted = False
        self._peer_der: bytes | None = None  # the peer's certificate, kept when the server judges peers
        self.closed: asyncio.Future[None] = self._loop.create_future()
        # the request being parsed
        self._in_message = False
        self._in_head = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_fed = 0
        self._header_count = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._charged = 0  # bytes of the request being parsed charged to the server's budget
        self._body_charged = 0  # of which its body
        self._began = 0.0  # loop time of the first byte of the request being parsed
        self._deadline: asyncio.TimerHandle | None = None  # for the head, then the whole request
        self._deadline_due: tuple[float, str] | None = None  # (seconds after `_began`, what) of the request
        self._refusal: _Refuse | None = None
        # answering
        self._queue: deque[_Parsed | _Refuse] = deque()
        self._task: asyncio.Task[None] | None = None
        self._close_after_queue = False  # the peer finished sending, or the server is stopping
        self._refused = False  # a refusal went out: swallow input, then close
        self._closing_unread = 0  # the last answer's bytes unread when it was written, charged until the close
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expiry: float | None = None  # loop time at which `_timer` closes the connection; None: disarmed
        self._abort_timer: asyncio.TimerHandle | None = None  # closing, the last answers still unread
        self._received = 0  # bytes read from the peer
        self._drop_seen = False  # stopping over uvloop's TLS: nothing was left to send at the last check

    # --- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
        ssl_object = transport.get_extra_info("ssl_object")  # over TLS, the handshake is done by now
        self._tls = ssl_object is not None
        if ssl_object is not None and self._server.peer_identity is not None:
            self._peer = self._server.peer_identity(ssl_object)
        if ssl_object is not None and self._server.peer_refusal is not None:
            self._peer_der = ssl_object.getpeercert(binary_form=True)
        refused = self._server.add(self, self._peer)
        self._accepted = refused is None
        if self._server.closing:
            self._close()
            return
        if refused is not None:
            if self._server.refusing >= MAX_LINGERING_REFUSALS:  # e.g. one peer past its share, over and over
                transport.abort()
                return
            self._send_refusal(_Refuse(503, refused, _BUSY_HEADERS))
            return
        self._arm(self._limits.keep_alive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.discard(self, self._accepted, self._peer)
        self._server.release(self._closing_unread, self._peer)  # the last answer, written before a close
        self._closing_unread = 0
        self._cancel_timer()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        # what it read went through the heap (reads of up to 256 KiB, refused heads, swallowed bytes): once a MiB
        # of that is let go and nothing is in flight, the heap goes back to the OS
        self._server.freed(self._received)
        self._received = 0
        self._parser = _NO_PARSER  # it holds this connection's methods: without the cycle, refcounting frees both
        self._drop_body()
        for item in self._queue:  # requests read but never answered
            if isinstance(item, _Parsed):
                self._server.release(item.charged, self._peer)
                item.charged = 0
        self._queue.clear()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        if self._refused:
            return  # swallowing what the peer sends after a refusal
        self._disarm()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # the request before the upgrade is queued; what follows is not HTTP/1.1 and is not read
            self._close_after_queue = True
            self._pause_reading()
            if not self._queue and self._task is None:
                self._queue.append(_Refuse(400, "malformed HTTP request: protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            refusal = self._refusal or _Refuse(400, f"malformed HTTP request: {exc}")
            self._refusal = None
            refusal.__traceback__ = None  # its frames hold this connection: a cycle only the GC would free
            self._queue.append(refusal)
            self._refused = True
            self._drop_body()
        else:
            if self._in_head:
                self._head_fed += len(data)
                if self._head_fed > self._limits.max_header_bytes:  # a head still arriving, already too large
                    self._queue.append(_Refuse(431, "request headers are too large"))
                    self._refused = True
                    self._drop_body()
        if len(self._queue) >= _MAX_PIPELINED:
            self._pause_reading()
        if self._in_message and not self._refused:
            self._arm_deadline()
        self._next()
        if self._in_message and self._task is None and not self._refused:
            self._arm(self._limits.read_timeout)

    def eof_received(self) -> bool:
        if self._in_message and not self._refused:
            self._queue.append(_Refuse(400, "malformed HTTP request: the peer closed in the middle of a request"))
            self._refused = True
            self._drop_body()
        self._close_after_queue = True
        self._next()
        # keep our side open until the answers in hand are written (TLS cannot half-close: asyncio closes it)
        return not self._tls

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # --- httptools callbacks ------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._head_fed = 0
        self._header_count = 0
        self._body = []
        self._body_size = 0
        self._began = self._loop.time()
        self._set_deadline(self._limits.header_timeout, "request headers")

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self._limits.max_header_count:
            self._refuse(431, f"a request may have at most {self._limits.max_header_count} headers")
        self._headers.append((name, value))
        self._grow_head(len(name) + len(value) + 4)

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._limits.max_header_bytes:
            self._refuse(431, "request headers are too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._set_deadline(self._limits.body_timeout, "the request")
        if self._tls and self._server.peer_refusal is not None:
            reason = self._server.peer_refusal(self._peer_der)
            if reason is not None:
                self._refuse(403, reason)
        if self._server.head_refusal is not None:
            head = _make_request(self._parser.get_method(), self._url, self._headers, b"", self._client, self._peer)
            reason = self._server.head_refusal(head)
            if reason is not None:
                self._refuse(401, reason, _AUTH_HEADERS)
        expects_continue = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":  # llhttp checked: digits, and one value
                length = int(value)
                if length > self._limits.max_body_bytes:
                    self._refuse(413, f"request body is larger than {self._limits.max_body_bytes} bytes")
                self._charge(length)
                self._body_charged = length
            elif lowered == b"expect" and value.strip().lower() == b"100-continue":
                expects_continue = True
        if expects_continue and self._transport is not None and self._parser.get_http_version() == "1.1":
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.max_body_bytes:
            self._refuse(413, f"request body is larger than {self._limits.max_body_bytes} bytes")
        if self._body_size > self._body_charged:  # a chunked body: charged as it arrives
            self._charge(self._body_size - self._body_charged)
            self._body_charged = self._body_size
        self._body.append(body)

    def _charge(self, size: int) -> None:
        """Charge body bytes of the request being parsed to the server's budget, before they are read.

        Raises:
            _Refuse: 503, the budget cannot take them.
        """
        if size <= 0:
            return
        if not self._server.charge(size, peer=self._peer):
            self._refuse(503, "the server is receiving too many request bodies; retry later", _BUSY_HEADERS)
        self._charged += size

    def on_message_complete(self) -> None:
        """Queue the request, its head charged to the server's budget; past `_MAX_QUEUED` waiting on this
        connection, or past the budget for a request pipelined behind another, refuse it (503) instead.

        Raises:
            _Refuse: 503, as said.
        """
        self._in_message = False
        self._clear_deadline()
        waiting = len(self._queue) + (self._task is not None)
        if len(self._queue) >= _MAX_QUEUED:
            self._drop_body()
            self._refuse(503, f"more than {_MAX_QUEUED} requests are pipelined unanswered", _BUSY_HEADERS)
        head_cost = self._head_size + self._header_count * _HEADER_COST + _REQUEST_COST
        if not self._server.charge(head_cost, force=not waiting, peer=self._peer):
            self._drop_body()
            self._refuse(503, "the server holds too many requests; retry later", _BUSY_HEADERS)
        self._charged += head_cost
        self._head_size = 0
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        request = _make_request(self._parser.get_method(), self._url, self._headers, body, self._client, self._peer)
        self._queue.append(_Parsed(request, self._parser.should_keep_alive(), self._charged))
        self._charged = 0
        self._body_charged = 0
        self._headers = []

    def _drop_body(self) -> None:
        """Forget the request being parsed (refused, or its connection ended) and give back its budget."""
        self._clear_deadline()
        self._body = []
        self._server.release(self._charged, self._peer)
        self._charged = 0
        self._body_charged = 0

    # --- deadlines ------------------------------------------------------------------------------------

    def _set_deadline(self, seconds: float, what: str) -> None:
        """Close the connection unless the request in progress gets past this point by `seconds` after its
        first byte, however slowly its bytes trickle in (each read resets only the read timeout). The timer is
        set once the read is parsed (`_arm_deadline`): a request that arrives whole in one read needs none."""
        self._deadline_due = (seconds, what)

    def _arm_deadline(self) -> None:
        """A read is parsed and a request is still in progress: time its deadline."""
        if self._deadline_due is None:
            return
        seconds, what = self._deadline_due
        when = self._began + seconds
        if self._deadline is not None:
            if self._deadline.when() == when:
                return
            self._deadline.cancel()
        self._deadline = self._loop.call_at(when, self._deadline_passed, what, seconds)

    def _clear_deadline(self) -> None:
        self._deadline_due = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self, what: str, seconds: float) -> None:
        """The request in progress missed its deadline: answer 408 when nothing else is being answered, close."""
        self._deadline = None
        self._deadline_due = None
        if self._transport is None or self._transport.is_closing() or self._refused or self._reading_paused:
            return  # paused: the server stopped reading (pipelined requests queued), not the peer
        self._drop_body()
        self._refused = True
        self._in_message = False
        if self._task is None and not self._queue:
            self._write(Response.error(408, f"{what} took longer than {seconds:g} s"), head_only=False, close=True)
        self._close()

    def _refuse(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        """Refuse the request being parsed (raised through httptools, caught in `data_received`).

        Raises:
            _Refuse: always.
        """
        self._refusal = _Refuse(status, message, headers)
        raise self._refusal

    # --- answering ------------------------------------------------------------------------------------

    def _next(self) -> None:
        """Start answering the next queued request, unless one is being answered."""
        if self._task is not None or self._transport is None or self._transport.is_closing():
            return
        if not self._queue:
            if self._close_after_queue and (self._refused or not self._in_message):
                self._close()
            elif not self._in_message:
                self._arm(self._limits.keep_alive_timeout)
            return
        item = self._queue.popleft()
        if self._reading_paused and len(self._queue) < _MAX_PIPELINED // 2 and not self._close_after_queue:
            self._reading_paused = False
            self._transport.resume_reading()
        if isinstance(item, _Refuse):
            self._send_refusal(item)
            return
        self._task = self._loop.create_task(self._answer(item))

    async def _answer(self, item: _Parsed) -> None:
        transport = self._transport
        assert transport is not None
        try:
            if not await self._respond(item, transport):
                return
            # While the peer does not read: the request (its body) and the answer object are let go, and what waits
            # in the transport's buffer is charged to the budget, so callers that never read their answers fill it
            # (new bodies get 503) instead of the node's memory.
            del item
            if self._writing_paused:
                unread = transport.get_write_buffer_size()
                self._server.charge(unread, force=True, peer=self._peer)
                try:
                    drained = await self._drained_in_time(transport)
                finally:
                    self._server.release(unread, self._peer)
                if not drained:
                    transport.abort()  # the peer does not read its answers: cut it off, dropping them
                    return
        except asyncio.CancelledError:
            self._close()  # `stop` ran out of grace: the peer sees the connection close unanswered
            return
        finally:
            self._task = None
        self._next()

    async def _respond(self, item: _Parsed, transport: asyncio.Transport) -> bool:
        """Run the handler on `item` and write its answer; False when the connection closes instead of reading
        its next request."""
        try:
            response = await self._server.call_handler(item.request)
        finally:
            self._server.release(item.charged, self._peer)  # the handler is done with the body
            item.charged = 0
        close = not item.keep_alive or self._server.closing or (self._close_after_queue and not self._queue)
        if transport.is_closing():
            return False
        if not self._write(response, item.request.method == "HEAD", close):
            self._close()
            return False
        if close:
            # what waits unread until the peer reads it or is cut off (`_close`) is charged as a kept-alive
            # connection's is (`_answer`), until the connection is gone
            self._closing_unread = transport.get_write_buffer_size()
            self._server.charge(self._closing_unread, force=True, peer=self._peer)
            self._close()
            return False
        return True

    async def _drained_in_time(self, transport: asyncio.Transport) -> bool:
        """Wait until the peer has read enough of our answers for us to write more; False when it read none
        of them for `body_timeout` (a peer that pipelines requests and never reads would else hold its
        connection and everything queued on it forever)."""
        drained = self._drained = self._loop.create_future()
        unread = transport.get_write_buffer_size()
        while not drained.done():
            await asyncio.wait((drained,), timeout=self._limits.body_timeout)
            if drained.done():
                break
            now = transport.get_write_buffer_size()
            if now >= unread:
                return False
            unread = now
        return True

    def _close(self) -> None:
        """Close once what is written is sent; a peer that does not read it within `body_timeout` is cut off
        (asyncio would else keep the connection, and its slot under the cap, until the peer reads)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if transport.get_write_buffer_size() and self._abort_timer is None:
            self._abort_timer = self._loop.call_later(self._limits.body_timeout, transport.abort)

    def _write(self, response: Response, head_only: bool, close: bool) -> bool:
        """Write a response; False (logged) when its headers cannot be sent."""
        assert self._transport is not None
        body = response.body
        start = _head_start(response.status, response.headers)
        if start is None:
            return False
        head = b"%scontent-length: %d\r\n%s" % (start, len(body), _CLOSE_END if close else b"\r\n")
        if not body or head_only:
            self._transport.write(head)
        elif len(body) <= _COALESCE_BYTES:
            self._transport.write(head + body)
        else:
            self._transport.write(head)
            self._transport.write(body)
        return True

    def _send_refusal(self, refusal: _Refuse) -> None:
        """Answer a refused request and close, after swallowing what the peer still sends for a moment:
        closing with unread data would reset the connection, and a client still uploading would see the reset
        instead of our answer."""
        assert self._transport is not None
        self._refused = True
        self._write(Response.error(refusal.status, refusal.message, refusal.headers), head_only=False, close=True)
        if self._close_after_queue:
            self._close()
            return
        self._arm(_LINGER_SECONDS)

    # --- timers and flow ----------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        """Close the connection `seconds` from now unless disarmed or re-armed first. One timer serves many
        arm/disarm rounds (a keep-alive connection arms after each answer and disarms at the next request): a
        timer due no later than the new expiry is kept and, when it fires early, set again for what is left."""
        expiry = self._loop.time() + seconds
        self._expiry = expiry
        timer = self._timer
        if timer is not None:
            if timer.when() <= expiry:
                return
            timer.cancel()
        self._timer = self._loop.call_at(expiry, self._expire)

    def _disarm(self) -> None:
        self._expiry = None  # the timer, if any, finds nothing to do when it fires (or is reused by `_arm`)

    def _cancel_timer(self) -> None:
        self._expiry = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        """The timer fired: close if the keep-alive or read timeout passed (or a refusal's linger ended);
        set it again when the connection was re-armed since, for a later expiry."""
        timer, self._timer = self._timer, None
        expiry = self._expiry
        if expiry is None:
            return
        if timer is not None and expiry > timer.when():
            self._timer = self._loop.call_at(expiry, self._expire)
            return
        self._expiry = None
        if self._task is None and self._transport is not None:
            self._close()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def close_when_idle(self) -> None:
        """The server is stopping: close now when idle, else after the answer in progress."""
        self._close_after_queue = True
        if self._task is None and not self._queue and self._transport is not None:
            self._close()

    def drop_if_only_tls_close_left(self) -> None:
        """Abort a TLS connection that is closing, answers nothing and has handed all it was sent to the kernel
        (the TLS layer's buffer and the socket transport's under it are empty): only the client's close_notify
        is left to wait for. When the buffer under the TLS layer cannot be seen, nothing is dropped."""
        transport = self._transport
        if not self._tls or self._task is not None or transport is None or not transport.is_closing():
            return
        if transport.get_write_buffer_size():
            self._drop_seen = False
            return
        # asyncio's TLS transport counts what its TLS layer holds; what it handed down to the socket transport
        # (a large answer to a slow reader) is counted there, which only its protocol object reaches
        under = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
        if under is not None:
            if not under.get_write_buffer_size():
                transport.abort()
            return
        # uvloop's TLS transport does not show the transport under it. libuv writes to the socket at once, keeping
        # only what the kernel has no room for, so a socket whose every byte the kernel has sent, at two checks in
        # a row (libuv had a turn of the loop between them to hand over what it held), has nothing left
        unsent = _unsent(transport)
        if unsent != 0:
            self._drop_seen = False
        elif self._drop_seen:
            transport.abort()
        else:
            self._drop_seen = True

    def cancel(self) -> None:
        """The server's grace ran out: cancel the handler in progress (which closes) or just close."""
        if self._task is not None:
            self._task.cancel()
        elif self._transport is not None:
            self._close()


_NO_PARSER: Final = httptools.HttpRequestParser(object())  # a closed connection's parser
_CLOSE_END: Final = b"connection: close\r\n\r\n"
# A response's status line and own headers, encoded, by (status, headers): an inference server sends the same
# few over and over (a model's answers differ only in their bodies), so each is checked and encoded once.
_HEAD_STARTS: dict[tuple[int, tuple[tuple[str, str], ...]], bytes] = {}
_HEAD_STARTS_MAX: Final = 256


def _head_start(status: int, headers: Mapping[str, str]) -> bytes | None:
    """The status line and `headers` of a response, encoded (the server adds Content-Length and Connection);
    None (logged) when a header cannot be sent: a bad name or value, or one that is not latin-1."""
    key = (status, tuple(headers.items()))
    start = _HEAD_STARTS.get(key)
    if start is not None:
        return start
    lines = [f"HTTP/1.1 {status} {_reason(status)}\r\n"]
    for name, value in headers.items():
        if name.lower() in _SERVER_HEADERS:
            continue
        if not _HEADER_NAME.match(name.encode("latin-1", "replace")):
            log.error("cannot send an HTTP response with header %r; closing the connection", name)
            return None
        if "\r" in value or "\n" in value or "\0" in value:
            log.error("cannot send an HTTP response with header %r: %r; closing the connection", name, value)
            return None
        lines.append(f"{name}: {value}\r\n")
    try:
        start = "".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        log.error("cannot send an HTTP response with non-latin-1 headers; closing the connection")
        return None
    if len(_HEAD_STARTS) >= _HEAD_STARTS_MAX:
        _HEAD_STARTS.clear()  # many distinct heads (per-request header values): start over rather than grow
    _HEAD_STARTS[key] = start
    return start


_REASONS: dict[int, str] = {}


def _reason(status: int) -> str:
    reason = _REASONS.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        _REASONS[status] = reason
    return reason


def _make_request(
    method: bytes,
    url: bytes,
    raw_headers: list[tuple[bytes, bytes]],
    body: bytes,
    client: tuple[str, int] | None,
    peer: str | None = None,
) -> Request:
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw_headers:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1").strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    target = url.decode("latin-1")
    path, _, query = target.partition("?")
    return Request(
        method=method.decode("latin-1"),
        path=unquote(path),
        query=dict(parse_qsl(query, keep_blank_values=True)) if query else {},
        headers=headers,
        body=body,
        client=client,
        peer=peer,
    )
