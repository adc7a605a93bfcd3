"""The agent's control loop: enroll once, long-poll desired state, converge, report; back off when cut off.

Runs in its own thread beside the inference server. Nothing here can stop the node from serving: when the
control plane is unreachable the loop keeps the last desired state from disk, retries with exponential
backoff and full jitter, and the models in the slots keep answering.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strata import __version__
from strata.agent.client import ControlPlaneClient
from strata.agent.config import AgentConfig
from strata.agent.plan import retry_at
from strata.agent.reconciler import Reconciler
from strata.core.errors import AuthError, ConfigError, Forbidden, StrataError, TransportError
from strata.core.fsutil import write_json_atomic
from strata.core.hashing import canonical_json
from strata.core.wire import DesiredState, EnrollRequest, ProtocolError

log = logging.getLogger("strata.agent")


@dataclass(frozen=True)
class Credential:
    server: str
    node_id: str
    credential: str


def load_credential(data_dir: Path) -> Credential | None:
    """The node's stored credential, or None before enrollment.

    Raises:
        ConfigError: the file exists but is unreadable or malformed.
    """
    path = data_dir / "credential.json"
    try:
        raw = json.loads(path.read_text())
        return Credential(server=str(raw["server"]), node_id=str(raw["node_id"]), credential=str(raw["credential"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); remove it and enroll again with a new token") from exc


def save_credential(data_dir: Path, credential: Credential) -> None:
    """Store the credential readable by this user only."""
    write_json_atomic(
        data_dir / "credential.json",
        {"server": credential.server, "node_id": credential.node_id, "credential": credential.credential},
        mode=0o600,
    )


class Backoff:
    """Exponential backoff with full jitter: the n-th delay is uniform in [0, min(max, base * 2**n)]."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, math.ldexp(self.base, min(self.failures, 32)))
        self.failures += 1
        return self._rng.uniform(self.base / 2, ceiling) if ceiling > self.base / 2 else ceiling

    def reset(self) -> None:
        self.failures = 0


class EnrollmentRefused(StrataError):
    """The control plane refused this node's enrollment token: starting again will not help."""

    code = "enrollment_refused"


