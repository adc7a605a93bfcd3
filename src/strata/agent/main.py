"""The agent process: restore the slots and serve at once, then enroll, pull, converge and report.

Start-up order matters for an edge node: models on disk are verified and served before any network call,
so a node that reboots without its control plane is serving within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import signal
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

from strata.agent.attestation import Attester
from strata.agent.children import set_make_room
from strata.agent.client import ControlPlaneClient
from strata.agent.config import AgentConfig
from strata.agent.httpd import MAX_LINGERING_REFUSALS, HttpServer, Request, Response, ServerLimits
from strata.agent.identity import FleetIdentity
from strata.agent.logtail import LogTail
from strata.agent.loop import AgentLoop, EnrollmentRefused, data_dir_lock, start_thread
from strata.agent.metrics import InferenceMetrics
from strata.agent.oip_server import InferenceApp
from strata.agent.peers import PeerGate
from strata.agent.probation import ProbationConfig
from strata.agent.processes import plan_serving, share, telemetry_config, usable_cores
from strata.agent.reconciler import NodeIdentity, Reconciler
from strata.agent.repository import ModelRepository
from strata.agent.runtime import limit_malloc_arenas, release_free_memory
from strata.agent.serving import ServingTracker
from strata.agent.store import ArtifactStore
from strata.agent.supply import SupplyGuard
from strata.agent.telemetry import TelemetryGauges, TelemetryRecorder, TelemetryUploader
from strata.agent.transport import H11Transport
from strata.agent.vault import Vault
from strata.core.aio import run_serving, wait_event
from strata.core.errors import ConfigError, StrataError
from strata.core.fsutil import write_bytes_atomic
from strata.core.logformat import JsonFormatter, check_log_level
from strata.core.openfiles import effective_max_connections, raise_open_files_limit
from strata.core.profiles import detect_profile, get_profile, read_host_facts
from strata.core.wire import tier_of
from strata.trust.fleet_tls import peer_node_id

if TYPE_CHECKING:
    from strata.agent.oip_grpc import GrpcInferenceServer

log = logging.getLogger("strata.agent")

EXIT_CONFIG = 2
# At a stop, how long a load under way may take to finish (systemd waits 90 s, Kubernetes 30 s, by default).
STOP_LOAD_WAIT_S = 20.0
STOP_UNDO_WAIT_S = 5.0  # after the serving processes stopped, for a load they cut short to be undone
EXIT_ENROLLMENT = 3
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)  # a service manager's stop, Ctrl-C


def serve_token(data_dir: Path) -> str:
    """The bearer token the inference API requires when it listens beyond loopback (made once, kept)."""
    path = data_dir / "serve.token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    write_bytes_atomic(path, token.encode() + b"\n", mode=0o600)
    return token


class DownloadLog:
    """Logs a download's progress at every quarter, for packages large enough that someone will wonder."""

    def __init__(self, min_bytes: int = 8 << 20) -> None:
        self.min_bytes = min_bytes
        self._last_quarter = 0

    def __call__(self, have: int, total: int) -> None:
        if total < self.min_bytes:
            return
        quarter = 4 * have // total
        if have < total and quarter != self._last_quarter and quarter > 0:
            log.info("downloaded %d%% (%d of %d bytes)", 25 * quarter, have, total)
        self._last_quarter = quarter % 4


