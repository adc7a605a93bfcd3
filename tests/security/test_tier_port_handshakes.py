"""The agent's TLS listener (its tier port) against callers that open connections and never begin TLS.

Anyone who can reach the port can do that: no certificate is asked for before the handshake. asyncio's own TLS
listener took every connection and gave each a 256 KiB read buffer for the 60 s its handshake may take: 1,000 silent
connections cost the agent 300 MB and a thousand file descriptors. The server now accepts for itself: a connection
counts from its accept, at most `max_handshakes` handshakes are under way (more connections wait in the kernel's
backlog), at most `max_address_handshakes` from one address while half of those are taken (more are closed at once),
and a handshake ends within `handshake_timeout`. Other addresses of loopback (127.0.0.2, ...) stand for other
machines.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from strata.agent.httpd import MAX_LINGERING_REFUSALS, HttpServer, Request, Response, ServerLimits, _share_keys
from tls_listener import Tls, fleet_tls, serving

# The held handshakes must outlast what a test does while they are held (300 connections opened and checked, on a
# busy machine): 5 s, where 3 s left a second or so.
LIMITS = ServerLimits(max_handshakes=6, max_address_handshakes=3, handshake_timeout=5.0, max_connections=12)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return fleet_tls(tmp_path_factory.mktemp("tls"))


async def handler(request: Request) -> Response:
    return Response(200, {"content-type": "text/plain"}, b"ok")


@pytest.fixture
def served(tls: Tls) -> Iterator[tuple[HttpServer, asyncio.AbstractEventLoop]]:
    server = HttpServer(handler, LIMITS)
    with serving(server, tls.server) as loop:
        yield server, loop


def silent(port: int, source: str) -> socket.socket:
    """A connection from `source` that never begins TLS."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds`."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def request(port: int, tls: Tls) -> bytes:
    """One request over mutual TLS from 127.0.0.1; the answer's status line."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=("127.0.0.1", 0))
    with raw, tls.client.wrap_socket(raw, server_hostname="server") as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: server\r\n\r\n")
        return sock.recv(65536).split(b"\r\n", 1)[0]


def on_loop(loop: asyncio.AbstractEventLoop, read: Callable[[], int]) -> int:
    async def go() -> int:
        return read()

    return asyncio.run_coroutine_threadsafe(go(), loop).result(10)


def until(loop: asyncio.AbstractEventLoop, read: Callable[[], int], expected: int) -> None:
    """Wait (up to 10 s) until `read()`, on the server's loop, gives `expected`."""
    deadline = time.monotonic() + 10
    while (value := on_loop(loop, read)) != expected:
        assert time.monotonic() < deadline, f"{value} != {expected}"
        time.sleep(0.02)


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def test_silent_connections_past_an_addresss_share_are_closed_at_once_and_others_are_served(
    served: tuple[HttpServer, asyncio.AbstractEventLoop], tls: Tls
) -> None:
    server, loop = served
    held = [silent(server.port, "127.0.0.2") for _ in range(LIMITS.max_address_handshakes)]
    until(loop, lambda: server.handshakes, LIMITS.max_address_handshakes)  # half the slots: the share applies
    before = rss_mb()
    flood = [silent(server.port, "127.0.0.2") for _ in range(300)]
    assert all(closed_within(sock, 5) for sock in flood)  # asyncio's listener held each for 60 s
    grew = rss_mb() - before
    assert grew < 20, f"300 silent connections grew the process by {grew:.1f} MB"  # asyncio's: about 90 MB
    assert on_loop(loop, lambda: server.refused_at_accept) == 300
    # a node elsewhere is served meanwhile
    assert request(server.port, tls) == b"HTTP/1.1 200 OK"
    # and the held ones are closed once their handshake's time is up
    assert all(closed_within(sock, LIMITS.handshake_timeout + 4) for sock in held)
    assert on_loop(loop, lambda: server.handshakes) == 0
    for sock in held + flood:
        sock.close()


def test_past_the_cap_of_handshakes_a_connection_waits_in_the_backlog_and_is_served_once_a_slot_frees(
    served: tuple[HttpServer, asyncio.AbstractEventLoop], tls: Tls
) -> None:
    server, loop = served
    held = [silent(server.port, source) for source in ("127.0.0.2", "127.0.0.3") for _ in range(3)]
    until(loop, lambda: server.handshakes, LIMITS.max_handshakes)
    answer: list[bytes] = []
    client = threading.Thread(target=lambda: answer.append(request(server.port, tls)))
    client.start()
    time.sleep(0.3)  # its connection waits in the kernel's backlog: not accepted, not refused
    assert answer == []
    assert on_loop(loop, lambda: server.handshakes) == LIMITS.max_handshakes
    assert on_loop(loop, lambda: server.refused_at_accept) == 0
    client.join(LIMITS.handshake_timeout + 10)  # the silent ones time out, and it is taken
    assert answer == [b"HTTP/1.1 200 OK"]
    assert all(closed_within(sock, 5) for sock in held)
    for sock in held:
        sock.close()


def test_a_stop_ends_the_handshakes_under_way_at_once(
    served: tuple[HttpServer, asyncio.AbstractEventLoop], tls: Tls
) -> None:
    server, loop = served
    port = server.port
    held = [silent(port, "127.0.0.2") for _ in range(3)]
    until(loop, lambda: server.handshakes, 3)
    started = time.monotonic()
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
    assert time.monotonic() - started < LIMITS.handshake_timeout
    assert on_loop(loop, lambda: server.handshakes) == 0
    assert on_loop(loop, lambda: len(server._address_handshakes)) == 0  # every count given back
    assert all(closed_within(sock, 0.5) for sock in held)
    with pytest.raises(ConnectionRefusedError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2)
    with pytest.raises(RuntimeError):
        _ = server.port
    for sock in held:
        sock.close()


def test_one_certificate_past_its_share_cannot_make_the_refused_connections_pile_up(tls: Tls) -> None:
    """Past its share a peer's connection is answered 503 and lingers 2 s for it to read that. One certificate
    opening connections as fast as it can made as many linger (400 in 1 s against a cap of 40); now at most
    MAX_LINGERING_REFUSALS do, and more are closed at once."""
    server = HttpServer(handler, LIMITS.with_peer_shares(), peer_identity=lambda ssl_object: "device")
    with serving(server, tls.server) as loop:
        opened = []
        for _ in range(MAX_LINGERING_REFUSALS + 80):
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            opened.append(tls.client.wrap_socket(raw, server_hostname="server"))
        refusing = on_loop(loop, lambda: server.refusing)
        assert 0 < refusing <= MAX_LINGERING_REFUSALS
        assert on_loop(loop, lambda: server.connections) == LIMITS.with_peer_shares().max_peer_connections
        for sock in opened:
            sock.close()


def test_an_ipv6_caller_counts_against_its_address_and_its_64_and_a_mapped_ipv4_one_against_its_ipv4_address() -> None:
    """One machine may pick a new source address in its /64 for every connection: the /64 has a share too."""
    assert _share_keys("192.0.2.7") == ("192.0.2.7",)
    assert _share_keys("2001:db8:1:2::7") == ("2001:db8:1:2::7", "2001:db8:1:2::/64")
    assert _share_keys("2001:db8:1:2:ffff::1")[1] == _share_keys("2001:db8:1:2::7")[1]
    assert _share_keys("fe80::1%eth0") == ("fe80::1", "fe80::/64")
    assert _share_keys("::ffff:192.0.2.7") == ("192.0.2.7",)
