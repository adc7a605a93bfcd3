"""`strata gateway` stops promptly on its first SIGTERM while its control plane does not answer: real gateway
processes on loopback whose control plane is a listening socket that takes connections and never answers (a
hung or blackholed control plane; the topology read waits out its 10 s timeout there).

A SIGTERM that came while the first topology read was under way used to wait for that read to time out, and the
gateway then started listening anyway ("gateway listening" after the signal) before it stopped.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from strata.localfleet import free_port

STOP_WITHIN_S = 3.0  # the gateway stops in well under a second; the rest is slack for a loaded CI machine


class Blackhole:
    """A loopback listener that takes connections and never answers them; with `answer_first`, it answers the
    first request with that JSON document (a control plane that then hangs)."""

    def __init__(self, answer_first: dict[str, object] | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.hanging = threading.Event()  # a connection is held unanswered
        self._answer = answer_first
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the test is over
                return
            if self._answer is None:
                self.held.append(conn)
                self.hanging.set()
                continue
            body, self._answer = json.dumps(self._answer).encode(), None
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def start_gateway(control_plane: str, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "strata", "gateway", "--listen", str(free_port()), "--server", control_plane,
            "--node", "n1", "--token", "operator-token", "--cloud", "http://127.0.0.1:9", *extra]  # fmt: skip
    with log_path.open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def sigterm_while_hanging(hole: Blackhole, log_path: Path, started: list[subprocess.Popen[bytes]], *extra: str) -> str:
    """Start a gateway on the control plane `hole`, SIGTERM it once while a topology read hangs there; check that
    it exited with status 0 within `STOP_WITHIN_S`, and return its log."""
    try:
        started.append(gateway := start_gateway(hole.url, log_path, *extra))
        assert hole.hanging.wait(30), log_path.read_text()  # a topology read now waits on the control plane
        began = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        try:
            code = gateway.wait(STOP_WITHIN_S * 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the gateway still ran {STOP_WITHIN_S * 5:.0f} s after one SIGTERM")
        took = time.monotonic() - began
    finally:
        hole.close()
    log = log_path.read_text()
    assert code == 0, log
    assert took < STOP_WITHIN_S, f"the gateway took {took:.2f}s to stop:\n{log}"
    assert "Traceback" not in log
    return log


def test_a_sigterm_during_the_first_topology_read_stops_the_gateway_at_once(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    log = sigterm_while_hanging(Blackhole(), tmp_path / "gateway.log", processes)
    assert "SIGTERM: stopping" in log
    assert "gateway stopped" in log
    assert "gateway listening" not in log  # a gateway told to stop during startup never listens


def test_a_sigterm_while_a_topology_refresh_hangs_stops_the_gateway_at_once(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    topology: dict[str, object] = {
        "node_id": "n1",
        "name": "n1",
        "tier": "device",
        "serve_url": None,
        "parents": [],
        "cloud": [],
    }
    hole = Blackhole(answer_first=topology)  # the first read is answered; the second one hangs
    log = sigterm_while_hanging(hole, tmp_path / "gateway.log", processes, "--topology-interval", "0.2")
    assert log.index("gateway listening") < log.index("SIGTERM: stopping") < log.index("gateway stopped")