class Agent:
    """One node's agent: the pieces wired together (see `run`)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = data_dir_lock(config.data_dir)
        except OSError as exc:  # not a folder, not ours to write, a read-only file system
            raise ConfigError(f"cannot use the data folder {config.data_dir}: {exc.strerror or exc}") from exc
        if FleetIdentity(config.data_dir).load() is None and not config.enroll_token:
            raise ConfigError("this node is not enrolled yet: pass --enroll-token (from `strata token create`)")
        facts = read_host_facts()
        detected = detect_profile(facts)
        profile = get_profile(config.profile) if config.profile else detected
        emulated = profile.id != detected.id
        if emulated:
            log.warning("standing in for profile %s; this host is %s", profile.id, detected.id)
        self.repository = ModelRepository()
        serving = ServingTracker()
        self.processes, self.threads = plan_serving(
            config.tier, usable_cores(), config.serve_processes, config.inference_threads
        )
        self.metrics = InferenceMetrics(serving=serving, process="0" if self.processes > 1 else None)
        self.vault = Vault(config.data_dir / "trust") if config.encrypt_at_rest else None
        # one helper child at a time: the vault worker stops while a signing, TPM or verifying child runs (it
        # starts again on its next call), so the tree peaks at the agent plus its largest helper
        set_make_room(self.vault.close if self.vault is not None else None)
        self.store = ArtifactStore(config.data_dir, self.vault)
        self.store.clean_interrupted()
        for digest in self.store.seal_plaintext_packages():
            log.info("sealed package %s kept in the clear by an earlier run", digest[:19])
        self.transport = H11Transport()
        # other nodes are checked against the revocation list of this node's latest desired state
        self.peers = PeerGate(lambda: self.loop.desired)
        # to other nodes (the parent relay): their certs name nodes, not hosts
        # and a parent must keep its answers coming: one trickling a byte now and then would hold the agent's loop
        # (and with it every poll for desired state, revocations included) inside one download
        self.peer_transport = H11Transport(peer_refusal=self.peers.refusal, min_rate=relay_min_rate(config))
        self._tier_context: ssl.SSLContext | None = None
        self.client = ControlPlaneClient(config.server, self.transport, timeout=config.request_timeout_s)
        identity = NodeIdentity(
            tier=tier_of(config.tier),
            labels=config.labels,
            profile=profile,
            emulated=emulated,
            # where other tiers reach this node: its mutual-TLS tier listener when it has one (the serve port is
            # for local applications)
            serve_url=(
                f"https://{url_host(config.serve_host_tier)}:{config.tier_port}"
                if config.tier_port
                else f"http://{url_host(config.serve_host)}:{config.serve_port}"
            ),
            name=config.name,
        )
        self.reconciler = Reconciler(
            self.store,
            self.repository,
            self.client,
            identity,
            facts.runtimes,
            inference_threads=self.threads,
            golden_timeout_s=config.golden_timeout_s,
            rate_limit=config.max_download_rate,
            progress=DownloadLog(),
            relays=lambda: config.relays,
            relay_transport=self.peer_transport,
            relay_min_rate=relay_min_rate(config),
            serving=serving,
            probation=ProbationConfig(duration_s=config.probation_s),
            report_interval_s=config.report_interval_s,
            supply=SupplyGuard(config.data_dir, self.client, profile.id, sorted(facts.runtimes)),
        )
        host_facts = {
            "arch": facts.arch,
            "cpu_vendor": facts.cpu_vendor,
            "runtimes": sorted(facts.runtimes),
            "memory_mb": facts.memory_mb,
            "detected_profile": detected.id,
        }
        self.loop = AgentLoop(config, self.client, self.reconciler, facts=host_facts, use_context=self._use_context)
        # the stored identity (fleet CA, node certificate) before anything can call out: the offline convergence,
        # the relay's upstream fetches and the telemetry uploader all start from what is on disk
        self.loop.adopt_stored()
        self.loop.attester = Attester(config, self.loop.identity, self.client, self.reconciler)
        self.telemetry = TelemetryRecorder(telemetry_config(config))
        self.uploader = TelemetryUploader(
            self.telemetry, self.client.send_telemetry, lambda: self.client.node_id, backoff_max_s=config.backoff_max_s
        )

    def _use_context(self, context: ssl.SSLContext) -> None:
        """A new TLS identity (enrollment, renewal): every outgoing connection uses it from now on, and the tier
        listener presents the renewed certificate to new connections."""
        self.transport.use_ssl_context(context)
        identity = self.loop.identity
        if identity.cert_path.exists():
            self.peer_transport.use_ssl_context(identity.peer_context())
            if self._tier_context is not None:
                self._tier_context.load_cert_chain(identity.cert_path, identity.key_path)

    def close(self) -> None:
        """Close what the agent opened before serving: the telemetry buffer and the vault worker."""
        self.telemetry.close()
        if self.vault is not None:
            self.vault.close()

    def ready(self) -> bool:
        """Ready when every model in the slots is loaded and serving."""
        return all(self.repository.get(name) is not None for name in self.reconciler.state.models)

    async def serve(self) -> int:
        """Serve until SIGTERM/SIGINT or a fatal error; return the exit code.

        Two listeners: the serve port for local applications (plain HTTP on loopback; a bearer token when bound
        elsewhere), and, with --tier-port, a mutual-TLS listener for other tiers (devices falling back to this
        node, and the relay) that accepts only this fleet's certificates. The tier listener starts once the node
        has its certificate.
        """
        token = None if self.config.serve_is_loopback else serve_token(self.config.data_dir)
        gauges = TelemetryGauges(self.metrics.registry)
        limits = server_limits(self.config)  # each listener has its own budget and connection cap
        serve_limits, batching = share(self.config, self.processes)  # the serve port's processes share theirs
        pool = None
        if self.processes > 1:
            from strata.agent.pool import ServingPool  # only nodes serving from several processes pay for it

            pool = ServingPool(
                self.config,
                self.processes,
                self.threads,
                self.repository.all,
                self.store.open,
                self.metrics.serving,
                token,
            )
        app = InferenceApp(
            self.repository,
            self.metrics,
            token=token,
            ready=self.ready,
            telemetry=self.telemetry,
            telemetry_gauges=gauges,
            batching=batching,
            max_body_bytes=self.config.max_request_bytes,
            decode_budget_bytes=serve_limits.max_body_bytes_in_flight,
            metrics_view=pool.render_metrics if pool is not None else None,
        )
        # One app for both listeners, so local callers and other tiers share each model's queue and batches.
        tier_handler = app.handle
        if self.config.relay_budget_bytes > 0:
            from strata.agent.relay import PREFIX, RelayApp  # only near-edge nodes pay for the relay's code

            relay = RelayApp(
                self.store,
                self.config.data_dir / "relay",
                self.config.relay_budget_bytes,
                self.config.server,
                self.client.transport,
                self.metrics.registry,
                timeout=self.config.request_timeout_s,
            )
            self.reconciler.fetcher.via = relay

            async def tier_handler(request: Request) -> Response:
                if request.path.startswith(PREFIX):
                    return await relay.handle(request)
                return await app.handle(request)

            log.info("relaying package pieces for child devices (cache %d MB)", self.config.relay_budget_bytes >> 20)
        server = app.http_server(serve_limits)
        await server.start(
            self.config.serve_host, self.config.serve_port, share=pool.accept_share if pool is not None else None
        )
        # Said once the node is enrolled (at once when it was before): a node whose enrollment is refused stops
        # without ever serving, and said it served first.
        serving: str | None = (
            f"serving the Open Inference Protocol on http://{self.config.serve_host}:{server.port}"
            + (" (bearer token in serve.token)" if token else "")
            + (f" from {self.processes} processes, {self.threads} intra-op threads each" if pool is not None else "")
        )
        grpc_server = await self._start_grpc(app)
        if pool is not None:
            pool.render = app.render_metrics
            self.repository.mirror = pool
            pool.start(server.port, server.listeners)
        tier_server: HttpServer | None = None
        stop = asyncio.Event()
        wake = asyncio.Event()  # news for the loop below: a stop, or the node's identity taken up (enrolled)
        running = asyncio.get_running_loop()

        def stopping() -> None:
            stop.set()
            wake.set()

        for signum in STOP_SIGNALS:
            running.add_signal_handler(signum, stopping)

        def adopted() -> None:
            """From the loop's thread, once enrolled: the tier listener starts at once, not up to half a second
            after the node's status said which versions it serves (a near-edge node refused other tiers meanwhile)."""
            with contextlib.suppress(RuntimeError):  # the event loop closed: the agent is stopping anyway
                running.call_soon_threadsafe(wake.set)

        self.loop.adopted = adopted
        thread = start_thread(self.loop)
        self.uploader.start()
        while not stop.is_set() and thread.is_alive():
            if serving is not None and self.loop.stored is not None:
                log.info("%s", serving)
                serving = None
            if tier_server is None and self.config.tier_port is not None and self.loop.stored is not None:
                tier_server = HttpServer(
                    tier_handler,
                    limits.with_peer_shares(),  # each device of the site gets its share, not all of them
                    peer_identity=peer_node_id,
                    peer_refusal=self.peers.refusal,
                    release_memory=release_free_memory,
                )
                self._tier_context = self.loop.identity.server_context()
                await tier_server.start(self.config.serve_host_tier, self.config.tier_port, ssl=self._tier_context)
                log.info("serving other tiers over mutual TLS on port %d", tier_server.port)
            if self.vault is not None:
                self.vault.close_if_idle()
            if pool is not None:
                pool.set_ready(self.ready())
            await wait_event(wake, 0.5)
            wake.clear()
        # The loop's thread ends only when told to or on a configuration it cannot run with (`fatal`); ended any
        # other way, the process says so and exits non-zero, so a service manager starts it again.
        died = not stop.is_set() and not thread.is_alive() and self.loop.fatal is None
        self.loop.stop.set()
        self.uploader.stop.set()
        await self._finish_load()  # still serving meanwhile: the other processes may be taking the version too
        if pool is not None:
            await pool.stop()
            # A load still under way ends now (its processes are stopped: no failure of the version): let the loop's
            # thread put the slots back before the process ends, or what the next start reads is a race.
            await self._wait_for_load(STOP_UNDO_WAIT_S)
        cut = self.reconciler.activating
        if cut is not None:
            log.warning(
                "stopping in the middle of loading %s %s: the next start counts it as a failed load",
                cut.model,
                cut.version,
            )
        await server.stop()
        if grpc_server is not None:
            await grpc_server.stop()
        if tier_server is not None:
            await tier_server.stop()
        self.close()
        fatal = self.loop.fatal
        if isinstance(fatal, EnrollmentRefused):
            return EXIT_ENROLLMENT
        if fatal is not None:
            return EXIT_CONFIG
        if died:
            log.error("the agent's control loop ended unexpectedly (see the error above); agent stopped")
            return 1
        log.info("agent stopped")
        return 0

    async def _finish_load(self) -> None:
        """At a stop, start no other load and let the one under way finish (at most `STOP_LOAD_WAIT_S`): its loading
        record, left in the state, would read at the next start as a load the agent died in, a failure of that version
        that rollout gates count, when the agent was only restarted. The reconciler says which load is under way from
        before its record is written: the state (in memory or on disk) says so only after."""
        loading = self.reconciler.refuse_loads()
        if loading is None:
            return
        log.info(
            "waiting up to %g s for the load of %s %s to finish before stopping",
            STOP_LOAD_WAIT_S,
            loading.model,
            loading.version,
        )
        await self._wait_for_load(STOP_LOAD_WAIT_S)

    async def _wait_for_load(self, seconds: float) -> None:
        """Wait up to `seconds` for the load under way in the loop's thread to end, serving meanwhile."""
        deadline = time.monotonic() + seconds
        while self.reconciler.activating is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _start_grpc(self, app: InferenceApp) -> GrpcInferenceServer | None:
        """With --grpc-port, the same API over gRPC (`strata.agent.oip_grpc`); grpc is imported only then.

        Raises:
            ConfigError: grpcio is not installed, or the port cannot be bound.
        """
        if self.config.grpc_port is None:
            return None
        try:
            from strata.agent.oip_grpc import GrpcInferenceServer
        except ImportError as exc:
            raise ConfigError(f"--grpc-port needs grpcio and protobuf (pip install 'strata[grpc]'): {exc}") from exc
        # gRPC says a message's size only once it has read it whole: each call is charged the largest gRPC message
        # to the request budget REST's listener charges bodies to, before its message is read. The rest are
        # REST's limits.
        limits = server_limits(self.config)
        grpc_server = GrpcInferenceServer(
            app,
            max_message_bytes=self.config.grpc_max_message_bytes,
            message_budget_bytes=limits.max_body_bytes_in_flight,
            max_concurrent_rpcs=limits.max_connections,
            max_connections=limits.max_connections,
            handshake_timeout_s=limits.header_timeout,
            idle_timeout_s=limits.keep_alive_timeout,
            message_timeout_s=limits.body_timeout,
        )
        await grpc_server.start(f"{url_host(self.config.serve_host)}:{self.config.grpc_port}")
        log.info(
            "serving the Open Inference Protocol over gRPC on %s:%d%s, messages up to %g MiB (--grpc-max-message-mb)",
            self.config.serve_host,
            grpc_server.port,
            " (bearer token in serve.token)" if app.needs_token else "",
            self.config.grpc_max_message_bytes / (1 << 20),
        )
        return grpc_server


