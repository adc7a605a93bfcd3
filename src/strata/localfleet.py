"""A whole fleet on one machine: a control plane and agents as real processes on free loopback ports.

What `strata demo` runs, and what the integration tests and benchmarks use to drive real processes.
Every process writes its log to a file in the fleet's folder; `close()` stops everything it started.
`start_replica()` starts more `strata server` processes on the same data folder (one database, one blob store,
one CA and TUF keys), each on its own port: replicas of one control plane.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx

from strata.control_client import ControlClient
from strata.core.errors import StrataError

T = TypeVar("T")


class FleetError(StrataError):
    """A local fleet process did not start, or a condition was not reached in time."""

    code = "local_fleet_failed"


PORTS_ENV: Final = "STRATA_LOCAL_PORTS"
_ports = threading.Lock()
_last_port: dict[tuple[int, int], int] = {}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now: one the kernel picks, or, with STRATA_LOCAL_PORTS=LOW-HIGH in the
    environment, the next free one of that range in turn.

    A fleet keeps an agent's or a server's port across its restart, and while it is closed the kernel may hand that
    port to anyone who binds port 0 or connects out (its ephemeral range): a test suite running in parallel took one
    so, and the restarted agent's liveness probe was answered by another test's agent. The suite gives each of its
    workers a range of its own below the ephemeral ports (`tests/conftest.py`), which nothing else takes.

    Raises:
        FleetError: STRATA_LOCAL_PORTS is malformed, or no port of its range is free.
    """
    span = os.environ.get(PORTS_ENV)
    if not span:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            return port
    try:
        low, high = (int(part) for part in span.split("-"))
    except ValueError:
        raise FleetError(f"{PORTS_ENV}={span!r} is not LOW-HIGH") from None
    if not 1024 <= low <= high <= 65535:
        raise FleetError(f"{PORTS_ENV}={span!r} is not a range of ports from 1024 to 65535")
    with _ports:
        # Each process starts at its own place in the range: a fleet a test runs in a child process (`strata demo`)
        # inherits its worker's range, and two walks from the same start would offer the same ports.
        port = _last_port.get((low, high), low + os.getpid() % (high - low + 1) - 1)
        for _ in range(high - low + 1):
            port = low if port >= high else port + 1
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:  # in use, or in TIME_WAIT (bound without SO_REUSEADDR): the next one
                    continue
            _last_port[(low, high)] = port
            return port
    raise FleetError(f"no port of {PORTS_ENV}={span} is free on 127.0.0.1")


STOP_WAIT_S: Final = 10.0  # what a stopping fleet gives its processes, together, before it kills them


@dataclass
class ManagedProcess:
    """A process this fleet started, with its command line and log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
            )
        finally:
            log.close()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise FleetError(f"{self.name} was never started")
        return self.popen.pid

    def signal(self, signum: int) -> None:
        if self.running and self.popen is not None:
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 10.0, signalled: bool = False) -> int | None:
        """SIGTERM (unless `signalled`: sent already), then SIGKILL after `timeout`; return the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            if not signalled:
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL, as a power cut would."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class AgentHandle:
    name: str
    tier: str
    labels: dict[str, str]
    data_dir: Path
    serve_port: int
    process: ManagedProcess
    tier_port: int | None = None

    @property
    def serve_url(self) -> str:
        """The inference API for local applications (plain HTTP on loopback)."""
        return f"http://127.0.0.1:{self.serve_port}"

    @property
    def tier_url(self) -> str:
        """The mutual-TLS listener other tiers use (inference fallback, the relay).

        Raises:
            FleetError: this agent was started without one.
        """
        if self.tier_port is None:
            raise FleetError(f"agent {self.name} has no tier port")
        return f"https://127.0.0.1:{self.tier_port}"


