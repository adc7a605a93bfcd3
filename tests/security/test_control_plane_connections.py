"""The control plane's connections, attacked by anyone who can reach its port (a real `strata server` process):
a connection that never begins TLS, one that finishes TLS and sends nothing, a request head that never ends (also
after an answer on a kept-alive connection), and more connections than `--max-connections`. Before, the last three
stayed open for ever (uvicorn's keep-alive timeout starts only after an answer and stops at any byte), so enough of
them ran the server out of file descriptors. A body has no deadline (a package upload may take hours) but a floor
rate of 1 KiB/s after its grace."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from strata.control.tls import MAX_PIPELINE
from strata.localfleet import LocalFleet

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 5


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path_factory.mktemp("fleet")) as fleet:
        fleet.start_server(extra_args=["--header-timeout", "1s", "--max-connections", str(MAX_CONNECTIONS)])
        yield fleet


def _address(fleet: LocalFleet) -> tuple[str, int]:
    host, port = fleet.server_url.removeprefix("https://").rsplit(":", 1)
    return host, int(port)


def _tls(fleet: LocalFleet) -> ssl.SSLSocket:
    host, port = _address(fleet)
    context = ssl.create_default_context(cafile=str(fleet.ca_path))
    return context.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname=host)


def _closed_after(sock: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    """What the server sent before it closed `sock`, and how long that took (fails past `limit`)."""
    started, received = time.monotonic(), b""
    sock.settimeout(limit)
    while True:
        try:
            data = sock.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            return received, time.monotonic() - started
        except TimeoutError:
            raise AssertionError(f"still open after {limit} s; received {received!r}") from None
        if not data:
            return received, time.monotonic() - started
        received += data


def _answer(sock: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """One whole answer (head, body) read from `sock`."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    declared = re.search(rb"content-length: (\d+)", head, re.I)
    assert declared is not None, head  # uvicorn sends it
    length = int(declared.group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def _metrics(fleet: LocalFleet) -> dict[str, float]:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(fleet.ca_path)), timeout=10) as client:
        text = client.get(f"{fleet.server_url}/metrics", headers={"Authorization": f"Bearer {fleet.admin_token}"}).text
    found = re.findall(r"^(strata_server_\w+) ([0-9.e+]+)$", text, re.M)
    return {name: float(value) for name, value in found}


def test_a_connection_that_never_begins_tls_is_closed_at_the_header_timeout(fleet: LocalFleet) -> None:
    with socket.create_connection(_address(fleet), timeout=10) as plain:
        received, took = _closed_after(plain)
    assert received == b""
    assert HEADER_TIMEOUT_S * 0.5 <= took < HEADER_TIMEOUT_S + 4  # not the event loop's 60 s


def test_a_tls_connection_that_sends_nothing_is_closed_and_counted(fleet: LocalFleet) -> None:
    before = _metrics(fleet)["strata_server_header_timeouts_total"]
    with _tls(fleet) as quiet:
        received, took = _closed_after(quiet)
    assert received == b""
    assert took < HEADER_TIMEOUT_S + 4
    assert _metrics(fleet)["strata_server_header_timeouts_total"] == before + 1


def test_a_request_head_that_never_ends_gets_408_also_after_an_answer_on_the_connection(fleet: LocalFleet) -> None:
    with _tls(fleet) as trickle:
        trickle.sendall(b"GET /v1/health HTTP/1.1\r\nHost: strata\r\n")  # no blank line: the head goes on
        received, took = _closed_after(trickle)
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert took < HEADER_TIMEOUT_S + 4

    with _tls(fleet) as kept:
        kept.sendall(
            f"GET /v1/health HTTP/1.1\r\nHost: strata\r\nAuthorization: Bearer {fleet.admin_token}\r\n\r\n".encode()
        )
        head, _ = _answer(kept)
        assert head.startswith(b"HTTP/1.1 200 OK"), head
        kept.sendall(b"G")  # one byte of a next head stops uvicorn's keep-alive timeout; the header timeout goes on
        received, took = _closed_after(kept)
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert took < HEADER_TIMEOUT_S + 4


