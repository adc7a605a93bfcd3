"""The operator's client of the control-plane API (httpx), used by every operator command and by
`strata.localfleet` (a library module, so the fleet runner does not import the CLI that runs it).

`transport=` is the extension point: tests can drive the FastAPI app in-process with it.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from strata.core.errors import (
    UNSIGNED_REFUSED,
    AuthError,
    ConfigError,
    Conflict,
    Forbidden,
    NotFound,
    PackageError,
    SignatureError,
    StrataError,
    TransportError,
)

_BY_STATUS: dict[int, type[StrataError]] = {
    400: ConfigError,
    401: AuthError,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PackageError,
    422: PackageError,
}
# The 422 answers that are about what the operator asked, not a package: a malformed or unknown value, an unknown
# profile, a request the API's schema refuses.
_BAD_INPUT: frozenset[object] = frozenset({"protocol_error", "profile_unknown", "invalid_request"})


def trust_context(ca: str) -> ssl.SSLContext:
    """A TLS context that trusts the fleet CA certificate(s) in the PEM file `ca` (and nothing else).

    Raises:
        ConfigError: the file is missing, unreadable, or holds no certificate.
    """
    hint = "(--ca or STRATA_CA: the fleet CA, the file DATA_DIR/ca.pem in the server's --data-dir)"
    if not os.path.isfile(ca):
        raise ConfigError(f"the CA file {ca} is not a file {hint}")
    try:
        return ssl.create_default_context(cafile=ca)
    except ssl.SSLError as exc:  # no PEM certificate in it: an ssl.SSLError naming the X509 library's reason
        raise ConfigError(f"the CA file {ca} holds no certificate ({exc.reason or exc}) {hint}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the CA file {ca} cannot be read: {exc} {hint}") from exc


def check_server_url(server: str) -> None:
    """Refuse a control-plane address that is no http(s) URL before anything is sent: httpx took
    `127.0.0.1:8700` for a request and failed it as unreachable (exit 4), which hid the missing scheme.

    Raises:
        ConfigError: `server` has no scheme, or one other than https or http.
    """
    if server.startswith(("https://", "http://")):
        return
    _, found, rest = server.partition("://")
    if found:
        raise ConfigError(
            f"--server {server!r} is not an https:// URL (strata server serves HTTPS: --server https://{rest})"
        )
    raise ConfigError(f"--server {server!r} has no scheme (strata server serves HTTPS: --server https://{server})")


def _certificate_refused(exc: BaseException) -> bool:
    """Whether a connection failed because the server's certificate did not verify (httpx wraps the ssl error)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


class ControlClient:
    """Typed calls to /v1 with the admin token. Every method raises a `StrataError` subclass:
    `TransportError` (unreachable, 5xx), `ConfigError` (400, or a server certificate the CA does not vouch for),
    `AuthError`/`Forbidden`, `NotFound`, `Conflict`, `PackageError`."""

    def __init__(
        self,
        server: str | None,
        token: str | None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
        ca: str | None = None,
    ) -> None:
        """`ca` is the fleet CA certificate that the server's must chain to (default: STRATA_CA, or the system's
        trust store when that is unset).

        Raises:
            ConfigError: no server or token, a server that is no http(s) URL, or `ca` is not a readable certificate
                file.
        """
        if not server:
            raise ConfigError("no control plane given: pass --server URL or set STRATA_SERVER")
        check_server_url(server)
        if not token:
            # Which scope the call needs is the server's to say (a read token lists nodes; an admin token is
            # needed to change them): a refused one is told so in the answer.
            raise ConfigError(
                "no API token given: pass --token or set STRATA_TOKEN (DATA_DIR/admin.token, or a token from "
                "`strata token api`)"
            )
        self.server = server.rstrip("/")
        self.ca = ca or os.environ.get("STRATA_CA") or None
        self._http = httpx.Client(
            base_url=self.server,
            headers={"authorization": f"Bearer {token}"},
            transport=transport,
            timeout=timeout,
            verify=trust_context(self.ca) if self.ca else True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            if _certificate_refused(exc):
                raise ConfigError(self._untrusted(exc)) from exc
            hint = ""
            if self.server.startswith("http://"):  # a plain-HTTP request to it is dropped without an answer
                hint = f" (strata server serves HTTPS only: --server https://{self.server.removeprefix('http://')})"
            raise TransportError(f"cannot reach the control plane at {self.server}: {exc}{hint}") from exc
        if response.status_code >= 400:
            code = None
            try:
                body = response.json()
                message, code = body.get("error") or response.text, body.get("code")
            except (ValueError, AttributeError):
                message = response.text or response.reason_phrase
            kind = _BY_STATUS.get(response.status_code, TransportError if response.status_code >= 500 else StrataError)
            if code in _BAD_INPUT:  # a 422 that is not about a package: bad input (exit 2), not "package invalid"
                kind = ConfigError
            raise kind(f"{message} (HTTP {response.status_code})")
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise TransportError(f"control plane answered {method} {path} with something that is not JSON") from exc

    def _untrusted(self, exc: httpx.HTTPError) -> str:
        if self.ca:
            return (
                f"the control plane at {self.server} has a certificate that {self.ca} does not vouch for ({exc}): "
                "--ca / STRATA_CA must be that server's fleet CA, the file DATA_DIR/ca.pem in its --data-dir"
            )
        return (
            f"the control plane at {self.server} has a certificate this machine does not trust ({exc}): pass the "
            "fleet CA with --ca FILE or set STRATA_CA=FILE; it is the file DATA_DIR/ca.pem in the server's --data-dir"
        )

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/health")
        return result

    def create_enrollment_token(
        self,
        ttl_seconds: int,
        name: str | None = None,
        tier: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"ttl_seconds": ttl_seconds, "name": name, "tier": tier}
        body["labels"] = dict(labels) if labels is not None else None
        result: dict[str, Any] = self._call("POST", "/v1/enrollment-tokens", json=body)
        return result

    def create_reenrollment_token(self, node: str, ttl_seconds: int) -> dict[str, Any]:
        body = {"node": node, "ttl_seconds": ttl_seconds}
        result: dict[str, Any] = self._call("POST", "/v1/reenrollment-tokens", json=body)
        return result

    def assign_node(
        self,
        node_id: str,
        labels: Mapping[str, str | None] | None = None,
        tier: str | None = None,
        accept_profile: bool = False,
    ) -> dict[str, Any]:
        body = {"labels": dict(labels) if labels else None, "tier": tier, "accept_profile": accept_profile}
        result: dict[str, Any] = self._call("PATCH", f"/v1/nodes/{node_id}", json=body)
        return result

    def push_package(
        self,
        tar_path: Path,
        progress: Callable[[int], None] | None = None,
        signature: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """Upload a package tar, streaming it from disk; `signature` is its release signature (bundle and release
        role, base64), which a server with release keys requires. `progress` is told the bytes of each piece once
        it has been sent (0 first, as the upload starts), so a rate can be worked out even from one piece."""

        def chunks() -> Iterator[bytes]:
            if progress is not None:
                progress(0)
            with tar_path.open("rb") as fh:
                while piece := fh.read(1 << 20):
                    yield piece  # back here once the client has sent it
                    if progress is not None:
                        progress(len(piece))

        if signature is None and self.health().get("release_keys"):
            raise SignatureError(UNSIGNED_REFUSED)  # said before the upload, not after all of it
        headers = {"content-type": "application/x-tar", "content-length": str(tar_path.stat().st_size)}
        if signature is not None:
            headers["x-strata-signature"], headers["x-strata-release-role"] = signature
        result: dict[str, Any] = self._call("POST", "/v1/packages", content=chunks(), headers=headers)
        return result

    def attach_signature(self, model: str, version: str, variant: str, signature: tuple[str, str]) -> dict[str, Any]:
        """Attach a release signature (bundle and release role, base64) to a variant uploaded before."""
        body = {"bundle": signature[0], "release_role": signature[1]}
        path = f"/v1/models/{model}/versions/{version}/variants/{variant}/signature"
        result: dict[str, Any] = self._call("PUT", path, json=body)
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/models")
        return result

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/models/{name}/versions/{version}")
        return result

    def deploy(self, model: str, version: str, selector: Mapping[str, str], force: bool = False) -> dict[str, Any]:
        body = {"model": model, "version": version, "selector": dict(selector), "force": force}
        result: dict[str, Any] = self._call("POST", "/v1/deployments", json=body)
        return result

    def deployments(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/deployments")
        return result

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        """One deployment with every node its selector matches and how far it got there."""
        result: dict[str, Any] = self._call("GET", f"/v1/deployments/{deployment_id}")
        return result

    def delete_deployment(self, deployment_id: str) -> None:
        self._call("DELETE", f"/v1/deployments/{deployment_id}")

    def events(
        self,
        since: float | None = None,
        after: int | None = None,
        kinds: Sequence[str] = (),
        node: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """The fleet's events, oldest first: the last `limit` since `since`, or the first `limit` after id `after`."""
        params: dict[str, Any] = {"limit": limit}
        for key, value in (("since", since), ("after", after), ("node", node)):
            if value is not None:
                params[key] = value
        if kinds:
            params["kind"] = list(kinds)
        result: list[dict[str, Any]] = self._call("GET", "/v1/events", params=params)
        return result

    def telemetry(
        self, model: str, version: str | None = None, node: str | None = None, since_s: float = 3600
    ) -> dict[str, Any]:
        params: dict[str, str | float] = {"model": model, "since": since_s}
        if version is not None:
            params["version"] = version
        if node is not None:
            params["node"] = node
        result: dict[str, Any] = self._call("GET", "/v1/telemetry", params=params)
        return result

    def nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/nodes")
        return result

    def node(self, node_id: str) -> dict[str, Any]:
        """One node in detail: slots, failures, certificate expiry, attestation, labels and claims."""
        result: dict[str, Any] = self._call("GET", f"/v1/nodes/{node_id}")
        return result

    def ask_node_logs(self, node_id: str, lines: int) -> dict[str, Any]:
        """Ask a node for its last `lines` log lines; the pending request (its `id` reads the answer)."""
        result: dict[str, Any] = self._call("POST", f"/v1/nodes/{node_id}/log-requests", json={"lines": lines})
        return result

    def node_logs(self, node_id: str, request_id: str) -> dict[str, Any]:
        """A log request: `state` pending, or answered with the node's `text`."""
        result: dict[str, Any] = self._call("GET", f"/v1/nodes/{node_id}/log-requests/{request_id}")
        return result

    def revoke_node(self, node_id: str) -> None:
        self._call("DELETE", f"/v1/nodes/{node_id}")

    def create_api_token(self, scope: str, name: str | None = None) -> dict[str, Any]:
        body = {"scope": scope} if name is None else {"scope": scope, "name": name}
        result: dict[str, Any] = self._call("POST", "/v1/api-tokens", json=body)
        return result

    def api_tokens(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/api-tokens")
        return result

    def revoke_api_token(self, token_id: str) -> None:
        self._call("DELETE", f"/v1/api-tokens/{quote(token_id, safe='')}")

    # --- rollouts, pins, history --------------------------------------------------------------------------

    def create_rollout(self, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/rollouts", json=dict(body))
        return result

    def rollouts(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/rollouts")
        return result

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/rollouts/{rollout_id}")
        return result

    def rollout_action(self, rollout_id: str, action: str) -> dict[str, Any]:
        """`pause`, `resume` or `abort` a rollout."""
        result: dict[str, Any] = self._call("POST", f"/v1/rollouts/{rollout_id}/{action}")
        return result

    def create_pin(self, model: str, version: str, node: str | None, selector: Mapping[str, str]) -> dict[str, Any]:
        body = {"model": model, "version": version, "node": node, "selector": dict(selector)}
        result: dict[str, Any] = self._call("POST", "/v1/pins", json=body)
        return result

    def pins(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/pins")
        return result

    def delete_pin(self, pin_id: str) -> None:
        self._call("DELETE", f"/v1/pins/{pin_id}")

    def model_history(self, name: str, limit: int = 1000, node: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit} if node is None else {"limit": limit, "node": node}
        result: list[dict[str, Any]] = self._call("GET", f"/v1/models/{name}/history", params=params)
        return result
