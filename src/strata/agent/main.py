"""The agent process: restore the slots and serve at once, then enroll, pull, converge and report.

Start-up order matters for an edge node: models on disk are verified and served before any network call,
so a node that reboots without its control plane is serving within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sys
from pathlib import Path

from strata.agent.client import ControlPlaneClient
from strata.agent.config import AgentConfig
from strata.agent.httpd import HttpServer
from strata.agent.loop import AgentLoop, EnrollmentRefused, data_dir_lock, load_credential, start_thread
from strata.agent.metrics import InferenceMetrics
from strata.agent.oip_server import InferenceApp
from strata.agent.reconciler import NodeIdentity, Reconciler
from strata.agent.repository import ModelRepository
from strata.agent.runtime import limit_malloc_arenas
from strata.agent.store import ArtifactStore
from strata.agent.telemetry import TelemetryConfig, TelemetryRecorder, TelemetryUploader
from strata.agent.transport import H11Transport
from strata.core.errors import ConfigError, StrataError
from strata.core.fsutil import write_bytes_atomic
from strata.core.profiles import detect_profile, get_profile, read_host_facts

log = logging.getLogger("strata.agent")

EXIT_CONFIG = 2
EXIT_ENROLLMENT = 3


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
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = data_dir_lock(config.data_dir)
        if load_credential(config.data_dir) is None and not config.enroll_token:
            raise ConfigError("this node is not enrolled yet: pass --enroll-token (from `strata token create`)")
        facts = read_host_facts()
        detected = detect_profile(facts)
        profile = get_profile(config.profile) if config.profile else detected
        emulated = profile.id != detected.id
        if emulated:
            log.warning("standing in for profile %s; this host is %s", profile.id, detected.id)
        self.repository = ModelRepository()
        self.metrics = InferenceMetrics()
        self.store = ArtifactStore(config.data_dir)
        self.store.clean_interrupted()
        self.client = ControlPlaneClient(config.server, H11Transport(), timeout=config.request_timeout_s)
        identity = NodeIdentity(
            tier=config.tier,
            labels=config.labels,
            profile=profile,
            emulated=emulated,
            serve_url=f"http://{config.serve_host}:{config.serve_port}",
        )
        self.reconciler = Reconciler(
            self.store,
            self.repository,
            self.client,
            identity,
            facts.runtimes,
            inference_threads=config.inference_threads,
            rate_limit=config.max_download_rate,
            progress=DownloadLog(),
        )
        host_facts = {
            "arch": facts.arch,
            "cpu_vendor": facts.cpu_vendor,
            "runtimes": sorted(facts.runtimes),
            "memory_mb": facts.memory_mb,
            "detected_profile": detected.id,
        }
        self.loop = AgentLoop(config, self.client, self.reconciler, facts=host_facts)
        self.telemetry = TelemetryRecorder(
            TelemetryConfig(
                path=config.data_dir / "telemetry.db",
                budget_bytes=int(config.telemetry_budget_mb * (1 << 20)),
                sample_rate=config.telemetry_sample_rate,
                slow_us=config.telemetry_slow_ms * 1000,
                upload_interval_s=config.telemetry_interval_s,
            )
        )
        self.uploader = TelemetryUploader(
            self.telemetry, self.client.send_telemetry, lambda: self.client.node_id, backoff_max_s=config.backoff_max_s
        )

    def ready(self) -> bool:
        """Ready when every model in the slots is loaded and serving."""
        return all(self.repository.get(name) is not None for name in self.reconciler.state.models)

    async def serve(self) -> int:
        """Serve until SIGTERM/SIGINT or a fatal error; return the exit code."""
        token = None if self.config.serve_is_loopback else serve_token(self.config.data_dir)
        app = InferenceApp(
            self.repository,
            self.metrics,
            token=token,
            ready=self.ready,
            telemetry=self.telemetry,
            batching=self.config.batching,
        )
        server = HttpServer(app.handle)
        await server.start(self.config.serve_host, self.config.serve_port)
        log.info(
            "serving the Open Inference Protocol on http://%s:%d%s",
            self.config.serve_host,
            server.port,
            " (bearer token in serve.token)" if token else "",
        )
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(signum, stop.set)
        thread = start_thread(self.loop)
        self.uploader.start()
        while not stop.is_set() and thread.is_alive():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
        self.loop.stop.set()
        self.uploader.stop.set()
        await server.stop()
        self.telemetry.close()
        fatal = self.loop.fatal
        if isinstance(fatal, EnrollmentRefused):
            return EXIT_ENROLLMENT
        if fatal is not None:
            return EXIT_CONFIG
        log.info("agent stopped")
        return 0


def run(config: AgentConfig) -> int:
    """Run the agent until it is stopped; return the process exit code."""
    limit_malloc_arenas()  # before any thread allocates: lets idle memory return after large batches
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[" + config.name + "]: %(message)s",
        stream=sys.stderr,
    )
    try:
        agent = Agent(config)
        agent.reconciler.restore()
        return asyncio.run(agent.serve())
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
