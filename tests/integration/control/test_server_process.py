"""`strata server` as a real process: it listens, answers over real HTTP, and exits cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from strata.core.wire import DesiredState, EnrollResponse


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_healthy(process: subprocess.Popen[bytes], base: str, token_file: Path) -> dict[str, str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited during start-up"
        if token_file.is_file():
            headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
            try:
                if httpx.get(f"{base}/v1/health", headers=headers, timeout=2).status_code == 200:
                    return headers
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise AssertionError("the server did not become healthy within 30 s")


@pytest.mark.slow
def test_server_process_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    polled: list[httpx.Response] = []
    process = subprocess.Popen(
        [sys.executable, "-m", "strata", "server", "--data-dir", str(data), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        admin = _wait_healthy(process, base, data / "admin.token")
        token = httpx.post(f"{base}/v1/enrollment-tokens", json={}, headers=admin).json()["token"]
        body = {"token": token, "name": "edge-1", "tier": "device", "labels": {}, "profile": "cpu-generic"}
        enrolled = EnrollResponse.from_json(httpx.post(f"{base}/v1/enroll", json=body).json())
        node = {"Authorization": f"Bearer {enrolled.credential}"}
        answer = httpx.get(f"{base}/v1/nodes/{enrolled.node_id}/desired", headers=node)
        assert answer.status_code == 200
        state = DesiredState.from_json(answer.json())
        assert state == DesiredState(node_id=enrolled.node_id, models=())
        assert answer.headers["ETag"] == state.etag

        # A long poll in flight when SIGTERM arrives is answered at once, not after its 60 s.
        poll_headers = {**node, "If-None-Match": state.etag}
        url = f"{base}/v1/nodes/{enrolled.node_id}/desired?wait=60"
        threading.Thread(target=lambda: polled.append(httpx.get(url, headers=poll_headers, timeout=70))).start()
        time.sleep(0.5)
    finally:
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    log = output.decode()
    assert process.returncode == 0, log
    assert time.monotonic() - stopping < 5, log
    deadline = time.monotonic() + 5
    while not polled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r.status_code for r in polled] == [304]
    assert f"strata server listening on http://127.0.0.1:{port} (data: {data})" in log
    # Presence was flushed on the way out.
    with contextlib.closing(sqlite3.connect(data / "strata.db")) as db:
        [(last_seen,)] = db.execute("SELECT last_seen FROM nodes WHERE id = ?", (enrolled.node_id,)).fetchall()
    assert last_seen is not None
