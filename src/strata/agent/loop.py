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
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from strata import __version__
from strata.agent.client import ControlPlaneClient, ServerError
from strata.agent.config import AgentConfig
from strata.agent.identity import (
    FleetIdentity,
    StoredIdentity,
    parse_enrollment_token,
    pem_fingerprint,
    unverified_context,
)
from strata.agent.reconciler import Reconciler
from strata.agent.transport import H11Transport
from strata.core.errors import AuthError, ConfigError, Conflict, Forbidden, StrataError, TransportError
from strata.core.fsutil import write_json_atomic
from strata.core.hashing import canonical_json
from strata.core.wire import DesiredState, EnrollRequest, ProtocolError, tier_of
from strata.core.words import utc_time

if TYPE_CHECKING:
    from strata.agent.attestation import Attester
    from strata.agent.logtail import LogTail

log = logging.getLogger("strata.agent")
# how a node enrolls again, said where a token goes unused and where its credential is refused
_ENROLL_AGAIN: Final = "start the agent with the token, --replace and an empty --data-dir"


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
        monotonic: Callable[[], float] = time.monotonic,
        use_context: Callable[[ssl.SSLContext], None] | None = None,
    ) -> None:
        """`use_context` receives every TLS context the node's identity yields (at enrollment and renewal). `clock`
        is read against dates (the certificate's); `monotonic` times every wait, which a step of the wall clock (NTP
        setting a node that booted a day fast right) must neither end nor stretch."""
        self.config = config
        self.identity = FleetIdentity(config.data_dir)
        self.use_context = use_context or (lambda _context: None)
        self.stored: StoredIdentity | None = None
        self.attester: Attester | None = None  # set by the agent once it is wired
        self.log_tail: LogTail | None = None  # likewise: the agent's last log lines, for `strata nodes logs`
        self.adopted: Callable[[], None] = lambda: None  # told once an identity is taken up (the agent's serving)
        self._answered_log: str | None = None
        self.client = client
        self.reconciler = reconciler
        self.facts = facts or {}
        self.clock = clock
        self.monotonic = monotonic
        self.stop = threading.Event()
        self.fatal: StrataError | None = None
        self.backoff = Backoff(config.backoff_min_s, config.backoff_max_s)
        self.desired_path = config.data_dir / "desired.json"
        self.desired, self.etag = self._load_desired()
        self._reported: bytes | None = None
        self.connected = False
        self.unfinished = False  # the last convergence stopped on a transport error

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
        """Use the stored identity, or enroll once: check the server's CA against the token's pin, make a key and
        CSR on this node, and trade the token and CSR for a certificate; from then on every call is mutual TLS.

        Raises:
            ConfigError: not enrolled and no token to enroll with (or a malformed token), or the server's release
                trust cannot be pinned.
            EnrollmentRefused: the server refused the token, or its CA is not the one the token pins.
            TransportError: the server is unreachable (the caller retries).
        """
        if self.adopt_stored():
            return
        if not self.config.enroll_token:
            raise ConfigError("this node is not enrolled yet: pass --enroll-token (from `strata token create`)")
        token, pin = parse_enrollment_token(self.config.enroll_token)
        bootstrap = ControlPlaneClient(self.config.server, H11Transport(unverified_context()), self.client.timeout)
        try:
            self.identity.trust_ca(bootstrap.fleet_ca(token), pin)
        except (AuthError, Forbidden) as exc:
            raise EnrollmentRefused(f"enrollment refused: {exc}") from exc
        self.use_context(self.identity.bootstrap_context())
        identity = self.reconciler.identity
        request = EnrollRequest(
            token=token,
            name=self.config.name,
            tier=tier_of(self.config.tier),
            labels=self.config.labels,
            profile=identity.profile.id,
            emulated=identity.emulated,
            agent_version=__version__,
            facts=self.facts,
            csr=self.identity.make_csr(self.config.name),
            replace=self.config.replace,
        )
        if self.config.replace:
            log.warning(
                "enrolling with --replace: if a node named %s is enrolled already, this machine takes its place and "
                "the one that holds the name now loses its credential",
                self.config.name,
            )
        try:
            answer = self.client.enroll(request)
        except (AuthError, Forbidden, Conflict) as exc:
            raise EnrollmentRefused(f"enrollment refused: {exc}") from exc
        if pem_fingerprint(answer.ca) != pin:
            raise EnrollmentRefused("the enrollment answer names another CA than the token pins")
        if self.reconciler.supply is not None:  # pinned before the identity: never enrolled without its trust
            self.reconciler.supply.pin(answer.release_keys, answer.tuf_roots)
        self._adopt(
            self.identity.save(
                self.config.server,
                answer.node_id,
                answer.certificate,
                answer.not_after,
                received_at=self.clock(),
                issued_at=answer.issued_at,
            )
        )
        log.info(
            "enrolled as node %s (%s); certificate valid until %s",
            self.config.name,
            answer.node_id,
            utc_time(answer.not_after),
        )

    def adopt_stored(self) -> bool:
        """Take up the identity on disk, with no network call: the node id, and TLS contexts that trust the fleet
        CA and present this node's certificate. Done before anything else talks to the control plane or a relay.
        True when the node is enrolled.

        Raises:
            ConfigError: the identity files are there but damaged.
        """
        if self.client.node_id is not None:
            return True
        stored = self.identity.load()
        if stored is None:
            return False
        if stored.server.rstrip("/") != self.config.server.rstrip("/"):
            log.warning("identity was issued by %s; now talking to %s", stored.server, self.config.server)
        if self.config.enroll_token:  # kept in a service's environment, it is expected; with --replace, a mistake
            log.log(
                logging.WARNING if self.config.replace else logging.INFO,
                "this node is enrolled already (its identity is in %s): --enroll-token is not used. To enroll this "
                "machine again (revoked, or with a `strata nodes reenroll` token): %s",
                self.identity.folder,
                _ENROLL_AGAIN,
            )
        self._adopt(stored)
        return True

    def _adopt(self, stored: StoredIdentity) -> None:
        self.use_context(self.identity.client_context())
        self.client.authenticate(stored.node_id)
        self.stored = stored
        self.adopted()

    def renew_if_due(self) -> None:
        """Renew the certificate once a third of its life is left (a new CSR over the same key; see
        `StoredIdentity.renew_at`).

        A certificate this node's clock says has expired is renewed all the same: the control plane, whose clock
        signed it, decides. The node's clock may be the one that is wrong (a day ahead, say), and a node that was off
        longer than the certificate's life is told so by the control plane rather than by itself.

        Raises:
            AuthError: the certificate expired and the control plane refused it: only a new enrollment brings the
                node back; it serves on meanwhile.
            TransportError: as any call; the current certificate stays in use.
        """
        stored = self.stored
        now = self.clock()
        if stored is None or now < stored.renew_at(self.config.renew_before_s):
            return
        expired = now >= stored.expires_at
        if expired:
            log.warning(
                "this node's certificate expired at %s by this node's clock, which says it is %s; asking the control"
                " plane to renew it all the same (if this node's clock is wrong, set it right)",
                utc_time(stored.expires_at),
                utc_time(now),
            )
        try:
            renewal = self.client.renew(self.identity.make_csr(self.config.name))
        except (AuthError, Forbidden, TransportError) as exc:
            # refused by the application, or by the TLS handshake ("alert certificate expired"); unreachable is not
            refused = not isinstance(exc, TransportError) or "certificate expired" in str(exc).lower()
            if not (expired and refused):
                raise
            raise AuthError(
                f"this node's certificate expired at {utc_time(stored.not_after)} and the control plane refused it"
                f" ({exc}): enroll the node again with a new token (it serves what it has meanwhile)"
            ) from exc
        self._adopt(
            self.identity.save(
                stored.server,
                stored.node_id,
                renewal.certificate,
                renewal.not_after,
                received_at=self.clock(),
                issued_at=renewal.issued_at,
            )
        )
        log.info("renewed this node's certificate; valid until %s", utc_time(renewal.not_after))

    # --- one round --------------------------------------------------------------------------------------

    def poll_wait(self) -> float:
        """How long the next poll may wait: none while the last convergence is unfinished or before the first
        report, else the configured wait, shortened by a failure's retry time and by the next probation check."""
        if self.unfinished:  # a download was cut: resume now rather than after a quiet poll
            return 0.0
        if self._reported is None:  # just started: say at once what it serves and what failed (a load it died in)
            return 0.0
        wait = self.config.poll_wait_s
        retry = self.reconciler.next_retry_s()
        if retry is not None:
            wait = min(wait, retry)
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
        self.renew_if_due()
        if self.reconciler.supply is not None:
            self.reconciler.supply.warn_if_unverified()
        answer = self.client.desired(self.etag if self.desired is not None else None, self.poll_wait())
        self.connected = True
        if answer.state is not None and answer.etag is not None:
            if answer.etag != self.etag:
                log.info("desired state changed (%d models)", len(answer.state.models))
            self.desired, self.etag = answer.state, answer.etag
            self._save_desired(answer.state, answer.etag)
        self.answer_log_request()
        self.converge()
        self.report()
        if self.attester is not None and self.attester.due():
            try:
                self.attester.attest()
            except (ConfigError, ProtocolError) as exc:
                log.warning("attestation failed: %s", exc)

    def answer_log_request(self) -> None:
        """Upload the tail of this agent's log when the desired state asks for it (once per request), before
        converging: a long download must not keep the operator waiting.

        Raises:
            TransportError, AuthError, Forbidden: the upload did not get through (tried again next round).
        """
        request = self.desired.log_request if self.desired is not None else None
        if request is None or request.id == self._answered_log or self.log_tail is None:
            return
        try:
            self.client.upload_log(request.id, self.log_tail.tail(request.lines))
        except ServerError as exc:  # gone or refused: sending it again cannot help
            log.warning("cannot answer log request %s: %s", request.id, exc)
        else:
            log.info("sent my last %d log lines (request %s)", request.lines, request.id)
        self._answered_log = request.id

    def converge(self) -> None:
        """Converge on the desired state this node has; until that finishes, polls do not wait (work is left).

        Raises:
            TransportError: the server or relay became unreachable mid-download (what arrived stays and resumes).
        """
        self.unfinished = True
        self.reconciler.converge(self.desired)
        self.unfinished = False

    def report(self) -> None:
        status = self.reconciler.status(self.etag)
        encoded = canonical_json(status.to_json())
        if encoded != self._reported:
            self.client.report(status)
            self._reported = encoded

    def run(self) -> None:
        """Loop until `stop` is set. Takes up the stored identity and converges from the stored desired state
        first, so a node that starts without its server still does all it can offline. No error ends the loop but a
        configuration the node cannot run with (`fatal`): a full disk, a refused credential, a bug in a step are
        logged and tried again after a back-off, the models in the slots serving meanwhile."""
        try:
            enrolled = self.adopt_stored()
        except ConfigError as exc:
            log.error("%s", exc)
            self.fatal = exc
            self.stop.set()
            return
        if enrolled:
            try:
                self.converge()
            except TransportError as exc:
                log.info("cannot finish converging offline: %s", exc)
            except Exception as exc:  # every error is the loop's to report and retry (see `_failed`)
                if not self._failed(exc):
                    return
        while not self.stop.is_set():
            try:
                self.step()
                self.backoff.reset()
            except Exception as exc:  # as above
                if not self._failed(exc):
                    return

    def _failed(self, exc: Exception) -> bool:
        """Say why a round failed and wait before the next (stopping the loop for good only on a configuration the
        node cannot run with), judging probations meanwhile (a round that fails every time must not keep a bad
        version on probation from rolling back); return whether the loop goes on."""
        if isinstance(exc, ConfigError | EnrollmentRefused):
            log.error("%s", exc)
            self.fatal = exc
            self.stop.set()
            return False
        if isinstance(exc, AuthError | Forbidden):
            self.connected = False
            delay = self.config.backoff_max_s
            log.error(
                "control plane refused this node's credential (revoked?): %s; retrying in %.0fs. A revoked node "
                "enrolls again with a new key: `strata nodes reenroll %s` makes the token; %s",
                exc,
                delay,
                self.config.name,
                _ENROLL_AGAIN,
            )
            self.wait_offline(delay)
        elif isinstance(exc, TransportError | ProtocolError | StrataError):
            self.connected = False
            delay = self.backoff.next_delay()
            doing = "serving on" if self.stored is not None else "not enrolled yet, nothing to serve"
            log.warning("control plane unreachable or failing (%s); %s, retrying in %.1fs", exc, doing, delay)
            self.wait_offline(delay)
        elif isinstance(exc, OSError):  # disk full, permissions: keep serving, say so, try again later
            delay = self.backoff.next_delay()
            log.error("local I/O error (%s); retrying in %.1fs", exc, delay)
            self.wait_offline(delay)
        else:  # a bug: said with its traceback; the node serves on and the next round may get past it
            delay = self.backoff.next_delay()
            log.error("unexpected error in the agent's loop; retrying in %.1fs", delay, exc_info=exc)
            self.wait_offline(delay)
        return True

    def wait_offline(self, delay: float) -> None:
        """Wait `delay` seconds before trying the server again, still judging probations meanwhile: a node
        rolls a bad activation back by itself whether or not its control plane answers."""
        deadline = self.monotonic() + delay
        while not self.stop.is_set():
            due = self.reconciler.probation_due()
            remaining = deadline - self.monotonic()
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
