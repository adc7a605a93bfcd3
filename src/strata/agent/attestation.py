"""The node's side of attestation: on a nonce from the control plane, report what this agent runs (its code,
its configuration, the packages it serves, the boot), signed with the node key, and remember the verdict.

The code hash covers every Python file of the strata package this process runs, so an agent whose code was
changed reports a hash the control plane's release allowlist does not hold. Signing runs in a child process
(the node key is used through `cryptography`, which the agent does not load).

With `--tpm`, the agent registers the TPM's attestation key once per start (credential activation, see
`strata.trust.tpm`) and has the TPM quote every report; the TPM work also runs in child processes
(`python -m strata.trust.tpm`), so the agent never loads tpm2-pytss either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from strata.agent.children import run_module
from strata.agent.client import ControlPlaneClient, ServerError
from strata.agent.config import AgentConfig
from strata.agent.identity import FleetIdentity
from strata.agent.reconciler import Reconciler
from strata.agent.state import boot_id
from strata.core.attest import Report, strata_code_hash
from strata.core.errors import AuthError, ConfigError, Forbidden
from strata.core.hashing import digest_json

log = logging.getLogger("strata.agent")

REATTEST_S = 3600.0


def config_hash(config: AgentConfig) -> str:
    """The agent's configuration, without its one-time enrollment token, as a digest."""
    return digest_json({k: v for k, v in config.to_json().items() if k != "enroll_token"})


class NodeTpm:
    """This node's TPM, reached through `python -m strata.trust.tpm` children."""

    TIMEOUT_S = 60.0

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self.registered = False

    def identify(self) -> dict[str, Any]:
        """The EK public area, its certificate and the AK public area (base64 TPM marshalling)."""
        return self._run("identify")

    def activate(self, challenge: dict[str, Any]) -> str:
        """The secret TPM2_ActivateCredential recovers from the control plane's challenge (base64)."""
        return str(self._run("activate", json.dumps(challenge).encode())["secret"])

    def _run(self, command: str, stdin: bytes = b"") -> dict[str, Any]:
        """Raises:
        ConfigError: the TPM could not be reached or refused the command (the child's message is kept).
        """
        what = f"TPM {command} ({self.tcti})"
        out = run_module("strata.trust.tpm", [command, self.tcti], stdin, timeout_s=self.TIMEOUT_S, what=what)
        try:
            answer: dict[str, Any] = json.loads(out)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"TPM {command} answered something that is not JSON: {exc}") from exc
        return answer

    def register(self, client: ControlPlaneClient) -> dict[str, Any]:
        """Prove to the control plane that this TPM's AK sits beside its certified EK, and have it registered.

        Raises:
            ConfigError: the TPM failed; AuthError, Forbidden, ServerError, TransportError: the control plane
            refused (an EK certificate from an untrusted manufacturer, say) or could not be reached.
        """
        registered = client.tpm_activate(self.activate(client.tpm_challenge(self.identify())))
        self.registered = True
        log.info("TPM attestation key %s registered (EK %s)", registered.get("ak_name"), registered.get("ek"))
        return registered

    def quote(self, payload: bytes) -> dict[str, Any]:
        """A quote over sha256(payload) and the PCRs it covers.

        Raises:
            ConfigError: the TPM failed.
        """
        return self._run("quote", payload)


class Attester:
    """Attests after enrollment, whenever the served packages change, and hourly."""

    def __init__(
        self,
        config: AgentConfig,
        identity: FleetIdentity,
        client: ControlPlaneClient,
        reconciler: Reconciler,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` dates the reports; `monotonic` times the hourly one (a step of the wall clock must not hold it)."""
        self.identity = identity
        self.client = client
        self.reconciler = reconciler
        self.clock = clock
        self.monotonic = monotonic
        self.code = strata_code_hash()
        self.config = config_hash(config)
        self.boot = boot_id()
        self.tpm = NodeTpm(config.tpm) if config.tpm else None
        self._last: tuple[tuple[str, ...], float] | None = None

    def packages(self) -> tuple[str, ...]:
        return tuple(sorted(slots.active.digest for slots in self.reconciler.state.models.values()))

    def due(self) -> bool:
        if self._last is None:
            return True
        packages, at = self._last
        return packages != self.packages() or self.monotonic() - at >= REATTEST_S

    def attest(self) -> dict[str, Any]:
        """Report (quoted by the TPM when there is one) and record the verdict; the node's placement facts follow.

        Raises:
            TransportError, AuthError, Forbidden, ProtocolError, ConfigError: as the calls, the signing and the
                TPM's quote.
        """
        packages = self.packages()
        if self.tpm is not None and not self.tpm.registered:
            try:
                self.tpm.register(self.client)
            except (ConfigError, AuthError, Forbidden, ServerError) as exc:
                # Attest without the TPM: the control plane decides what that is worth (not attested at all once
                # it has a TPM registered for this node). The registration is tried again at the next report.
                log.warning("TPM registration failed; attesting without the TPM: %s", exc)

        def make(nonce: str) -> dict[str, Any]:
            report = Report(
                node_id=self.client.node_id or "",
                nonce=nonce,
                agent_code=self.code,
                config=self.config,
                packages=packages,
                boot_id=self.boot,
                time=self.clock(),
            )
            payload = report.payload()
            request = {"report": report.to_json(), "signature": self.identity.sign(payload)}
            if self.tpm is not None and self.tpm.registered:
                request["quote"] = self.tpm.quote(payload)
            return request

        verdict = self.client.attest(make)
        if self.tpm is not None and self.tpm.registered and verdict.get("tpm_registered") is False:
            self.tpm.registered = False  # the control plane lost it (restored from a backup, say): register again
        level = str(verdict.get("level") or "")
        if level != self.reconciler.identity.attestation:
            log.info("attestation: %s (%s)", level or "not attested", verdict.get("reason", ""))
        self.reconciler.identity = dataclasses.replace(self.reconciler.identity, attestation=level)
        self._last = (packages, self.monotonic())
        return verdict