def test_a_body_at_the_floor_rate_is_answered_and_one_slower_is_cut(fleet: LocalFleet) -> None:
    fields = json.dumps({"ttl_seconds": 600, "name": "slow-body", "tier": None, "labels": None}).encode()
    body = fields + b" " * 24000  # JSON's whitespace: a body long enough to send slowly
    head = (
        "POST /v1/enrollment-tokens HTTP/1.1\r\nHost: strata\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {fleet.admin_token}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    # 2 KiB every 0.25 s, 8 KiB/s, for 3 s: past the header timeout, over the floor in every window even when this
    # test is paused for most of a second on a busy machine (at 2 KiB/s a half-second pause left a window short)
    with _tls(fleet) as slow:
        slow.sendall(head)
        for start in range(0, len(body), 2048):
            slow.sendall(body[start : start + 2048])
            time.sleep(0.25)
        answer, issued = _answer(slow)
    assert answer.startswith(b"HTTP/1.1 201 Created"), answer
    assert "token" in json.loads(issued)

    before = _metrics(fleet)["strata_server_slow_bodies_total"]
    with _tls(fleet) as slower:  # 100 bytes a second: held for ever before
        slower.sendall(head)
        slower.settimeout(1.0)
        started, cut = time.monotonic(), b""
        for start in range(0, len(body), 100):
            try:
                slower.sendall(body[start : start + 100])
                cut = slower.recv(4096)  # waits a second: the pace; the answer or the close ends it
                break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                break
    took = time.monotonic() - started
    assert cut.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), cut
    assert took < HEADER_TIMEOUT_S + 4
    assert _metrics(fleet)["strata_server_slow_bodies_total"] == before + 1

    # Bytes sent at once do not buy silence later: each window must bring its share.
    with _tls(fleet) as burst:
        burst.sendall(head + body[:5000])  # 5 KB: five seconds' worth at the floor rate
        started = time.monotonic()
        received, took = _closed_after(burst)
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received
    assert took < 3 * HEADER_TIMEOUT_S + 2  # the grace and one window, not 5 s more


def test_a_body_without_a_credential_is_read_only_so_far(fleet: LocalFleet) -> None:
    # FastAPI reads a body before the route's dependencies check who sent it: a body with no credential at all (an
    # enrollment's token is in its body), or with a token the server does not know, may be 64 KiB (it was 1 MiB).
    for authorization in (b"", b"Authorization: Bearer not-a-token\r\n"):
        with _tls(fleet) as anonymous:
            anonymous.sendall(b"POST /v1/enroll HTTP/1.1\r\nHost: strata\r\nContent-Type: application/json\r\n"
                              + authorization + b"Content-Length: 100000\r\n\r\n")  # fmt: skip
            head, body = _answer(anonymous)  # no byte of the body sent
        assert head.startswith(b"HTTP/1.1 413"), head
        assert "at most 65536 bytes" in json.loads(body)["error"]


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """A server of MAX_CONNECTIONS, whose header timeout (30 s) the held connections never reach."""
    with LocalFleet(tmp_path_factory.mktemp("capped")) as fleet:
        fleet.start_server(extra_args=["--header-timeout", "30s", "--max-connections", str(MAX_CONNECTIONS)])
        yield fleet


def test_past_max_connections_a_new_connection_is_closed_at_once_and_the_server_goes_on(capped: LocalFleet) -> None:
    fleet = capped
    before = _metrics(fleet)
    assert before["strata_server_connections"] == 1  # the metrics request's own
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(MAX_CONNECTIONS):  # each holds a request open: its head is complete, its body never comes
            sock = _tls(fleet)
            sock.sendall(b"POST /v1/enrollment-tokens HTTP/1.1\r\nHost: strata\r\nContent-Length: 10\r\n\r\n")
            held.append(sock)
        time.sleep(0.3)
        with _tls(fleet) as extra:
            received, took = _closed_after(extra, limit=5)
        assert (received, took < 5) == (b"", True)  # at once, not at the header timeout
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the held connections are gone once the server has read their close
        try:
            after = _metrics(fleet)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not take connections again"
            time.sleep(0.2)
    assert after["strata_server_connections_refused_total"] == before["strata_server_connections_refused_total"] + 1
    log = Path(fleet.root / "logs" / "server.log").read_text()
    assert f"{MAX_CONNECTIONS} connections open, the most this server takes (--max-connections)" in log


