"""The agent's HTTP server stops promptly over TLS, over real TLS on loopback with a real fleet CA's certificates.

A TLS close waits for the client's close_notify, which a client holding an idle keep-alive connection (an httpx
pool, like a gateway's health probes on the agent's tier listener) sends only when it next reads: `stop` used to
wait out its grace and then the cancellation's, 10 s, and an agent whose gateway still ran took that long to stop.
It now drops such a connection once all it was sent has gone to the kernel, and only then: a large answer still
being read is not cut short.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from strata.agent.httpd import HttpServer, Request, Response
from strata.agent.identity import FleetIdentity
from strata.trust.ca import FleetCA
from strata.trust.node import make_csr

BIG = 32 << 20  # an answer far larger than the socket buffers on both sides


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    ca = FleetCA.create("fleet", dt.datetime.now(dt.UTC))
    contexts = []
    for name in ("server", "client"):
        identity = FleetIdentity(tmp_path_factory.mktemp(name) / "trust")
        identity.folder.mkdir(parents=True)
        identity.ca_path.write_bytes(ca.cert_pem)
        identity.cert_path.write_bytes(
            ca.sign_node_csr(make_csr(identity.key_path, name), name, dt.datetime.now(dt.UTC)).pem
        )
        contexts.append(identity)
    return Tls(contexts[0].server_context(), contexts[1].peer_context())


async def handler(request: Request) -> Response:
    return Response(200, {"content-type": "application/octet-stream"}, b"x" * (BIG if request.path == "/big" else 2))


@pytest.fixture
def served(tls: Tls) -> Iterator[tuple[HttpServer, asyncio.AbstractEventLoop]]:
    """The server on its own loop in a thread (the test's client sockets block)."""
    server = HttpServer(handler)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start("127.0.0.1", 0, ssl=tls.server))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield server, loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def connect(server: HttpServer, tls: Tls) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return tls.client.wrap_socket(sock, server_hostname="server")


def read_answer(sock: ssl.SSLSocket) -> tuple[bytes, int]:
    """One answer's head and the length of its body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
    received = len(body)
    while received < length:
        piece = sock.recv(1 << 20)
        if not piece:
            break
        received += len(piece)
    return head, received


def stop(server: HttpServer, loop: asyncio.AbstractEventLoop) -> float:
    started = time.monotonic()
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
    return time.monotonic() - started


def test_an_idle_keep_alive_tls_client_does_not_hold_the_stop(
    served: tuple[HttpServer, asyncio.AbstractEventLoop], tls: Tls
) -> None:
    server, loop = served
    idle = [connect(server, tls) for _ in range(3)]
    for sock in idle:
        sock.sendall(b"GET /small HTTP/1.1\r\nhost: server\r\n\r\n")
        assert read_answer(sock)[1] == 2
    # the clients keep their connections and read nothing more: their close_notify never comes
    took = stop(server, loop)
    assert took < 1.5, f"stop took {took:.2f}s with idle TLS keep-alive clients"
    for sock in idle:
        sock.close()


def test_a_large_answer_still_being_read_is_not_cut_short_by_the_stop(
    served: tuple[HttpServer, asyncio.AbstractEventLoop], tls: Tls
) -> None:
    server, loop = served
    sock = connect(server, tls)
    sock.sendall(b"GET /big HTTP/1.1\r\nhost: server\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:  # the answer is written, most of it still buffered on the server's side
        data += sock.recv(65536)
    stopping = asyncio.run_coroutine_threadsafe(server.stop(), loop)
    received = len(data.partition(b"\r\n\r\n")[2])
    pause_at = received + (1 << 20)
    while received < BIG:  # a slow reader: 32 MiB over about a second, past several of the stop's checks
        piece = sock.recv(1 << 20)
        if not piece:
            break
        received += len(piece)
        if received >= pause_at:
            time.sleep(0.03)
            pause_at += 1 << 20
    assert received == BIG
    stopping.result(30)
    sock.close()
