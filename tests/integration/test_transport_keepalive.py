"""The agent's HTTP transport keeps connections alive across streamed downloads, over a real HTTP/1.1 server on
loopback: a package's pieces (one request each) share one connection instead of a TCP and TLS handshake each; an
answer left unread never leaks into the next one; a connection the server dropped while idle is replaced."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from strata.agent.fetch import download_blob
from strata.agent.transport import H11Transport
from strata.core.errors import TransportError


def blob(n: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest() * 4096  # 128 KiB, different for each n


class Server(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0
    drop_idle = False  # close each connection after one answer, without saying so (a keep-alive timeout)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_GET(self) -> None:
        if self.path == "/stall":  # a parent that takes the request and never answers
            time.sleep(2)
            return
        body = blob(int(self.path.rsplit("/", 1)[1]))
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = self.server.drop_idle

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server: Server, n: int) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/blob/{n}"


def test_pieces_downloaded_one_after_another_share_one_connection(server: Server, tmp_path: Path) -> None:
    transport = H11Transport()
    for n in range(5):
        data = blob(n)
        download_blob(
            transport,
            url(server, n),
            tmp_path / str(n),
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            headers={},
            timeout=10,
        )
        assert (tmp_path / str(n)).read_bytes() == data
    assert transport.request("GET", url(server, 9), headers={}, timeout=10).body == blob(9)
    assert server.connections == 1


def test_an_answer_left_unread_closes_its_connection_and_the_next_answer_is_its_own(server: Server) -> None:
    transport = H11Transport()
    with transport.stream("GET", url(server, 1), headers={}, timeout=10) as response:
        assert response.read(100) == blob(1)[:100]
    with transport.stream("GET", url(server, 2), headers={}, timeout=10) as response:
        received = b"".join(iter(lambda: response.read(1 << 16), b""))
    assert received == blob(2)
    assert server.connections == 2

    def fail_while_reading(n: int) -> None:
        with transport.stream("GET", url(server, n), headers={}, timeout=10) as response:
            response.read(1 << 16)
            raise RuntimeError("the caller failed in the middle of the answer")

    with pytest.raises(RuntimeError):
        fail_while_reading(3)  # on the second connection, kept from the answer before: closed now
    assert transport.request("GET", url(server, 4), headers={}, timeout=10).body == blob(4)
    assert server.connections == 3


def test_a_kept_connection_the_server_dropped_while_idle_is_replaced_without_an_error(server: Server) -> None:
    server.drop_idle = True
    transport = H11Transport()
    for n in range(3):
        with transport.stream("GET", url(server, n), headers={}, timeout=10) as response:
            assert b"".join(iter(lambda: response.read(1 << 16), b"")) == blob(n)
    assert server.connections == 3


def test_a_kept_connection_whose_answer_times_out_is_not_tried_again(server: Server) -> None:
    """Only a connection the server closed while it was kept is replaced: a peer that takes the request and stalls
    would otherwise hold the caller for two timeouts (and get the request twice)."""
    transport = H11Transport()
    assert transport.request("GET", url(server, 1), headers={}, timeout=10).body == blob(1)
    stalled = f"http://127.0.0.1:{server.server_address[1]}/stall"
    with pytest.raises(TransportError, match="timed out"), transport.stream("GET", stalled, headers={}, timeout=0.3):
        pass
    assert server.connections == 1
