"""The node's side of attestation: on a nonce from the control plane, report what this agent runs (its code,
its configuration, the packages it serves, the boot), signed with the node key, and remember the verdict.

The code hash covers every Python file of the strata package this process runs, so an agent whose code was
changed reports a hash the control plane's release allowlist does not hold. Signing runs in a child process
(the node key is used through `cryptography`, which the agent does not load).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from strata.agent.client import ControlPlaneClient
from strata.agent.config import AgentConfig
from strata.agent.identity import FleetIdentity
from strata.agent.reconciler import Reconciler
from strata.core.attest import Report, strata_code_hash
from strata.core.hashing import digest_json

log = logging.getLogger("strata.agent")

REATTEST_S = 3600.0


def boot_id() -> str:
    """This boot's id (Linux), or an empty string elsewhere."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def config_hash(config: AgentConfig) -> str:
    """The agent's configuration, without its one-time enrollment token, as a digest."""
    return digest_json({k: v for k, v in config.to_json().items() if k != "enroll_token"})


class Attester:
    """Attests after enrollment, whenever the served packages change, and hourly."""

    def __init__(
        self,
        config: AgentConfig,
        identity: FleetIdentity,
        client: ControlPlaneClient,
        reconciler: Reconciler,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.client = client
        self.reconciler = reconciler
        self.clock = clock
        self.code = strata_code_hash()
        self.config = config_hash(config)
        self.boot = boot_id()
        self._last: tuple[tuple[str, ...], float] | None = None

    def packages(self) -> tuple[str, ...]:
        return tuple(sorted(slots.active.digest for slots in self.reconciler.state.models.values()))

    def due(self) -> bool:
        if self._last is None:
            return True
        packages, at = self._last
        return packages != self.packages() or self.clock() - at >= REATTEST_S

    def attest(self) -> dict[str, Any]:
        """Report and record the verdict; the node's placement facts follow it.

        Raises:
            TransportError, AuthError, Forbidden, ProtocolError, ConfigError: as the calls and the signing.
        """
        packages = self.packages()

        def make(nonce: str) -> tuple[dict[str, Any], str]:
            report = Report(
                node_id=self.client.node_id or "",
                nonce=nonce,
                agent_code=self.code,
                config=self.config,
                packages=packages,
                boot_id=self.boot,
                time=self.clock(),
            )
            return report.to_json(), self.identity.sign(report.payload())

        verdict = self.client.attest(make)
        level = str(verdict.get("level") or "")
        if level != self.reconciler.identity.attestation:
            log.info("attestation: %s (%s)", level or "not attested", verdict.get("reason", ""))
        self.reconciler.identity = dataclasses.replace(self.reconciler.identity, attestation=level)
        self._last = (packages, self.clock())
        return verdict
