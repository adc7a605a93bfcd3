"""Certificates against clocks that disagree: a node an hour behind its control plane still takes a fresh server
certificate, and a node whose TLS check fails on a certificate's dates is told its own clock may be the wrong one."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from strata.agent.transport import H11Transport
from strata.core.errors import TransportError
from strata.trust.ca import FleetCA


def test_a_node_an_hour_behind_verifies_a_server_certificate_made_now() -> None:
    """The certificates were valid from 5 minutes before they were made: a node whose clock is an hour behind
    refused a fresh one as 'not yet valid' (the fleet CA's own too, in a new fleet)."""
    now = dt.datetime.now(dt.UTC)
    ca = FleetCA.create("fleet", now)
    _, pem = ca.server_certificate(["control.example"], now)
    behind = PolicyBuilder().store(Store([ca.cert])).time(now - dt.timedelta(hours=1))
    verifier = behind.build_server_verifier(x509.DNSName("control.example"))
    chain = verifier.verify(x509.load_pem_x509_certificate(pem), [])
    assert chain[-1] == ca.cert


def test_a_certificate_not_valid_yet_by_this_nodes_clock_names_the_clock(tmp_path: Path) -> None:
    """A real handshake with a server whose certificates start days after this machine's clock (a node that booted
    years behind, say): the error says what time this node thinks it is, and that its clock may be wrong."""
    ahead = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    ca = FleetCA.create("fleet", ahead)
    key_pem, cert_pem = ca.server_certificate(["127.0.0.1"], ahead)
    (tmp_path / "server.key").write_bytes(key_pem)
    (tmp_path / "server.pem").write_bytes(cert_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def handshake() -> None:
        connection, _ = listener.accept()
        with connection, pytest.raises(ssl.SSLError):  # the client hangs up on the certificate
            server.wrap_socket(connection, server_side=True)

    thread = threading.Thread(target=handshake, daemon=True)
    thread.start()
    client = ssl.create_default_context(cadata=ca.cert_pem.decode())
    with listener, pytest.raises(TransportError) as refused:
        H11Transport(client).request("GET", f"https://127.0.0.1:{port}/v1/desired", headers={}, timeout=10)
    thread.join(10)
    assert "certificate is not yet valid" in str(refused.value)
    assert "this node's clock says it is 20" in str(refused.value)
    assert "set the node's clock right" in str(refused.value)
