"""The in-process control plane that the API tests drive, and helpers to watch what it does to its database."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from strata.control.plane import ControlPlane
from strata.control.settings import ServerSettings

T0 = 1_700_000_000.0


@dataclass
class ManualClock:
    """The server's clock in tests: it moves only when told."""

    now: float = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class NodeCredentials:
    node_id: str
    headers: dict[str, str]
    certificate: str = ""
    key: ec.EllipticCurvePrivateKey | None = None


CLIENT_CERT_HEADER = "x-test-client-cert"


class TlsTestShim:
    """In-process requests have no TLS: this ASGI wrapper turns a test header holding a (base64) PEM certificate
    into the ASGI TLS extension, as the real server's protocol does after verifying the certificate against the
    fleet CA. The real mutual TLS is tested with real processes (tests/e2e/test_mtls.py)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            encoded = headers.get(CLIENT_CERT_HEADER.encode())
            if encoded:
                pem = base64.b64decode(encoded).decode()
                scope = {**scope, "extensions": {"tls": {"client_cert_chain": [pem]}}}
        await self.app(scope, receive, send)


def node_key_and_csr(name: str) -> str:
    """A fresh EC P-256 key's CSR, as an agent makes on its node."""
    return csr_for(ec.generate_private_key(ec.SECP256R1()), name)


def csr_for(key: ec.EllipticCurvePrivateKey, name: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def cert_headers(certificate: str) -> dict[str, str]:
    return {CLIENT_CERT_HEADER: base64.b64encode(certificate.encode()).decode()}


@dataclass
class Harness:
    """One running control plane and the calls most tests make against it."""

    client: TestClient
    plane: ControlPlane
    clock: ManualClock
    admin: dict[str, str] = field(default_factory=dict)

    def enroll(
        self, name: str, labels: dict[str, str] | None = None, reenroll: bool = False, **fields: Any
    ) -> NodeCredentials:
        """Enroll a node with a token bound to its name, tier and labels (as an operator issues it); `reenroll`
        enrolls an existing one again with a token the operator issued for it."""
        if reenroll:
            issued = self.client.post("/v1/reenrollment-tokens", json={"node": name}, headers=self.admin)
        else:
            binding = {"name": name, "tier": fields.get("tier", "device"), "labels": labels or {}}
            issued = self.client.post("/v1/enrollment-tokens", json=binding, headers=self.admin)
        assert issued.status_code == 201, issued.text
        token = issued.json()["token"]
        key = ec.generate_private_key(ec.SECP256R1())
        body = {
            "token": token,
            "name": name,
            "tier": "device",
            "labels": labels or {},
            "profile": "cpu-generic",
            "csr": csr_for(key, name),
        }
        if reenroll:
            body["replace"] = True
        response = self.client.post("/v1/enroll", json={**body, **fields})
        assert response.status_code == 201, response.text
        answer = response.json()
        return NodeCredentials(answer["node_id"], cert_headers(answer["certificate"]), answer["certificate"], key)

    def upload(self, tar: bytes) -> httpx.Response:
        return self.client.post(
            "/v1/packages", content=tar, headers={**self.admin, "Content-Type": "application/x-tar"}
        )

    def deploy(self, model: str, version: str, selector: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"model": model, "version": version, "selector": selector or {}}
        response = self.client.post("/v1/deployments", json=body, headers=self.admin)
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    def desired(self, node: NodeCredentials, etag: str | None = None, wait: float = 0) -> httpx.Response:
        headers = dict(node.headers)
        if etag is not None:
            headers["If-None-Match"] = etag
        return self.client.get(f"/v1/nodes/{node.node_id}/desired", params={"wait": wait}, headers=headers)


@contextlib.contextmanager
def recorded_statements(engine: Engine) -> Iterator[list[str]]:
    """Every SQL statement `engine` executes inside the block, in order."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def writes(statements: list[str]) -> list[str]:
    """The statements that change data."""
    return [s for s in statements if s.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE")]


# `start_server(settings)`: a control plane over `settings` for the length of a `with` block.
StartServer = Callable[[ServerSettings], contextlib.AbstractContextManager[Harness]]
