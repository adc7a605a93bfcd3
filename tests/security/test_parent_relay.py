"""A compromised near-edge node attacks its child devices through the relay they download from.

Three parents: one that trickles a byte a second into every answer, one that waits just under the request
timeout before every piece and then sends it barely above the floor rate (so no single answer is ever cut), and
one that sends one wrong byte of every piece and hangs up.

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
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from strata.core.package import Package, pack_tar
from strata.localfleet import AgentHandle, LocalFleet
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

    def request_line(self, sock: ssl.SSLSocket) -> bytes | None:
        """Read a request's head (no body: relay requests are GETs) and note its first line; None at the end."""
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            head += chunk
        line = head.split(b"\r\n", 1)[0]
        self.requests.append(line)
        return line

    def _trickle(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError), self.context.wrap_socket(raw, server_side=True) as sock:
            if self.request_line(sock) is None:
                return
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
            while not self.stop.wait(1.0):
                sock.sendall(b"{")

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.fixture
def parent_folder(fleet: LocalFleet) -> Path:
    """The trust folder of a near-edge node that enrolled and stopped: the attacker holds its key."""
    handle = fleet.start_agent("parent", "near-edge", {"site": "s"}, tier_port=False)
    trust = handle.data_dir / "trust"
    fleet.wait_for(lambda: (trust / "identity.json").exists(), 60, "the parent to enroll", handle.process)
    handle.process.stop()
    return trust


@pytest.fixture
def parent(parent_folder: Path) -> Iterator[TricklingParent]:
    server = TricklingParent(parent_folder / "node.pem", parent_folder / "node.key")
    yield server
    server.close()


def deployed_behind(fleet: LocalFleet, parent: TricklingParent) -> tuple[AgentHandle, float]:
    """A device at the parent's site relaying through it (request timeout 3 s), digits 1 deployed to the site and
    run there; the device and the seconds it took."""
    device = fleet.start_agent(
        "dev",
        "device",
        {"site": "s"},
        extra_args=["--relay", f"https://127.0.0.1:{parent.port}", "--request-timeout", "3s"],
    )
    fleet.client.deploy("digits", "1", {"site": "s"})
    started = time.monotonic()
    fleet.wait_for_versions({"dev": {"digits": "1"}}, timeout=60)
    took = time.monotonic() - started
    print(f"\nthe device ran the package {took:.0f}s after the deployment")
    return device, took


def test_a_trickling_parent_cannot_hold_its_devices_download(
    fleet: LocalFleet, parent: TricklingParent, digits_onnx: Path, tmp_path: Path
) -> None:
    package = build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1")
    pack_tar(package, tmp_path / "digits.tar")
    fleet.client.push_package(tmp_path / "digits.tar")
    device, took = deployed_behind(fleet, parent)
    assert took < 30  # the 3 s timeout, not the 30 s default, let go of the parent
    # the manifest was asked of the parent, which stalled; no piece was asked of it afterwards
    assert len(parent.requests) == 1, parent.requests
    assert b"/relay/v1/blobs/sha256/" in parent.requests[0]
    log = device.process.log_tail(200)
    assert "slower than" in log, log
    assert "fetching the rest of this package from the control plane" in log, log


def pieces_of(package: Package) -> dict[str, bytes]:
    """Every piece of a package by sha256: the chunks of a large file, a small file whole."""
    found: dict[str, bytes] = {}
    for entry in package.manifest.files:
        data = (package.path / entry.path).read_bytes()
        if not entry.chunks:
            found[entry.sha256] = data
        offset = 0
        for chunk in entry.chunks:
            found[chunk.sha256] = data[offset : offset + chunk.size]
            offset += chunk.size
    return found


class PieceParent(TricklingParent):
    """A parent that knows the package's pieces and answers them as `mode` says: "drip" (the right bytes, after
    `delay` seconds of silence, at `rate` bytes a second) or "spoil" (a head declaring 10 MiB, one wrong byte,
    hang up). The manifest it does not have (404): the device takes it from the control plane."""

    def __init__(self, cert: Path, key: Path, mode: str, delay: float = 2.5, rate: int = 20 << 10) -> None:
        self.mode, self.delay, self.rate = mode, delay, rate
        self.pieces: dict[str, bytes] = {}
        super().__init__(cert, key)

    def _trickle(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError), self.context.wrap_socket(raw, server_side=True) as sock:
            while (line := self.request_line(sock)) is not None:
                sha = line.split(b" ")[1].split(b"?")[0].rsplit(b"/", 1)[-1].decode()
                data = self.pieces.get(sha)
                if data is None:
                    sock.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}")
                elif self.mode == "spoil":
                    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10485760\r\n\r\n" + bytes([data[0] ^ 0xFF]))
                    return
                else:
                    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(data))
                    if self.stop.wait(self.delay):
                        return
                    step = max(1, self.rate // 10)
                    for start in range(0, len(data), step):
                        sock.sendall(data[start : start + step])
                        if self.stop.wait(0.1):
                            return


def pushed_with_pieces(fleet: LocalFleet, digits_onnx: Path, tmp_path: Path) -> Package:
    """digits with a 1 MiB file beside it: about 16 chunks, each a piece of its own."""
    (tmp_path / "extra.bin").write_bytes(os.urandom(1 << 20))
    package = build_package(
        digits_onnx, tmp_path / "pkg", name="digits", version="1", extra_files=[tmp_path / "extra.bin"]
    )
    pack_tar(package, tmp_path / "digits.tar")
    fleet.client.push_package(tmp_path / "digits.tar")
    return package


def piece_requests(parent: TricklingParent) -> int:
    return sum(1 for line in parent.requests if b"/relay/v1/blobs/sha256/" in line)


def test_a_parent_slow_over_the_whole_package_is_left_for_the_control_plane(
    fleet: LocalFleet, parent_folder: Path, digits_onnx: Path, tmp_path: Path
) -> None:
    """Each answer passed the per-answer floor (silence just under the request timeout, then the floor rate), so
    the device took all ~18 pieces from it, each in about 5.7 s: the agent's loop (desired state, revocation of
    that very parent, renewal) sat in one fetch for minutes, hours for a large model. The parent must average the
    floor rate over the package past its first request timeout; below it the rest comes from the control plane."""
    parent = PieceParent(parent_folder / "node.pem", parent_folder / "node.key", "drip")
    try:
        package = pushed_with_pieces(fleet, digits_onnx, tmp_path)
        parent.pieces = pieces_of(package)
        assert len(parent.pieces) > 12
        device, _ = deployed_behind(fleet, parent)
        assert piece_requests(parent) <= 4, parent.requests
        log = device.process.log_tail(200)
        assert "slower than 16384 bytes/s on average" in log, log
    finally:
        parent.close()


def test_a_parent_that_spoils_every_piece_does_not_spoil_the_control_planes(
    fleet: LocalFleet, parent_folder: Path, digits_onnx: Path, tmp_path: Path
) -> None:
    """The byte a parent sent before hanging up stayed in the piece's part file, the download resumed from the
    control plane after it, the piece failed its hash ("bytes changed at the source or on the way"), and every
    retry did the same: the device never ran the version. What a relay sent is dropped when it is given up on."""
    parent = PieceParent(parent_folder / "node.pem", parent_folder / "node.key", "spoil")
    try:
        package = pushed_with_pieces(fleet, digits_onnx, tmp_path)
        parent.pieces = pieces_of(package)
        deployed_behind(fleet, parent)
        assert piece_requests(parent) >= 1
    finally:
        parent.close()
