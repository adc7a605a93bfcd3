"""HTTP transport for the agent: blocking sockets with h11 (the HTTP/1.1 protocol library).

Why not httpx or http.client: the agent must stay under 70 MB resident with a model loaded. httpx would
add about 6 MB; http.client about 1 MB (it pulls in the email package); h11, pure Python and used only here,
about 0.8 MB. (The inference server does not share it: it parses requests with httptools, see
`strata.agent.httpd`.) `Transport` is the one extension point; tests pass their own.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import h11

from strata import __version__
from strata.core.errors import TransportError
from strata.core.words import utc_time

_READ = 64 * 1024
_USER_AGENT = f"strata-agent/{__version__}"


def _host_name(host: str) -> str | bytes:
    """A host name as the resolver and TLS (SNI, the certificate's check) take it. An ASCII name goes as bytes,
    which both take as they are: a str they encode with the idna codec, whose first use imports stringprep and
    unicodedata, about 0.4 MB of the agent's memory for nothing an ASCII name needs."""
    return host.encode("ascii") if host.isascii() else host


@dataclass(frozen=True)
class HttpResponse:
    """A whole response: status, lower-case headers, body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class StreamedResponse(Protocol):
    """A response whose body is read piece by piece (downloads)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def read(self, size: int) -> bytes: ...


class Transport(Protocol):
    """Sends requests. Implementations raise `TransportError` when the peer cannot be reached or the
    exchange breaks; any HTTP status is a normal answer for the caller to judge."""

    def request(
        self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None = None, timeout: float
    ) -> HttpResponse: ...

    def stream(
        self, method: str, url: str, *, headers: Mapping[str, str], timeout: float
    ) -> AbstractContextManager[StreamedResponse]: ...


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    netloc: str
    path: str

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def _target(url: str) -> _Target:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransportError(f"not an http(s) URL: {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return _Target(parts.scheme, parts.hostname, port, parts.netloc, path)


def rate_allowance(started: float, timeout: float, received: int, min_rate: int, now: float) -> float:
    """Seconds an exchange begun at `started` may still wait for its next bytes, having received `received`, when
    after its first `timeout` seconds it must average `min_rate` bytes a second (0 or less: it is too slow)."""
    return started + timeout + received / min_rate - now


def clock_hint(exc: OSError, now: float) -> str:
    """What to add to a TLS failure whose certificate was refused as not valid yet or expired: said by this node's
    clock, which may be the one that is wrong (a node booted without its real-time clock, or years ahead)."""
    if not isinstance(exc, ssl.SSLCertVerificationError):
        return ""
    reason = str(exc.verify_message or exc)
    if "not yet valid" not in reason and "expired" not in reason:
        return ""
    return (
        f"; this node's clock says it is {utc_time(now)}: if that is wrong, set the node's clock right"
        " (certificates are checked against it)"
    )


class _Connection:
    """One HTTP/1.1 connection: a socket and its h11 state machine."""

    def __init__(
        self,
        target: _Target,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
        peer_refusal: Callable[[bytes | None], str | None] | None = None,
        min_rate: int | None = None,
    ) -> None:
        self._timeout = timeout
        self._min_rate = min_rate
        self._started = time.monotonic()
        self._received = 0
        self._peer_refusal = peer_refusal
        self.origin = target.origin  # where the connection goes: its key in a pool
        try:
            address = (_host_name(target.host), target.port)
            sock = socket.create_connection(address, timeout=timeout)  # type: ignore[arg-type]  # bytes hosts work (getaddrinfo's type takes them); typeshed lists str
            if target.scheme == "https":
                context = ssl_context or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=_host_name(target.host))
        except OSError as exc:
            raise TransportError(f"cannot connect to {target.origin}: {exc}{clock_hint(exc, time.time())}") from exc
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.check_peer()

    def check_peer(self) -> None:
        """Ask `peer_refusal` about the TLS peer's certificate (before each exchange: a connection kept alive from
        before a revocation is refused as a new one would be); close and raise when it refuses.

        Raises:
            TransportError: the peer is refused.
        """
        if self._peer_refusal is None or not isinstance(self.sock, ssl.SSLSocket):
            return
        reason = self._peer_refusal(self.sock.getpeercert(binary_form=True))
        if reason is not None:
            self.close()
            raise TransportError(f"refusing {self.origin}: {reason}")

    def begin(self, timeout: float, min_rate: int | None) -> None:
        """Start a new exchange on this (kept-alive) connection: its time limit, and its minimum rate counted
        from now."""
        self._timeout = timeout
        self._min_rate = min_rate
        self._started = time.monotonic()
        self._received = 0
        self.sock.settimeout(timeout)

    def _recv(self) -> bytes:
        """The next bytes from the peer. With a minimum rate, an exchange that has not received `min_rate` bytes a
        second since its first `timeout` seconds is cut (TimeoutError): a peer trickling a byte now and then
        cannot hold the caller for ever, which a timeout per read alone allows."""
        if self._min_rate is None:
            data = self.sock.recv(_READ)
        else:
            slow = f"the peer sent {self._received} bytes, slower than {self._min_rate} bytes/s"
            allowed = rate_allowance(self._started, self._timeout, self._received, self._min_rate, time.monotonic())
            if allowed <= 0:
                raise TimeoutError(slow)
            self.sock.settimeout(min(self._timeout, allowed))
            try:
                data = self.sock.recv(_READ)
            except TimeoutError as exc:
                raise TimeoutError(slow if allowed < self._timeout else str(exc)) from exc
        self._received += len(data)
        return data

    def send_request(self, method: str, target: _Target, headers: Mapping[str, str], body: bytes | None) -> None:
        fields = [("host", target.netloc), ("user-agent", _USER_AGENT)]
        fields += [(k, v) for k, v in headers.items() if k.lower() not in ("host", "content-length")]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            fields.append(("content-length", str(len(body or b""))))
        out = self.h11.send(h11.Request(method=method, target=target.path, headers=fields)) or b""
        if body:
            out += self.h11.send(h11.Data(data=body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        self.sock.sendall(out)

    def next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(self._recv())
                continue
            return event

    def read_head(self) -> h11.Response:
        while True:
            event = self.next_event()
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("server closed the connection before answering")
            if isinstance(event, h11.InformationalResponse):
                continue
            raise h11.RemoteProtocolError(f"unexpected {event!r} before the response head")

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _headers(head: h11.Response) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in head.headers}


class _Streamed:
    def __init__(self, connection: _Connection, head: h11.Response) -> None:
        self._connection = connection
        self.status = head.status_code
        self.headers = _headers(head)
        self._buffer = b""
        self._done = False

    @property
    def finished(self) -> bool:
        """The whole answer was read (its end seen, nothing left unread)."""
        return self._done and not self._buffer

    def read(self, size: int) -> bytes:
        try:
            while not self._buffer and not self._done:
                event = self._connection.next_event()
                if isinstance(event, h11.Data):
                    self._buffer = bytes(event.data)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    self._done = True
        except (OSError, h11.ProtocolError) as exc:
            raise TransportError(f"connection broke while reading: {exc}") from exc
        piece, self._buffer = self._buffer[:size], self._buffer[size:]
        return piece


class H11Transport:
    """`Transport` over blocking sockets and h11, keeping one connection per thread and origin."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        peer_refusal: Callable[[bytes | None], str | None] | None = None,
        min_rate: int | None = None,
    ) -> None:
        """`peer_refusal`, given a TLS server's certificate (DER), says why not to talk to it, or None. With
        `min_rate`, a streamed answer must keep coming at that many bytes a second after its first `timeout`
        seconds (see `_Connection._recv`)."""
        self._ssl_context = ssl_context
        self._peer_refusal = peer_refusal
        self._min_rate = min_rate
        self._generation = 0
        self._local = threading.local()

    def use_ssl_context(self, context: ssl.SSLContext | None) -> None:
        """Use `context` for new connections (a renewed certificate, say); pooled ones are dropped on next use."""
        self._ssl_context = context
        self._generation += 1

    def _pool(self) -> dict[str, _Connection]:
        pool: dict[str, _Connection] = self._local.__dict__.setdefault("pool", {})
        if self._local.__dict__.get("generation") != self._generation:
            for connection in pool.values():
                connection.close()
            pool.clear()
            self._local.generation = self._generation
        return pool

    def _start(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float,
        min_rate: int | None,
    ) -> tuple[_Connection, h11.Response]:
        """Send a request and read its answer's head, on the thread's kept-alive connection to the origin when there
        is one (taken out of the pool: the caller puts it back or closes it). A kept connection that the server
        closed while it was kept (it answered nothing; not a timeout, which a stalled peer would double) is
        replaced by a new one, once.

        Raises:
            TransportError: the server cannot be reached, is refused, or the connection broke.
        """
        target = _target(url)
        kept = self._pool().pop(target.origin, None)
        if kept is not None:
            kept.check_peer()
            kept.begin(timeout, min_rate)
            try:
                kept.send_request(method, target, headers, body)
                return kept, kept.read_head()
            except (OSError, h11.ProtocolError) as exc:
                kept.close()
                if isinstance(exc, TimeoutError):
                    raise TransportError(f"{method} {url}: {exc or type(exc).__name__}") from exc
        connection = _Connection(target, timeout, self._ssl_context, self._peer_refusal, min_rate)
        try:
            connection.send_request(method, target, headers, body)
            return connection, connection.read_head()
        except (OSError, h11.ProtocolError) as exc:
            connection.close()
            raise TransportError(f"{method} {url}: {exc or type(exc).__name__}") from exc

    def _keep_or_close(self, connection: _Connection, read_to_the_end: bool) -> None:
        """Put `connection` back in the thread's pool when its answer was read to the end and it may carry the
        next one; close it otherwise."""
        if read_to_the_end and connection.reusable():
            self._pool()[connection.origin] = connection
        else:
            connection.close()

    def request(
        self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None = None, timeout: float
    ) -> HttpResponse:
        """Send one request and read the whole answer (see `_start` for the connection it goes over).

        Raises:
            TransportError: the server cannot be reached, or the connection broke.
        """
        connection, head = self._start(method, url, headers, body, timeout, None)
        parts = []
        try:
            while True:
                event = connection.next_event()
                if isinstance(event, h11.Data):
                    parts.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionResetError("connection closed in the middle of the body")
        except (OSError, h11.ProtocolError) as exc:
            connection.close()
            raise TransportError(f"{method} {url}: {exc or type(exc).__name__}") from exc
        self._keep_or_close(connection, True)
        return HttpResponse(status=head.status_code, headers=_headers(head), body=b"".join(parts))

    @contextlib.contextmanager
    def stream(self, method: str, url: str, *, headers: Mapping[str, str], timeout: float) -> Iterator[_Streamed]:
        """Send a request and yield the response for reading in pieces (see `_start` for the connection it goes
        over). The connection is kept for the next request only when the answer was read to its end: a package's
        pieces are fetched one request each, and a new connection per piece was a TCP and mutual-TLS handshake per
        64 KiB (320 for a 20 MiB model, on the node and on the relay or control plane that served it).

        Raises:
            TransportError: the server cannot be reached, or the connection broke.
        """
        connection, head = self._start(method, url, headers, None, timeout, self._min_rate)
        response = _Streamed(connection, head)
        finished = False
        try:
            yield response
            finished = response.finished
        finally:
            self._keep_or_close(connection, finished)

    def close(self) -> None:
        pool = self._pool()
        for connection in pool.values():
            connection.close()
        pool.clear()