def test_bad_limits_are_refused_before_the_server_starts(tmp_path: Path) -> None:
    import subprocess
    import sys

    for option, value, said in [
        ("--max-connections", "0", "--max-connections must be at least 1, got 0"),
        ("--header-timeout", "0.5s", "--header-timeout must be from 1s to 10m, got '0.5s'"),
        ("--header-timeout", "soon", "--header-timeout: 'soon' is not a duration"),
    ]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "strata",
                "server",
                "--data-dir",
                str(tmp_path / "srv"),
                "--port",
                "9",
                option,
                value,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert said in done.stderr


BIG_ANSWER_SERVER = """
import sys, uvicorn
from strata.control.tls import ConnectionLimits, server_context_args
BODY = b"x" * (20 << 20)
async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(BODY)).encode())]})
        await send({"type": "http.response.body", "body": BODY})
cert, key, port = sys.argv[1:4]
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning",
            **server_context_args(cert, key, cert, ConnectionLimits(100, 1.0)))
"""


@pytest.fixture(scope="module")
def big_answers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, ssl.SSLContext]]:
    """A uvicorn server with the control plane's protocol, loop and limits (header timeout 1 s) whose every answer
    is 20 MB: more than the kernel's socket buffers hold, so an unread answer waits in the server."""
    folder = tmp_path_factory.mktemp("big")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (folder / "key.pem").write_bytes(private)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-c", BIG_ANSWER_SERVER, str(folder / "cert.pem"), str(folder / "key.pem"), str(port)]
    server = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "the server exited"
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        yield port, ssl.create_default_context(cafile=str(folder / "cert.pem"))
    finally:
        server.terminate()
        server.wait(timeout=30)


def _ask(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1")
    sock.sendall(b"GET / HTTP/1.1\r\nHost: strata\r\n\r\n")
    return sock


def _read_body(sock: ssl.SSLSocket, pause_s: float) -> int:
    """Body bytes of the answer read until it is whole or the server ends the connection, `pause_s` between reads."""
    head, body = b"", 0
    while body < 20 << 20:
        try:
            data = sock.recv(256 << 10)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not data:
            break
        if b"\r\n\r\n" not in head:
            head += data
            if b"\r\n\r\n" in head:
                body = len(head.partition(b"\r\n\r\n")[2])
        else:
            body += len(data)
        time.sleep(pause_s)
    return body


def test_a_large_answer_read_slowly_past_the_header_timeout_is_whole(big_answers: tuple[int, ssl.SSLContext]) -> None:
    # uvicorn hands a 20 MB answer to the transport at once and counts it answered; the connection's idle deadline
    # then ends it with a close that lets the rest go out first (a cut there dropped all but 3.9 MB of it).
    port, context = big_answers
    with _ask(port, context) as reader:  # a TLS record (16 KiB) every 4 ms: about 5 s, five header timeouts
        started = time.monotonic()
        assert _read_body(reader, pause_s=0.004) == 20 << 20
        assert time.monotonic() - started > 2  # it did outlast the deadline


def test_more_pipelined_requests_than_the_server_queues_end_the_connection(fleet: LocalFleet) -> None:
    before = _metrics(fleet)["strata_server_pipeline_overflows_total"]
    with _tls(fleet) as piper:
        piper.sendall(b"GET /ui/static/console.css HTTP/1.1\r\nHost: strata\r\n\r\n" * (MAX_PIPELINE + 10))
        _closed_after(piper, limit=5)
    assert _metrics(fleet)["strata_server_pipeline_overflows_total"] == before + 1
    with _tls(fleet) as piper:  # as many as it queues: all answered
        piper.sendall(b"GET /ui/static/console.css HTTP/1.1\r\nHost: strata\r\n\r\n" * MAX_PIPELINE)
        answers = [_answer(piper)[0] for _ in range(MAX_PIPELINE)]
    assert all(head.startswith(b"HTTP/1.1 200 OK") for head in answers)
