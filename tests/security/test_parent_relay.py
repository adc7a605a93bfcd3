"""A compromised near-edge node attacks its child devices through the relay they download from.

Real control plane and a real device agent (`--relay` naming its parent). The parent here is a loopback TLS server
presenting a real near-edge node's fleet certificate (it enrolled, then its agent stopped: the attacker holds its
key): it answers every relay request with a 200 head and then one body byte a second, never long enough apart for
a read timeout. Before, the device's agent loop sat inside that one download for ever: no new desired state, so
no revocation of that very parent, no other version, no certificate renewal. Now a parent's answer must keep
coming at a floor rate after the request timeout (`--request-timeout`, 30 s by default; 3 s here), and a relay
that broke off is not asked again during that fetch: the device takes the package from the control plane and
runs it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from strata.core.package import pack_tar
from strata.localfleet import LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow


class TricklingParent:
    """Answers each request with a 200 head declaring a megabyte, then sends a byte a second."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(sock,), daemon=True).start()

    def _trickle(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError), self.context.wrap_socket(raw, server_side=True) as sock:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.requests.append(head.split(b"\r\n", 1)[0])
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
            while not self.stop.wait(1.0):
                sock.sendall(b"{")

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.fixture
def parent(fleet: LocalFleet) -> Iterator[TricklingParent]:
    handle = fleet.start_agent("parent", "near-edge", {"site": "s"}, tier_port=False)
    trust = handle.data_dir / "trust"
    fleet.wait_for(lambda: (trust / "identity.json").exists(), 60, "the parent to enroll", handle.process)
    handle.process.stop()
    server = TricklingParent(trust / "node.pem", trust / "node.key")
    yield server
    server.close()


def test_a_trickling_parent_cannot_hold_its_devices_download(
    fleet: LocalFleet, parent: TricklingParent, digits_onnx: Path, tmp_path: Path
) -> None:
    package = build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1")
    pack_tar(package, tmp_path / "digits.tar")
    fleet.client.push_package(tmp_path / "digits.tar")
    device = fleet.start_agent(
        "dev",
        "device",
        {"site": "s"},
        extra_args=["--relay", f"https://127.0.0.1:{parent.port}", "--request-timeout", "3s"],
    )
    fleet.client.deploy("digits", "1", {"site": "s"})
    started = time.monotonic()
    fleet.wait_for_versions({"dev": {"digits": "1"}}, timeout=60)
    assert time.monotonic() - started < 30  # the 3 s timeout, not the 30 s default, let go of the parent
    print(f"\nthe device ran the package {time.monotonic() - started:.0f}s after the deployment")
    # the manifest was asked of the parent, which stalled; no piece was asked of it afterwards
    assert len(parent.requests) == 1, parent.requests
    assert b"/relay/v1/blobs/sha256/" in parent.requests[0]
    log = device.process.log_tail(200)
    assert "slower than" in log, log
    assert "fetching the rest of this package from the control plane" in log, log