class AgentLoop:
    """Enroll, poll, converge, report, forever (until `stop` is set)."""

    def __init__(
        self,
        config: AgentConfig,
        client: ControlPlaneClient,
        reconciler: Reconciler,
        *,
        facts: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.client = client
        self.reconciler = reconciler
        self.facts = facts or {}
        self.clock = clock
        self.stop = threading.Event()
        self.fatal: StrataError | None = None
        self.backoff = Backoff(config.backoff_min_s, config.backoff_max_s)
        self.desired_path = config.data_dir / "desired.json"
        self.desired, self.etag = self._load_desired()
        self._reported: bytes | None = None
        self.connected = False

    # --- desired state on disk --------------------------------------------------------------------------

    def _load_desired(self) -> tuple[DesiredState | None, str | None]:
        try:
            raw = json.loads(self.desired_path.read_text())
            state = DesiredState.from_json(raw["state"])
            return state, str(raw["etag"])
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError, KeyError, TypeError, ProtocolError) as exc:
            log.warning("ignoring unreadable %s: %s", self.desired_path, exc)
            return None, None

    def _save_desired(self, state: DesiredState, etag: str) -> None:
        write_json_atomic(self.desired_path, {"etag": etag, "state": state.to_json()})

    # --- enrollment -------------------------------------------------------------------------------------

    def ensure_enrolled(self) -> None:
        """Use the stored credential, or enroll with the token once and store what the server gives.

        Raises:
            ConfigError: not enrolled and no token to enroll with, or the server's trust cannot be pinned.
            EnrollmentRefused: the server refused the token (used, expired or unknown).
            TransportError: the server is unreachable (the caller retries).
        """
        if self.client.node_id is not None:
            return
        stored = load_credential(self.config.data_dir)
        if stored is not None:
            if stored.server.rstrip("/") != self.config.server.rstrip("/"):
                log.warning("credential was issued by %s; now talking to %s", stored.server, self.config.server)
            self.client.authenticate(stored.node_id, stored.credential)
            return
        if not self.config.enroll_token:
            raise ConfigError("this node is not enrolled yet: pass --enroll-token (from `strata token create`)")
        identity = self.reconciler.identity
        request = EnrollRequest(
            token=self.config.enroll_token,
            name=self.config.name,
            tier=self.config.tier,
            labels=self.config.labels,
            profile=identity.profile.id,
            emulated=identity.emulated,
            agent_version=__version__,
            facts=self.facts,
        )
        try:
            answer = self.client.enroll(request)
        except (AuthError, Forbidden) as exc:
            raise EnrollmentRefused(f"enrollment refused: {exc}") from exc
        if self.reconciler.supply is not None:  # pinned before the credential: never enrolled without its trust
            self.reconciler.supply.pin(answer.release_keys, answer.tuf_roots)
        save_credential(
            self.config.data_dir,
            Credential(server=self.config.server, node_id=answer.node_id, credential=answer.credential),
        )
        self.client.authenticate(answer.node_id, answer.credential)
        log.info("enrolled as node %s (%s)", self.config.name, answer.node_id)

    # --- one round --------------------------------------------------------------------------------------

    def poll_wait(self) -> float:
        """How long the next poll may wait: the configured wait, shortened by a failure's retry time and by the
        next probation check."""
        wait = self.config.poll_wait_s
        now = self.clock()
        for record in self.reconciler.state.failures.values():
            wait = min(wait, max(0.0, retry_at(record) - now))
        probation = self.reconciler.probation_due()
        if probation is not None:
            wait = min(wait, probation)
        return wait

    def step(self) -> None:
        """One round: poll (waiting when in sync), converge, report.

        Raises:
            TransportError, AuthError, Forbidden, ProtocolError: the round could not talk to the server;
                the node converged on the desired state it had, if any.
        """
        self.ensure_enrolled()
        if self.reconciler.supply is not None:
            self.reconciler.supply.warn_if_unverified()
        answer = self.client.desired(self.etag if self.desired is not None else None, self.poll_wait())
        self.connected = True
        if answer.state is not None and answer.etag is not None:
            if answer.etag != self.etag:
                log.info("desired state changed (%d models)", len(answer.state.models))
            self.desired, self.etag = answer.state, answer.etag
            self._save_desired(answer.state, answer.etag)
        self.reconciler.converge(self.desired)
        self.report()

    def report(self) -> None:
        status = self.reconciler.status(self.etag)
        encoded = canonical_json(status.to_json())
        if encoded != self._reported:
            self.client.report(status)
            self._reported = encoded

    def run(self) -> None:
        """Loop until `stop` is set. Converges from the stored desired state first, so a node that starts
        without its server still does all it can offline."""
        try:
            self.reconciler.converge(self.desired)
        except TransportError as exc:
            log.info("cannot finish converging offline: %s", exc)
        while not self.stop.is_set():
            try:
                self.step()
                self.backoff.reset()
            except (ConfigError, EnrollmentRefused) as exc:
                log.error("%s", exc)
                self.fatal = exc
                self.stop.set()
                return
            except (AuthError, Forbidden) as exc:
                self.connected = False
                delay = self.config.backoff_max_s
                log.error("control plane refused this node's credential (revoked?): %s; retrying in %.0fs", exc, delay)
                self.stop.wait(delay)
            except (TransportError, ProtocolError, StrataError) as exc:
                self.connected = False
                delay = self.backoff.next_delay()
                log.warning("control plane unreachable or failing (%s); serving on, retrying in %.1fs", exc, delay)
                self.wait_offline(delay)
            except OSError as exc:  # disk full, permissions: keep serving, say so, try again later
                delay = self.backoff.next_delay()
                log.error("local I/O error (%s); retrying in %.1fs", exc, delay)
                self.stop.wait(delay)

    def wait_offline(self, delay: float) -> None:
        """Wait `delay` seconds before trying the server again, still judging probations meanwhile: a node
        rolls a bad activation back by itself whether or not its control plane answers."""
        deadline = self.clock() + delay
        while not self.stop.is_set():
            due = self.reconciler.probation_due()
            remaining = deadline - self.clock()
            if remaining <= 0:
                return
            self.stop.wait(min(remaining, due) if due is not None else remaining)
            if due is not None and not self.stop.is_set():
                try:
                    self.reconciler.check_probation()
                except OSError as exc:
                    log.error("cannot record the probation outcome (%s); trying again", exc)


def start_thread(loop: AgentLoop) -> threading.Thread:
    thread = threading.Thread(target=loop.run, name="strata-agent-loop", daemon=True)
    thread.start()
    return thread


def data_dir_lock(data_dir: Path) -> int:
    """Hold an exclusive lock on the data folder for the life of the process.

    Raises:
        ConfigError: another agent already uses this folder.
    """
    import fcntl

    fd = os.open(data_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"another agent is using {data_dir}") from exc
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd
