"""The agent's side of the control-plane API: enroll, long-poll desired state, report status."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from strata.agent.transport import HttpResponse, Transport
from strata.core.errors import AuthError, Conflict, Forbidden, StrataError, TransportError
from strata.core.wire import (
    CertificateRenewal,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    NodeStatus,
    ProtocolError,
)


class ServerError(StrataError):
    """The control plane answered, but with an error the agent cannot act on (its message is kept)."""

    code = "server_error"


@dataclass(frozen=True)
class DesiredAnswer:
    """A desired-state poll's outcome: `state` is None when unchanged (304)."""

    state: DesiredState | None
    etag: str | None


def _error_message(response: HttpResponse) -> str:
    try:
        body = json.loads(response.body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.body[:200].decode(errors="replace") or f"HTTP {response.status}"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return f"HTTP {response.status}"


def raise_for_status(response: HttpResponse, what: str) -> None:
    """Map an error status to the strata error a caller can act on.

    Raises:
        AuthError: 401 (the credential is unknown or revoked).
        Forbidden: 403.
        TransportError: 5xx, 502-504 and 429 (worth retrying later).
        ServerError: any other 4xx.
    """
    status = response.status
    if status < 400:
        return
    message = f"{what}: {_error_message(response)}"
    if status == 401:
        raise AuthError(message)
    if status == 403:
        raise Forbidden(message)
    if status >= 500 or status == 429:
        raise TransportError(message)
    raise ServerError(f"{message} (HTTP {status})")


class ControlPlaneClient:
    """Calls the control plane for one node. Every call raises `TransportError` when the server cannot be
    reached, `AuthError`/`Forbidden` when it refuses the credential, and `ProtocolError` on a bad answer."""

    def __init__(self, base_url: str, transport: Transport, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.transport = transport
        self.timeout = timeout
        self.node_id: str | None = None

    def authenticate(self, node_id: str) -> None:
        """Speak as `node_id` from now on (the transport presents its certificate)."""
        self.node_id = node_id

    def auth_headers(self) -> dict[str, str]:
        """Headers a node call needs: none beyond TLS, whose client certificate names the node.

        Raises:
            AuthError: the agent has no identity yet.
        """
        if self.node_id is None:
            raise AuthError("agent is not enrolled")
        return {}

    def url(self, path: str) -> str:
        return self.base_url + path

    def _json(self, response: HttpResponse, what: str) -> Any:
        try:
            return json.loads(response.body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"{what}: the server's answer is not JSON") from exc

    def fleet_ca(self, token: str) -> str:
        """The fleet CA (PEM), for a holder of an enrollment token. The caller checks it against the token's pin.

        Raises:
            AuthError: the token is not valid.
        """
        response = self.transport.request(
            "GET", self.url("/v1/ca"), headers={"authorization": f"Bearer {token}"}, timeout=self.timeout
        )
        raise_for_status(response, "fleet CA")
        return response.body.decode("ascii", errors="replace")

    def renew(self, csr: str) -> CertificateRenewal:
        """A new certificate for this node (over mutual TLS with its current one)."""
        response = self.transport.request(
            "POST",
            self.url(f"/v1/nodes/{self.node_id}/certificate"),
            headers={**self.auth_headers(), "content-type": "application/json"},
            body=json.dumps({"csr": csr}).encode(),
            timeout=self.timeout,
        )
        raise_for_status(response, "certificate renewal")
        return CertificateRenewal.from_json(self._json(response, "certificate renewal"))

    def _post_json(self, path: str, body: dict[str, Any] | None, what: str) -> dict[str, Any]:
        """POST this node's call (a JSON body, or none) and return the JSON object it answers.

        Raises:
            TransportError, AuthError, Forbidden, ServerError, ProtocolError: as any call.
        """
        headers = self.auth_headers()
        if body is not None:
            headers["content-type"] = "application/json"
        response = self.transport.request(
            "POST",
            self.url(f"/v1/nodes/{self.node_id}{path}"),
            headers=headers,
            body=json.dumps(body).encode() if body is not None else b"",
            timeout=self.timeout,
        )
        raise_for_status(response, what)
        answer = self._json(response, what)
        if not isinstance(answer, dict):
            raise ProtocolError(f"{what}: the server's answer is not a JSON object")
        return answer

    def attest(self, make_report: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """Ask for a nonce, have `make_report(nonce)` build the request (report, signature and quote if any), and
        send it; the verdict.

        Raises:
            TransportError, AuthError, Forbidden, ServerError, ProtocolError: as any call.
        """
        challenge = self._post_json("/attestation/challenge", None, "attestation challenge")
        return self._post_json("/attestation", make_report(str(challenge.get("nonce", ""))), "attestation")

    def tpm_challenge(self, identity: dict[str, Any]) -> dict[str, Any]:
        """Send this node's EK, EK certificate and AK; the credential challenge to activate."""
        body = {key: identity.get(key) for key in ("ek_public", "ek_certificate", "ak_public")}
        return self._post_json("/tpm/challenge", body, "TPM challenge")

    def tpm_activate(self, secret: str) -> dict[str, Any]:
        """Send the secret the TPM recovered; the control plane registers the AK."""
        return self._post_json("/tpm/activate", {"secret": secret}, "TPM activation")

    def enroll(self, request: EnrollRequest) -> EnrollResponse:
        """Trade a one-time enrollment token and a CSR for this node's id and certificate.

        Raises:
            Conflict: the name is enrolled already and `request.replace` is not set.
            TransportError, AuthError, Forbidden, ServerError, ProtocolError: as any call.
        """
        body = json.dumps(request.to_json()).encode()
        response = self.transport.request(
            "POST",
            self.url("/v1/enroll"),
            headers={"content-type": "application/json"},
            body=body,
            timeout=self.timeout,
        )
        if response.status == 409:  # the name is enrolled already and the request did not say replace
            raise Conflict(f"enrollment: {_error_message(response)}")
        raise_for_status(response, "enrollment")
        return EnrollResponse.from_json(self._json(response, "enrollment"))

    def desired(self, etag: str | None, wait: float) -> DesiredAnswer:
        """Fetch this node's desired state; with `etag`, wait up to `wait` seconds for it to change."""
        headers = self.auth_headers()
        if etag is not None:
            headers["if-none-match"] = etag
        response = self.transport.request(
            "GET",
            self.url(f"/v1/nodes/{self.node_id}/desired?wait={wait:g}"),
            headers=headers,
            timeout=self.timeout + wait,
        )
        if response.status == 304:
            return DesiredAnswer(state=None, etag=response.headers.get("etag", etag))
        raise_for_status(response, "desired state")
        state = DesiredState.from_json(self._json(response, "desired state"))
        if state.node_id != self.node_id:
            raise ProtocolError(f"server sent the desired state of node {state.node_id}, not {self.node_id}")
        return DesiredAnswer(state=state, etag=response.headers.get("etag", state.etag))

    def report(self, status: NodeStatus) -> None:
        """Send this node's observed state."""
        headers = {**self.auth_headers(), "content-type": "application/json"}
        response = self.transport.request(
            "PUT",
            self.url(f"/v1/nodes/{self.node_id}/status"),
            headers=headers,
            body=json.dumps(status.to_json()).encode(),
            timeout=self.timeout,
        )
        raise_for_status(response, "status report")

    def send_telemetry(self, seq: int, payload: bytes) -> bool:
        """Upload telemetry batch `seq`; True once the server stored it (or had it), False if it refused the
        batch for good (malformed: resending cannot help).

        Raises:
            TransportError, AuthError, Forbidden: try again later.
        """
        headers = {
            **self.auth_headers(),
            "content-type": "application/vnd.strata.telemetry+zstd",
            "x-strata-batch-seq": str(seq),
        }
        response = self.transport.request(
            "POST", self.url(f"/v1/nodes/{self.node_id}/telemetry"), headers=headers, body=payload, timeout=self.timeout
        )
        if response.status in (400, 413, 422):
            return False
        raise_for_status(response, "telemetry upload")
        return True

    def upload_log(self, request_id: str, text: str) -> None:
        """Answer this node's log request `request_id` with the tail of its log.

        Raises:
            ServerError: the request is gone (replaced by newer ones) or the text too large: sending again cannot
                help. TransportError, AuthError, Forbidden: try again later.
        """
        headers = {**self.auth_headers(), "content-type": "text/plain; charset=utf-8"}
        response = self.transport.request(
            "POST",
            self.url(f"/v1/nodes/{self.node_id}/log-requests/{request_id}"),
            headers=headers,
            body=text.encode("utf-8", errors="replace"),
            timeout=self.timeout,
        )
        raise_for_status(response, "log upload")

    def blob_url(self, blob: str) -> str:
        return self.url(f"/v1/blobs/sha256/{blob}")