RELAY_MIN_RATE: Final = 16 << 10  # bytes a second a parent relay must send, after the request timeout


def relay_min_rate(config: AgentConfig) -> int:
    """The rate below which a parent relay's answer is cut: `RELAY_MIN_RATE`, or half the node's own download
    rate limit when that is lower (the node's throttle must not trip it)."""
    if config.max_download_rate is None:
        return RELAY_MIN_RATE
    return max(1, min(RELAY_MIN_RATE, config.max_download_rate // 2))


def server_limits(config: AgentConfig) -> ServerLimits:
    """The HTTP limits of the agent's listeners, from its configuration."""
    return ServerLimits(
        max_body_bytes=config.max_request_bytes,
        max_connections=config.max_connections,
        max_body_bytes_in_flight=config.request_budget_bytes,
        header_timeout=config.header_timeout_s,
        body_timeout=config.body_timeout_s,
    )


def fit_connections(config: AgentConfig, open_files: int) -> AgentConfig:
    """`config` with `--max-connections` lowered, when it must be, so that the agent's listeners (the inference
    port, and the tier port and gRPC when it has them) hold at most that many each and all of them together stay
    `FD_RESERVE` descriptors below its open files limit: at that limit it could open neither its state, its
    telemetry buffer nor a package, and a caller holding connections would stop its updates."""
    http = 1 + (config.tier_port is not None)  # each may also hold MAX_LINGERING_REFUSALS refused connections
    listeners = http + (config.grpc_port is not None)
    fitted = effective_max_connections(config.max_connections, open_files - http * MAX_LINGERING_REFUSALS, listeners)
    if fitted == config.max_connections:
        return config
    log.warning(
        "the open files limit is %d: each of the node's %d listeners takes at most %d connections, not %d"
        " (--max-connections); raise the hard limit (LimitNOFILE=, ulimit -Hn) for more",
        open_files,
        listeners,
        fitted,
        config.max_connections,
    )
    return dataclasses.replace(config, max_connections=fitted)


@contextlib.contextmanager
def noted_stop_signals(told: list[int]) -> Iterator[None]:
    """While in the block, SIGTERM and SIGINT are appended to `told` instead of ending the process (on the main
    thread; elsewhere signals do not reach Python handlers, and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, lambda signum, _frame: told.append(signum)) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(config: AgentConfig) -> int:
    """Run the agent until it is stopped; return the process exit code."""
    limit_malloc_arenas()  # before any thread allocates: lets idle memory return after large batches
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter({"node": config.name}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[" + config.name + "]: %(message)s"))
    tail = LogTail()  # the agent logs to stderr only: `strata nodes logs` reads these last lines
    tail.setFormatter(handler.formatter)
    logging.basicConfig(level=check_log_level(config.log_level), handlers=[handler, tail])
    config = fit_connections(config, raise_open_files_limit())
    try:
        agent = Agent(config)
        agent.loop.log_tail = tail
        # A stop asked for while the slots' models load at start-up is kept until the load under way ends (the
        # asyncio handlers come only with serving): cut in its middle, the next start would take it for a load the
        # agent died in. The models still to load are not loaded, and the agent stops without serving.
        told: list[int] = []
        with noted_stop_signals(told):
            agent.reconciler.restore(stopping=lambda: bool(told))
        if told:
            log.info("stopped by signal %d while loading its models at start-up", told[0])
            agent.close()
            return 0
        return run_serving(agent.serve(), config.serving_loop)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    except StrataError as exc:
        log.error("agent failed: %s", exc)
        return 1


def main() -> None:
    """Entry point of `python -m strata.agent` (configuration from STRATA_AGENT_CONFIG)."""
    try:
        config = AgentConfig.from_env()
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(EXIT_CONFIG)
    sys.exit(run(config))


def url_host(host: str) -> str:
    """A host as it stands in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
