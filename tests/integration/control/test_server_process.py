"""`strata server` as a real process, on SQLite and on PostgreSQL: it listens over HTTPS (mutual TLS for nodes),
refuses plain HTTP, exits cleanly on SIGTERM, and never logs the database password."""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import create_engine, text

from strata.core.wire import DesiredState, EnrollResponse


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_healthy(process: subprocess.Popen[bytes], base: str, token_file: Path) -> dict[str, str]:
    deadline = time.monotonic() + 30
    ca = token_file.parent / "ca.pem"
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited during start-up"
        if token_file.is_file() and ca.is_file():
            headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
            try:
                verify = ssl.create_default_context(cafile=str(ca))
                if httpx.get(f"{base}/v1/health", headers=headers, timeout=2, verify=verify).status_code == 200:
                    return headers
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise AssertionError("the server did not become healthy within 30 s")


@pytest.mark.slow
def test_server_process_serves_and_stops_cleanly_on_sigterm(tmp_path: Path, db_url: str | None) -> None:
    data = tmp_path / "data"
    port = _free_port()
    base = f"https://127.0.0.1:{port}"
    polled: list[httpx.Response] = []
    argv = [sys.executable, "-m", "strata", "server", "--data-dir", str(data), "--port", str(port)]
    if db_url is not None:
        argv += ["--db", db_url.replace("postgresql+psycopg://", "postgresql://")]  # the plain form means psycopg
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        admin = _wait_healthy(process, base, data / "admin.token")
        trusted = ssl.create_default_context(cafile=str(data / "ca.pem"))
        with pytest.raises(httpx.HTTPError):  # no plain HTTP listener
            httpx.get(f"http://127.0.0.1:{port}/v1/health", headers=admin, timeout=5)
        token = httpx.post(f"{base}/v1/enrollment-tokens", json={}, headers=admin, verify=trusted).json()["token"]
        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-1")])
        )
        body = {
            "token": token,
            "name": "edge-1",
            "tier": "device",
            "labels": {},
            "profile": "cpu-generic",
            "csr": csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode(),
        }
        enrolled = EnrollResponse.from_json(httpx.post(f"{base}/v1/enroll", json=body, verify=trusted).json())
        (tmp_path / "node.pem").write_text(enrolled.certificate)
        (tmp_path / "node.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        mtls = ssl.create_default_context(cafile=str(data / "ca.pem"))
        mtls.load_cert_chain(tmp_path / "node.pem", tmp_path / "node.key")
        node: dict[str, str] = {}
        no_cert = httpx.get(f"{base}/v1/nodes/{enrolled.node_id}/desired", verify=trusted)
        assert no_cert.status_code == 401
        answer = httpx.get(f"{base}/v1/nodes/{enrolled.node_id}/desired", headers=node, verify=mtls)
        assert answer.status_code == 200
        state = DesiredState.from_json(answer.json())
        assert state == DesiredState(node_id=enrolled.node_id, models=())
        assert answer.headers["ETag"] == state.etag

        # A long poll in flight when SIGTERM arrives is answered at once, not after its 60 s.
        poll_headers = {**node, "If-None-Match": state.etag}
        url = f"{base}/v1/nodes/{enrolled.node_id}/desired?wait=60"
        threading.Thread(
            target=lambda: polled.append(httpx.get(url, headers=poll_headers, timeout=70, verify=mtls))
        ).start()
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
    # Prompt even on a loaded machine: without `strata server`'s gc.freeze() at exit, Python's own teardown
    # of the heap took 4-10 s there after the server had finished.
    assert time.monotonic() - stopping < 5, log
    deadline = time.monotonic() + 5
    while not polled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r.status_code for r in polled] == [304]
    assert f"strata server listening on https://127.0.0.1:{port} (data: {data})" in log
    # Presence was flushed on the way out.
    engine = create_engine(db_url or f"sqlite:///{data / 'strata.db'}")
    with contextlib.closing(engine.connect()) as db:
        query = text("SELECT last_seen FROM nodes WHERE id = :id")
        [(last_seen,)] = db.execute(query, {"id": enrolled.node_id}).fetchall()
    engine.dispose()
    assert last_seen is not None
    if db_url is not None:
        password = engine.url.password
        assert password
        assert password not in log
        assert f"database: postgresql+psycopg://strata:***@127.0.0.1:{engine.url.port}/" in log