@dataclass
class GatewayHandle:
    name: str
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class ReplicaHandle:
    """Another `strata server` process on the fleet's data folder."""

    name: str
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@dataclass
class LocalFleet:
    """A control plane and agents under `root`. Use as a context manager, or call `close()`."""

    root: Path
    python: str = sys.executable
    poll_wait_s: float = 10.0
    server_port: int = 0
    agents: dict[str, AgentHandle] = field(default_factory=dict)
    gateways: dict[str, GatewayHandle] = field(default_factory=dict)
    server: ManagedProcess | None = None
    replicas: dict[str, ReplicaHandle] = field(default_factory=dict)
    server_args: tuple[str, ...] = ()
    _client: ControlClient | None = None

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def server_url(self) -> str:
        return f"https://127.0.0.1:{self.server_port}"

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    @property
    def ca_path(self) -> Path:
        """The fleet CA the control plane writes (operators pass it as --ca / STRATA_CA)."""
        return self.server_dir / "ca.pem"

    def tls(self, node: str | None = None) -> ssl.SSLContext:
        """A TLS context that trusts the fleet CA; with `node`, it also presents that node's certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_path))
        if node is not None:
            trust = self.agents[node].data_dir / "trust"
            context.load_cert_chain(trust / "node.pem", trust / "node.key")
        return context

    @property
    def admin_token(self) -> str:
        return (self.server_dir / "admin.token").read_text().strip()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.ca_path.exists():
            env["STRATA_CA"] = str(self.ca_path)
        return env

    def strata(self, *args: str) -> list[str]:
        return [self.python, "-m", "strata", *args]

    def cli_env(self) -> dict[str, str]:
        """The environment of an operator command against this fleet: its server, admin token and fleet CA."""
        env = {**self._env(), "STRATA_SERVER": self.server_url, "STRATA_TOKEN": self.admin_token}
        env["STRATA_CA"] = str(self.ca_path)
        return env

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a `strata` operator command against this fleet (admin token, fleet CA) and return what it did."""
        env = self.cli_env()
        return subprocess.run(self.strata(*args), env=env, capture_output=True, text=True, timeout=timeout, check=False)

    # --- control plane ----------------------------------------------------------------------------------

    def start_server(self, timeout: float = 30.0, extra_args: Sequence[str] = ()) -> None:
        """Start (or restart on the same port and data) the control plane and wait until it answers."""
        if not self.server_port:
            self.server_port = free_port()
        self.server_args = tuple(extra_args)
        argv = self.strata("server", "--data-dir", str(self.server_dir), "--port", str(self.server_port), *extra_args)
        self.server = ManagedProcess("server", argv, self.root / "logs" / "server.log", self._env())
        self.server.start()
        self.wait_for(self._server_healthy, timeout, "the control plane to answer", self.server)
        self._client = None

    def start_replica(self, name: str, timeout: float = 30.0, extra_args: Sequence[str] | None = None) -> ReplicaHandle:
        """Start (or restart on its port) another `strata server` on the same data folder as `start_server`'s, with
        the same arguments unless `extra_args` are given, and wait until it answers."""
        existing = self.replicas.get(name)
        port = existing.port if existing else free_port()
        args = self.server_args if extra_args is None else tuple(extra_args)
        argv = self.strata("server", "--data-dir", str(self.server_dir), "--port", str(port), *args)
        process = ManagedProcess(f"server {name}", argv, self.root / "logs" / f"server-{name}.log", self._env())
        process.start()
        handle = ReplicaHandle(name, port, process)
        self.replicas[name] = handle
        self.wait_for(lambda: self._server_healthy(handle.url), timeout, f"replica {name} to answer", process)
        return handle

    def replica_client(self, name: str) -> ControlClient:
        """An operator client of replica `name` (close it when done)."""
        return ControlClient(self.replicas[name].url, self.admin_token, ca=str(self.ca_path))

    def _server_healthy(self, url: str | None = None) -> bool:
        if not (self.server_dir / "admin.token").exists():
            return False
        try:
            response = httpx.get(
                f"{url or self.server_url}/v1/health",
                headers={"authorization": f"Bearer {self.admin_token}"},
                timeout=2,
                verify=self.tls(),
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
        self._client = None

    @property
    def client(self) -> ControlClient:
        if self._client is None:
            self._client = ControlClient(self.server_url, self.admin_token, ca=str(self.ca_path))
        return self._client

    # --- agents -----------------------------------------------------------------------------------------

    def start_agent(
        self,
        name: str,
        tier: str = "device",
        labels: dict[str, str] | None = None,
        *,
        profile: str | None = None,
        extra_args: Sequence[str] = (),
        enroll: bool = True,
        data_dir: Path | None = None,
        tier_port: bool | None = None,
        env: Mapping[str, str] | None = None,
        node_name: str | None = None,
        enroll_token: str | None = None,
        server_url: str | None = None,
        serve_processes: int | None = 1,
    ) -> AgentHandle:
        """Start an agent process (enrolling it with a fresh token the first time, or with `enroll_token`). Near-edge
        and cloud agents get a mutual-TLS tier port unless `tier_port` is False; `env` adds environment variables;
        `node_name` is the name the agent enrolls with when it is not `name` (the handle's key); `server_url`
        points it at a replica instead of the first server. Agents serve from one process unless
        `serve_processes` says more (None: the node's default, one per core), so a fleet of many agents on a
        small machine does not start one serving process per core for each."""
        existing = self.agents.get(name)
        labels = dict(labels if labels is not None else (existing.labels if existing else {}))
        if data_dir is None:
            data_dir = existing.data_dir if existing else self.root / "nodes" / name
        port = existing.serve_port if existing else free_port()
        wants_tier = tier_port if tier_port is not None else tier in ("near-edge", "cloud")
        tier_listener = (existing.tier_port if existing and existing.tier_port else free_port()) if wants_tier else None
        argv = self.strata(
            "agent",
            "--server", server_url or self.server_url,
            "--data-dir", str(data_dir),
            "--name", node_name or name,
            "--tier", tier,
            "--serve-port", str(port),
            "--poll-wait", f"{self.poll_wait_s:g}",
        )  # fmt: skip
        for key, value in labels.items():
            argv += ["--label", f"{key}={value}"]
        if profile is not None:
            argv += ["--profile", profile]
        if tier_listener is not None:
            argv += ["--tier-port", str(tier_listener)]
        if serve_processes is not None:
            argv += ["--serve-processes", str(serve_processes)]
        if enroll and not (data_dir / "trust" / "identity.json").exists():
            if enroll_token is None:  # bound as an operator would: the node cannot claim another identity
                enroll_token = str(self.client.create_enrollment_token(600, node_name or name, tier, labels)["token"])
            token = enroll_token
            argv += ["--enroll-token", token]
        argv += list(extra_args)
        process = ManagedProcess(
            f"agent {name}", argv, self.root / "logs" / f"{name}.log", {**self._env(), **(env or {})}
        )
        process.start()
        handle = AgentHandle(name, tier, labels, data_dir, port, process, tier_listener)
        self.agents[name] = handle
        return handle

    def restart_agent(self, name: str, extra_args: Sequence[str] = ()) -> AgentHandle:
        handle = self.agents[name]
        handle.process.stop()
        return self.start_agent(
            name,
            handle.tier,
            handle.labels,
            extra_args=extra_args,
            enroll=False,
            tier_port=handle.tier_port is not None,
        )

    def start_gateway(self, name: str, args: Sequence[str], timeout: float = 30.0) -> GatewayHandle:
        """Start `strata gateway --listen PORT ARGS...` and wait until it answers its liveness probe."""
        port = free_port()
        argv = self.strata("gateway", "--listen", str(port), *args)
        process = ManagedProcess(f"gateway {name}", argv, self.root / "logs" / f"gateway-{name}.log", self._env())
        process.start()
        handle = GatewayHandle(name, port, process)
        self.gateways[name] = handle

        def live() -> bool:
            try:
                return httpx.get(f"{handle.url}/v2/health/live", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_for(live, timeout, f"gateway {name} to answer", process)
        return handle

    def agent_live(self, name: str) -> bool:
        try:
            response = httpx.get(f"{self.agents[name].serve_url}/v2/health/live", timeout=2)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # --- waiting ----------------------------------------------------------------------------------------

    def wait_for(
        self,
        condition: Callable[[], T | None],
        timeout: float,
        what: str,
        process: ManagedProcess | None = None,
        interval: float = 0.1,
    ) -> T:
        """Poll `condition` until it returns something truthy; raise FleetError with the log tail if not."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if process is not None and not process.running:
                raise FleetError(f"{process.name} exited while waiting for {what}:\n{process.log_tail()}")
            if time.monotonic() > deadline:
                tail = f"\n{process.log_tail()}" if process is not None else ""
                raise FleetError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
            time.sleep(interval)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {node["name"]: node for node in self.client.nodes()}

    def node_id(self, name: str, timeout: float = 30.0) -> str:
        """The node id the agent `name` enrolled as, from its `trust/identity.json`, waiting for the file: the
        control plane lists a node once it has stored the enrollment, a moment before the agent writes it."""
        handle = self.agents[name]
        path = handle.data_dir / "trust" / "identity.json"
        self.wait_for(path.is_file, timeout, f"{name} to write its identity", handle.process)
        return str(json.loads(path.read_text())["node_id"])

    def wait_for_versions(self, expected: dict[str, dict[str, str]], timeout: float = 60.0) -> dict[str, Any]:
        """Wait until each named node reports exactly these active model versions."""

        def reached() -> dict[str, Any] | None:
            nodes = self.nodes()
            for name, models in expected.items():
                node = nodes.get(name)
                if node is None or node.get("models") != models:
                    return None
            return nodes

        try:
            return self.wait_for(reached, timeout, f"nodes to run {expected}")
        except FleetError as exc:
            tails = "\n".join(f"--- {h.name}\n{h.process.log_tail(15)}" for h in self.agents.values())
            raise FleetError(f"{exc}\nnodes now: {self.nodes()}\n{tails}") from None

    # --- teardown ---------------------------------------------------------------------------------------

    def processes(self) -> Iterator[ManagedProcess]:
        yield from (handle.process for handle in self.gateways.values())
        yield from (handle.process for handle in self.agents.values())
        yield from (handle.process for handle in self.replicas.values())
        if self.server is not None:
            yield self.server

    def close(self) -> None:
        """Stop every process this fleet started: the gateways and agents together (each told at once, then waited
        for, killed past `STOP_WAIT_S` in all), then the replicas and the server. One after another, a fleet whose
        processes were slow to stop (a busy machine) took up to ten seconds each: a minute for the demo's."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        nodes = [h.process for h in self.gateways.values()] + [h.process for h in self.agents.values()]
        servers = [handle.process for handle in self.replicas.values()] + ([self.server] if self.server else [])
        for group in (nodes, servers):
            for process in group:
                process.signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_WAIT_S
            for process in group:
                process.stop(max(0.1, deadline - time.monotonic()), signalled=True)
