"""The agent's HTTP server stops promptly over TLS, over real TLS on loopback with a real fleet CA's certificates.

A TLS close waits for the client's close_notify, which a client holding an idle keep-alive connection (an httpx
pool, like a gateway's health probes on the agent's tier listener) sends only when it next reads: `stop` used to
wait out its grace and then the cancellation's, 10 s, and an agent whose gateway still ran took that long to stop.
It now drops such a connection once all it was sent has gone to the kernel, and only then: a large answer still
being read is not cut short.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from strata.agent.httpd import HttpServer, Request, Response
from tls_listener import Tls, fleet_tls, serving

BIG = 32 << 20  # an answer far larger than the socket buffers on both sides


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return fleet_tls(tmp_path_factory.mktemp("tls"))


async def handler(request: Request) -> Response:
    return Response(200, {"content-type": "application/octet-stream"}, b"x" * (BIG if request.path == "/big" else 2))


@pytest.fixture(params=["asyncio", "uvloop"])
def served(tls: Tls, request: pytest.FixtureRequest) -> Iterator[tuple[HttpServer, asyncio.AbstractEventLoop]]:
    """The server on either event loop the agent runs (uvloop's TLS transport hides the socket transport under
    it, so the stop reads the kernel's unsent bytes instead)."""
    server = HttpServer(handler)
    with serving(server, tls.server, request.param) as loop:
        yield server, loop


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
