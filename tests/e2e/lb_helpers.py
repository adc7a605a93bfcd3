"""Two `strata server` replicas on one data folder behind HAProxy (deploy/haproxy/haproxy.cfg, used as it is).

The LocalFleet's server URL is the balancer's address, so its operator client, its CLI and every agent it starts
go through HAProxy; the replicas are started and stopped here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from strata.localfleet import FleetError, LocalFleet, ManagedProcess, free_port

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
# The name nodes and operators use for the balancer; every replica's certificate covers it.
LB_NAME = "localhost"


def haproxy_binary() -> str:
    """The haproxy executable.

    Raises:
        FleetError: there is none (tools/install-lb-deps installs Debian's).
    """
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise FleetError("haproxy is not installed: run tools/install-lb-deps (apt-get install haproxy)")
    return found


@dataclass
class BalancedFleet:
    """A LocalFleet whose server URL is HAProxy's, with the replicas behind it."""

    fleet: LocalFleet
    replica_ports: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, ManagedProcess] = field(default_factory=dict)
    haproxy: ManagedProcess | None = None
    lb_port: int = 0

    @property
    def stats_socket(self) -> Path:
        return self.fleet.root / "haproxy.sock"

    def replica_log(self, name: str) -> str:
        return self.replicas[name].log_path.read_text(errors="replace")

    def start_replica(self, name: str, timeout: float = 30.0) -> None:
        """Start `strata server` on the shared data folder, its certificate naming the balancer."""
        port = self.replica_ports.setdefault(name, free_port())
        argv = self.fleet.strata(
            "server", "--data-dir", str(self.fleet.server_dir), "--port", str(port),
            "--tls-name", LB_NAME, "--tls-name", "127.0.0.1",
            # the tests find which replica holds a node's long poll in its access log, which leaves successful long
            # polls out unless at debug level
            "--log-level", "debug",
        )  # fmt: skip
        log = self.fleet.root / "logs" / f"replica-{name}.log"
        process = ManagedProcess(f"replica {name}", argv, log, self.fleet._env())
        process.start()
        self.replicas[name] = process

        def answers() -> bool:
            if not self.fleet.ca_path.exists():
                return False
            try:
                url = f"https://127.0.0.1:{port}/healthz"
                return httpx.get(url, verify=self.fleet.tls(), timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self.fleet.wait_for(answers, timeout, f"replica {name} to answer", process)

    def start_haproxy(self, timeout: float = 20.0) -> None:
        """Run HAProxy in the foreground (-db) with deploy/haproxy/haproxy.cfg and wait until every replica is UP.

        Raises:
            FleetError: haproxy is missing, rejects the configuration, or does not see the replicas in time.
        """
        binary = haproxy_binary()
        self.lb_port = free_port()
        names = sorted(self.replica_ports)
        env = {
            **self.fleet._env(),
            "STRATA_LB_BIND": f"127.0.0.1:{self.lb_port}",
            "STRATA_LB_NAME": LB_NAME,
            "STRATA_LB_CA": str(self.fleet.ca_path),
            "STRATA_LB_STATS_SOCKET": str(self.stats_socket),
            "STRATA_LB_MAXCONN": "2000",
            **{f"STRATA_REPLICA{i + 1}": f"127.0.0.1:{self.replica_ports[n]}" for i, n in enumerate(names)},
        }
        argv = [binary, "-db", "-f", str(HAPROXY_CONFIG)]
        self.haproxy = ManagedProcess("haproxy", argv, self.fleet.root / "logs" / "haproxy.log", env)
        self.haproxy.start()
        self.fleet.server_port = self.lb_port  # the fleet's URL, client and agents now go through the balancer
        expected = {f"replica{i + 1}": "UP" for i in range(len(names))}
        self.fleet.wait_for(
            lambda: self.server_states() == expected,
            timeout,
            "HAProxy to see every replica UP",
            self.haproxy,
        )

    def server_states(self) -> dict[str, str]:
        """Each backend server's status as HAProxy's health checks see it (UP, DOWN, ...; UNCHECKED before the first
        check passed, as HAProxy shows a server UP until checks say otherwise); {} before HAProxy answers."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(self.stats_socket))
                sock.sendall(b"show stat\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return {}
        lines = b"".join(chunks).decode().splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        states: dict[str, str] = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "strata_replicas" and row.get("svname") not in ("BACKEND", None):
                checked = row.get("check_status", "").startswith("L7OK") or row.get("status") != "UP"
                states[row["svname"]] = row.get("status", "") if checked else "UNCHECKED"
        return states

    def close(self) -> None:
        self.fleet.close()
        for process in (self.haproxy, *self.replicas.values()):
            if process is not None:
                process.stop()


@contextlib.contextmanager
def balanced_fleet(root: Path, poll_wait_s: float = 5.0) -> Iterator[BalancedFleet]:
    """Replicas `a` and `b` on one data folder (`a` first: it makes the CA, TUF keys and admin token that `b`
    then loads), HAProxy in front; everything stopped afterwards."""
    balanced = BalancedFleet(LocalFleet(root, poll_wait_s=poll_wait_s))
    try:
        balanced.start_replica("a")
        balanced.start_replica("b")
        balanced.start_haproxy()
        yield balanced
    finally:
        balanced.close()
