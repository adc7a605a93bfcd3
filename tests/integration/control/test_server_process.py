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


def _tcp_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(bytes not yet acknowledged by the peer, bytes received and not yet read by the process) of the loopback
    TCP connection from `local_port` to `remote_port` (/proc/net/tcp); None where there is none."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if (local, remote) == (local_port, remote_port):
            tx_queue, rx_queue = fields[4].split(":")
            return int(tx_queue, 16), int(rx_queue, 16)
    return None


def _wait_read_by_server(client_port: int, server_port: int) -> None:
    """Wait until what the client sent has reached the server's end (acknowledged) and the server has read it."""
    deadline = time.monotonic() + 30
    for local, remote, index in ((client_port, server_port, 0), (server_port, client_port, 1)):
        while (queues := _tcp_queues(local, remote)) is None or queues[index] != 0:
            assert time.monotonic() < deadline, f"the server did not read the request ({queues})"
            time.sleep(0.01)


def _read_until_closed(sock: ssl.SSLSocket) -> bytes:
    """What the server sends until it closes; then this side closes too."""
    chunks = []
    with sock, contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
def test_server_process_serves_and_stops_cleanly_on_sigterm(tmp_path: Path, db_url: str | None) -> None:
    data = tmp_path / "data"
    port = _free_port()
    base = f"https://127.0.0.1:{port}"
    answers: list[bytes] = []
    idle: httpx.Client | None = None
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

        # A long poll in flight when SIGTERM arrives is answered at once, not after its 60 s. The poll is sent
        # over a socket of the test's own, so that it knows when the server has read it (a fixed pause guessed
        # at a loaded machine's speed).
        poll = mtls.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=70), server_hostname="127.0.0.1")
        poll.sendall(
            f"GET /v1/nodes/{enrolled.node_id}/desired?wait=60 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"If-None-Match: {state.etag}\r\nConnection: close\r\n\r\n".encode()
        )
        _wait_read_by_server(poll.getsockname()[1], port)
        # read the answer as it comes, and close (the server's TLS close waits for the client's side of it)
        reader = threading.Thread(target=lambda: answers.append(_read_until_closed(poll)))
        reader.start()
        # And a keep-alive connection idle when SIGTERM arrives (an agent between calls, an operator's tool): the
        # server's TLS close waits for the client's, which such a client sends only when it next reads. The server
        # does not wait for it (it did, for the whole graceful timeout: 10 s, and a supervisor stopping sooner
        # killed it before it flushed presence).
        idle = httpx.Client(verify=trusted, headers=admin)
        assert idle.get(f"{base}/v1/health").status_code == 200
    finally:
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        if idle is not None:
            idle.close()
    log = output.decode()
    assert process.returncode == 0, log
    # Prompt even on a loaded machine: without `strata server`'s gc.freeze() at exit, Python's own teardown
    # of the heap took 4-10 s there after the server had finished.
    assert time.monotonic() - stopping < 5, log
    reader.join(10)
    assert [answer[:13] for answer in answers] == [b"HTTP/1.1 304 "], answers
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
