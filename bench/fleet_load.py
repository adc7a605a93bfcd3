"""Control-plane cost of a fleet at a 15 s heartbeat, and how fast a deploy reaches every node.

Starts a real `strata server` (or `--replicas` of them on one `--db`), enrolls N nodes through /v1/enroll (one
token, one EC P-256 key and one fleet certificate each), then runs N simulated nodes in load-generator
process(es): each is a mutual-TLS client on ONE keep-alive HTTP/1.1 connection (as the agent's H11Transport keeps
one per origin), looping like the agent: long-poll `GET /v1/nodes/{id}/desired?wait=15` with If-None-Match (a
304 after 15 s, or the new state at once), then `PUT /v1/nodes/{id}/status`: with `--status every` on every
heartbeat (the heavier case), with `--status changed` only when it changed, as the real agent does (loop.py), so
an unchanged heartbeat is the long poll alone. Node start times are spread evenly (jittered) over one heartbeat so
polls do not line up.

Phases, all in one run (ratios, not absolute times: the machine is shared):
1. idle baseline: the server with N enrolled nodes and no connections (its background jobs);
2. steady fleet: after every node is connected and has had its first exchange, a measurement window of whole
   heartbeats: server CPU-seconds (utime+stime from /proc/PID/stat of each server process) per node-hour, gross
   and net of the idle baseline, and the nodes one core carries at 15 s; heartbeat latencies; database statements
   per heartbeat (`strata_db_statements_total` from /metrics, less a scrape's own queries measured at idle);
   the load generator's own CPU and whether it kept up (its event-loop lag, heartbeats done vs due);
3. deploy: `POST /v1/deployments` of a new version to the whole fleet; the time until 50%, 99% and 100% of
   the nodes' long polls have returned the new ETag.

    python bench/fleet_load.py --nodes 1000 [--db URL | --postgres] [--replicas 2] [--window 60] [--load-processes 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import re
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

from strata.core.package import pack_tar
from strata.examples.digits import train_digits
from strata.localfleet import LocalFleet, ManagedProcess
from strata.package_build import build_package
from strata.trust.node import make_csr

PROFILE = "x86_64-avx2"
LABELS = {"fleet": "bench"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- measuring -----------------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def scrape_statements(url: str, token: str, ca: Path) -> dict[str, float]:
    """The database counters from /metrics."""
    response = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {token}"}, verify=str(ca), timeout=120)
    response.raise_for_status()
    counts: dict[str, float] = {}
    for match in re.finditer(r'^strata_db_statements_total\{verb="(\w+)"\} (\S+)$', response.text, re.M):
        counts[match[1]] = float(match[2])
    commits = re.search(r"^strata_db_commits_total (\S+)$", response.text, re.M)
    if not counts or commits is None:
        raise SystemExit("the server's /metrics has no strata_db_statements_total (an older server?)")
    counts["commits"] = float(commits[1])
    return counts


def minus(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: a[key] - b.get(key, 0.0) for key in a}


# --- the simulated nodes (load-generator process) --------------------------------------------------------------


@dataclass(frozen=True)
class SimNode:
    node_id: str
    folder: str  # node.key, node.pem
    url: str  # the replica it talks to


class Fleet:
    """The nodes of one load-generator process and what they observed (monotonic times)."""

    def __init__(
        self, nodes: list[SimNode], ca: str, heartbeat_s: float, ramp_s: float, every: bool, apply_s: float = 0.0
    ) -> None:
        self.nodes = nodes
        self.every = every
        self.apply_s = apply_s  # after a new desired state, the node "converges" this long before it reports
        self.ca = ca
        self.heartbeat_s = heartbeat_s
        self.ramp_s = ramp_s
        self.status_latency: list[tuple[float, float]] = []  # (sent, seconds to the 204)
        self.poll_overshoot: list[tuple[float, float]] = []  # (sent, seconds past the wait a 304 came back)
        self.heartbeats: list[float] = []  # when each heartbeat (poll + status) completed
        self.loop_lag: list[tuple[float, float]] = []
        self.errors: dict[str, int] = {}
        self.etags: list[str | None] = [None] * len(nodes)
        self.connected = 0
        self.first_exchange = 0
        self.deploy_mark: float | None = None
        self.deploy_etags: list[str | None] = []
        self.deploy_seen: dict[int, float] = {}
        self.context_mb = 0.0

    def contexts(self) -> list[ssl.SSLContext]:
        """One SSLContext per node (its own certificate and key); measures what they cost in memory."""
        before = rss_mb()
        contexts = []
        for node in self.nodes:
            context = ssl.create_default_context(cafile=self.ca)
            context.load_cert_chain(f"{node.folder}/node.pem", f"{node.folder}/node.key")
            contexts.append(context)
        self.context_mb = rss_mb() - before
        return contexts

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def run_node(self, index: int, context: ssl.SSLContext, start_at: float) -> None:
        node = self.nodes[index]
        parts = urllib.parse.urlsplit(node.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 443
        head = f"Host: {parts.netloc}\r\nUser-Agent: strata-bench\r\n"
        status_head = f"PUT /v1/nodes/{node.node_id}/status HTTP/1.1\r\n{head}Content-Type: application/json\r\n"
        wait = self.heartbeat_s
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        first = True
        reported: list[bytes | None] = [None]
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port, ssl=context)
            except OSError as exc:
                self.error(f"connect: {type(exc).__name__}")
                await asyncio.sleep(1 + random.random())
                continue
            self.connected += 1
            try:
                while True:
                    etag = self.etags[index]
                    conditional = f"If-None-Match: {etag}\r\n" if etag else ""
                    poll_wait = 0 if etag is None else wait
                    sent = time.monotonic()
                    writer.write(
                        f"GET /v1/nodes/{node.node_id}/desired?wait={poll_wait:g} HTTP/1.1\r\n{head}{conditional}\r\n"
                        .encode()
                    )  # fmt: skip
                    status, headers, _ = await _read_response(reader)
                    done = time.monotonic()
                    if status == 200:
                        new = headers.get("etag")
                        marked = self.deploy_mark is not None and index not in self.deploy_seen
                        if marked and new != self.deploy_etags[index]:
                            self.deploy_seen[index] = done
                        self.etags[index] = new
                    elif status == 304:
                        self.poll_overshoot.append((sent, done - sent - poll_wait))
                    else:
                        self.error(f"poll HTTP {status}")
                        await asyncio.sleep(1)
                        continue
                    body = json.dumps(
                        {"tier": "device", "labels": LABELS, "profile": PROFILE, "emulated": False,
                         "agent_version": "bench", "models": [], "failures": [],
                         "desired_etag": self.etags[index], "serve_url": None}
                    ).encode()  # fmt: skip
                    if status == 200 and not first and self.apply_s:
                        await asyncio.sleep(self.apply_s * (0.5 + random.random()))
                    if not self.every and body == reported[0]:
                        self.heartbeats.append(time.monotonic())
                        continue
                    sent = time.monotonic()
                    writer.write(f"{status_head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    status, _, _ = await _read_response(reader)
                    done = time.monotonic()
                    if status != 204:
                        self.error(f"status HTTP {status}")
                    reported[0] = body
                    self.status_latency.append((sent, done - sent))
                    self.heartbeats.append(done)
                    if first:
                        first = False
                        self.first_exchange += 1
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.error(f"connection: {type(exc).__name__}")
                self.connected -= 1
                writer.close()
                await asyncio.sleep(1 + random.random())

    async def watch_loop(self) -> None:
        """The generator's own lateness: a 50 ms timer's delay (high means the generator did not keep up)."""
        while True:
            due = time.monotonic() + 0.05
            await asyncio.sleep(0.05)
            now = time.monotonic()
            self.loop_lag.append((now, now - due))

    def stats(self, start: float, end: float) -> dict[str, Any]:
        def inside(samples: list[tuple[float, float]]) -> list[float]:
            return [value for at, value in samples if start <= at < end]

        return {
            "status_latency": inside(self.status_latency),
            "poll_overshoot": inside(self.poll_overshoot),
            "heartbeats": sum(1 for at in self.heartbeats if start <= at < end),
            "loop_lag": inside(self.loop_lag),
            "errors": dict(self.errors),
            "connected": self.connected,
        }


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return status, headers, body


def load_process(
    nodes: list[SimNode], ca: str, heartbeat_s: float, ramp_s: float, every: bool, apply_s: float, conn: Connection
) -> None:
    """One load generator: runs its nodes and answers the coordinator's commands on `conn`."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    fleet = Fleet(nodes, ca, heartbeat_s, ramp_s, every, apply_s)

    async def main() -> None:
        contexts = fleet.contexts()
        started = time.monotonic()
        offsets = [(i + random.random()) / len(nodes) * ramp_s for i in range(len(nodes))]
        random.shuffle(offsets)
        tasks = [asyncio.create_task(fleet.run_node(i, contexts[i], started + offsets[i])) for i in range(len(nodes))]
        tasks.append(asyncio.create_task(fleet.watch_loop()))
        conn.send({"contexts_mb": fleet.context_mb, "rss_mb": rss_mb()})
        while True:
            command, *args = await asyncio.to_thread(conn.recv)
            if command == "progress":
                conn.send({"connected": fleet.connected, "first_exchange": fleet.first_exchange,
                           "errors": dict(fleet.errors), "rss_mb": rss_mb()})  # fmt: skip
            elif command == "stats":
                conn.send(fleet.stats(*args))
            elif command == "mark":
                fleet.deploy_etags = list(fleet.etags)
                fleet.deploy_seen = {}
                fleet.deploy_mark = time.monotonic()
                conn.send(None)
            elif command == "seen":
                conn.send(list(fleet.deploy_seen.values()))
            elif command == "stop":
                for task in tasks:
                    task.cancel()
                conn.send(None)
                return

    asyncio.run(main())


# --- the coordinator ----------------------------------------------------------------------------------------------


def enroll_all(fleet: LocalFleet, root: Path, count: int, urls: list[str], workers: int) -> list[SimNode]:
    """N tokens (each bound to the bench labels) and N enrollments, each with its own P-256 key and CSR."""
    with httpx.Client(base_url=fleet.server_url, verify=str(fleet.ca_path), timeout=60) as admin:
        auth = {"authorization": f"Bearer {fleet.admin_token}"}

        def one(i: int) -> SimNode:
            token = admin.post(
                "/v1/enrollment-tokens", json={"ttl_seconds": 3600, "labels": LABELS, "tier": "device"}, headers=auth
            )
            token.raise_for_status()
            folder = root / "nodes" / f"n{i}"
            folder.mkdir(parents=True)
            csr = make_csr(folder / "node.key", f"n{i}").decode()
            enrolled = admin.post(
                "/v1/enroll",
                json={"token": token.json()["token"], "name": f"n{i}", "tier": "device", "labels": LABELS,
                      "profile": PROFILE, "csr": csr},
            )  # fmt: skip
            enrolled.raise_for_status()
            (folder / "node.pem").write_text(enrolled.json()["certificate"])
            return SimNode(enrolled.json()["node_id"], str(folder), urls[i % len(urls)])

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, range(count)))


def packages(root: Path) -> list[Path]:
    train_digits(root / "digits.onnx")
    tars = []
    for version in ("1", "2"):
        folder = root / f"pkg-{version}"
        package = build_package(root / "digits.onnx", folder, name="digits", version=version, profile=PROFILE)
        pack_tar(package, root / f"digits-{version}.tar")
        tars.append(root / f"digits-{version}.tar")
    return tars


def server_cpu(pids: list[int]) -> float:
    return sum(proc_cpu_s(pid) for pid in pids)


def run(args: argparse.Namespace) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers
    report: dict[str, Any] = {"benchmark": "fleet_load", "nodes": args.nodes, "heartbeat_s": args.heartbeat,
                              "replicas": args.replicas, "status": args.status, "apply_s": args.apply,
                              "db": "sqlite (default)" if not args.db else "url given",
                              "load_processes": args.load_processes, "fd_limit": hard}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="strata-fleet-load-") as tmp, LocalFleet(Path(tmp) / "fleet") as fleet:
        root = Path(tmp)
        tars = packages(root)
        db_args = ["--db", args.db] if args.db else []
        fleet.start_server(extra_args=["--log-level", "warning", *db_args])
        servers: list[ManagedProcess] = [fleet.server] if fleet.server else []
        urls = [fleet.server_url]
        for r in range(1, args.replicas):
            # started through the fleet, so that it is stopped with it (a replica started by hand outlived the run)
            replica = fleet.start_replica(f"r{r}", extra_args=["--log-level", "warning", *db_args])
            servers.append(replica.process)
            urls.append(replica.url)
        pids = [s.pid for s in servers]
        token, ca = fleet.admin_token, fleet.ca_path

        fleet.client.push_package(tars[0])
        fleet.client.push_package(tars[1])
        fleet.client.deploy("digits", "1", LABELS)

        started = time.monotonic()
        nodes = enroll_all(fleet, root, args.nodes, urls, args.enroll_workers)
        enroll_s = time.monotonic() - started
        report["enrollment"] = {"seconds": round(enroll_s, 1), "per_node_ms": round(enroll_s / args.nodes * 1000, 2),
                                "workers": args.enroll_workers}  # fmt: skip

        # Idle baseline, and what one /metrics scrape costs the database (subtracted below).
        time.sleep(2)
        first = scrape_statements(urls[0], token, ca)
        second = scrape_statements(urls[0], token, ca)
        # ...scraped once from each replica per measurement; each replica counts its own statements.
        scrape_cost = (sum(minus(second, first).values()) - minus(second, first)["commits"]) * len(urls)
        cpu0, t0 = server_cpu(pids), time.monotonic()
        time.sleep(args.idle)
        idle_rate = (server_cpu(pids) - cpu0) / (time.monotonic() - t0)
        report["idle_server_cpu_cores"] = round(idle_rate, 4)

        # The fleet.
        per_process = [nodes[i :: args.load_processes] for i in range(args.load_processes)]
        pipes, loaders = [], []
        for chunk in per_process:
            ours, theirs = mp.Pipe()
            process = mp.Process(  # daemon: a coordinator that fails does not wait on them
                daemon=True,
                target=load_process,
                args=(chunk, str(ca), args.heartbeat, args.ramp, args.status == "every", args.apply, theirs),
            )
            process.start()
            pipes.append(ours)
            loaders.append(process)
        hello = [pipe.recv() for pipe in pipes]
        report["loadgen_memory"] = {
            "ssl_contexts_mb": round(sum(h["contexts_mb"] for h in hello), 1),
            "per_context_kb": round(sum(h["contexts_mb"] for h in hello) * 1024 / args.nodes, 1),
        }
        ramp_start = time.monotonic()
        ramp_cpu = server_cpu(pids)

        def ask(command: str, *rest: Any) -> list[Any]:
            for pipe in pipes:
                pipe.send((command, *rest))
            return [pipe.recv() for pipe in pipes]

        deadline = ramp_start + args.ramp + 600
        while time.monotonic() < deadline:
            progress = ask("progress")
            if sum(p["first_exchange"] for p in progress) >= args.nodes:
                break
            time.sleep(1)
        ramp_s = time.monotonic() - ramp_start
        ramp_errors = _merge([p["errors"] for p in progress])
        report["ramp"] = {"planned_s": round(args.ramp, 1), "seconds": round(ramp_s, 1),
                          "first_exchanges": sum(p["first_exchange"] for p in progress),
                          "server_cpu_s": round(server_cpu(pids) - ramp_cpu, 1), "errors": ramp_errors,
                          "note": "TLS handshakes (retried if refused), first fetches; before the window"}  # fmt: skip
        if report["ramp"]["first_exchanges"] < args.nodes:
            report["ramp"]["incomplete"] = "not every node connected: the window below is not a steady fleet"
        time.sleep(max(0.0, ramp_start + args.ramp - time.monotonic()) + args.heartbeat)  # every phase settled

        # Steady window.
        before = _try_scrape(urls, token, ca)
        w0, load0 = time.monotonic(), round(os.getloadavg()[0], 2)
        s0, l0 = server_cpu(pids), server_cpu([p.pid for p in loaders if p.pid])
        spies = [
            subprocess.Popen(["py-spy", "record", "--nonblocking", "--pid", str(pid), "--duration",
                              str(int(args.window)), "--format", "raw", "--output", f"{args.py_spy}-{pid}.txt"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for pid in (pids if args.py_spy else [])
        ]  # fmt: skip
        time.sleep(args.window)
        s1, l1 = server_cpu(pids), server_cpu([p.pid for p in loaders if p.pid])
        w1 = time.monotonic()
        after = _try_scrape(urls, token, ca)
        for spy in spies:
            spy.wait(30)
        window = w1 - w0
        stats = ask("stats", w0, w1)
        latency = [v for s in stats for v in s["status_latency"]]
        overshoot = [v for s in stats for v in s["poll_overshoot"]]
        lag = [v for s in stats for v in s["loop_lag"]]
        heartbeats = sum(s["heartbeats"] for s in stats)
        due = args.nodes * window / args.heartbeat
        server_s = s1 - s0
        net_s = server_s - idle_rate * window
        # Per heartbeat actually served (a server that fell behind served fewer than were due), scaled to a node
        # that heartbeats every 15 s: 240 heartbeats per node-hour.
        per_heartbeat, per_heartbeat_net = server_s / max(heartbeats, 1), net_s / max(heartbeats, 1)
        report["steady"] = {
            "window_s": round(window, 1),
            "server_cpu_s": round(server_s, 2),
            "server_cpu_cores": round(server_s / window, 3),
            "server_cpu_s_per_node_hour": round(per_heartbeat * 240, 4),
            "server_cpu_s_per_node_hour_net_of_idle": round(per_heartbeat_net * 240, 4),
            "nodes_per_core_at_15s": round(15 / max(per_heartbeat, 1e-9)),
            "nodes_per_core_at_15s_net_of_idle": round(15 / max(per_heartbeat_net, 1e-9)),
            "server_cpu_ms_per_heartbeat": round(per_heartbeat * 1000, 3),
            "heartbeats_done": heartbeats,
            "heartbeats_due": round(due),
            "status_put_ms": {"p50": ms(percentile(latency, 50)), "p99": ms(percentile(latency, 99)),
                              "max": ms(max(latency, default=None))},
            "long_poll_overshoot_ms": {"p50": ms(percentile(overshoot, 50)), "p99": ms(percentile(overshoot, 99)),
                                       "note": "a 304 came back this long after its 15 s wait"},
            "loadgen_cpu_s": round(l1 - l0, 2),
            "loadgen_cpu_cores": round((l1 - l0) / window, 3),
            "loadgen_loop_lag_ms": {"p50": ms(percentile(lag, 50)), "p99": ms(percentile(lag, 99)),
                                    "max": ms(max(lag, default=None))},
            "errors_in_window": minus_counts(_merge([s["errors"] for s in stats]), ramp_errors),
            "connected": sum(s["connected"] for s in stats),
            "machine_load_average_1m": [load0, round(os.getloadavg()[0], 2)],
        }  # fmt: skip
        if before is not None and after is not None:
            delta = minus(after, before)
            statements = sum(v for k, v in delta.items() if k != "commits") - scrape_cost
            report["steady"]["db"] = {
                "statements": round(statements),
                "statements_per_heartbeat": round(statements / max(heartbeats, 1), 3),
                "by_verb": {k: round(v) for k, v in delta.items() if k != "commits"},
                "commits": round(delta["commits"]),
                "commits_per_heartbeat": round(delta["commits"] / max(heartbeats, 1), 4),
                "scrape_cost_subtracted": round(scrape_cost),
            }

        # Deploy a new version to the whole fleet.
        ask("mark")
        spies = [
            subprocess.Popen(["py-spy", "record", "--nonblocking", "--pid", str(pid), "--format", "raw",
                              "--output", f"{args.py_spy}-deploy-{pid}.txt"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for pid in (pids if args.py_spy else [])
        ]  # fmt: skip
        time.sleep(1 if spies else 0)  # py-spy attached
        c0 = server_cpu(pids)
        d0 = time.monotonic()
        response = httpx.post(f"{urls[0]}/v1/deployments", json={"model": "digits", "version": "2", "selector": LABELS},
                              headers={"authorization": f"Bearer {token}"}, verify=str(ca), timeout=60)  # fmt: skip
        answered = time.monotonic() - d0
        response.raise_for_status()
        seen: list[float] = []
        while time.monotonic() < d0 + args.deploy_timeout:
            seen = [t for chunk in ask("seen") for t in chunk]
            if len(seen) >= args.nodes:
                break
            time.sleep(0.2)
        deploy_cpu = server_cpu(pids) - c0
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        deploy_wall = time.monotonic() - d0
        times = sorted(t - d0 for t in seen)

        def reached(fraction: float) -> float | None:
            need = math.ceil(fraction * args.nodes)
            return round(times[need - 1], 3) if len(times) >= need else None

        report["deploy"] = {
            "post_answered_s": round(answered, 3),
            "to_50pct_s": reached(0.5),
            "to_99pct_s": reached(0.99),
            "to_100pct_s": reached(1.0),
            "nodes_reached": len(times),
            "server_cpu_s": round(deploy_cpu, 2),
            "wall_s": round(deploy_wall, 2),
        }
        ask("stop")
        for process in loaders:
            process.join(10)
        report["server_rss_mb"] = round(sum(rss_mb(pid) for pid in pids), 1)
        report["targets"] = {
            "nodes_per_core_at_15s": ">= 10000",
            "met_nodes_per_core": report["steady"]["nodes_per_core_at_15s"] >= 10000,
            "deploy_99pct_of_10000_within_s": 5,
            "met_deploy": (reached(0.99) or math.inf) <= 5 if args.nodes >= 10000 else "n/a below 10000 nodes",
        }
    return report


def _try_scrape(urls: list[str], token: str, ca: Path) -> dict[str, float] | None:
    """The database counters summed over the replicas, or None when an overloaded one does not answer in time."""
    total: dict[str, float] = {}
    try:
        for url in urls:
            for key, value in scrape_statements(url, token, ca).items():
                total[key] = total.get(key, 0.0) + value
        return total
    except httpx.HTTPError as exc:
        print(f"/metrics scrape failed: {exc!r}", file=sys.stderr)
        return None


def minus_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {key: a[key] - b.get(key, 0) for key in a if a[key] - b.get(key, 0)}


def _merge(dicts: list[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--heartbeat", type=float, default=15.0, help="long-poll wait, seconds")
    parser.add_argument("--window", type=float, default=60.0, help="steady measurement window, seconds")
    parser.add_argument("--idle", type=float, default=15.0, help="idle-baseline window, seconds")
    parser.add_argument(
        "--ramp", type=float, default=None, help="spread node starts over this (default: max(hb, N/80))"
    )
    parser.add_argument("--db", default=None, help="database URL passed to every `strata server` (default SQLite)")
    parser.add_argument("--postgres", action="store_true",
                        help="start a throwaway PostgreSQL cluster (Debian's binaries, strata.testing.postgres) and "
                             "use it as --db")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=1, help="server processes; nodes spread round-robin")
    parser.add_argument("--status", choices=("every", "changed"), default="every",
                        help="PUT status on every heartbeat, or only when it changed (as the agent does)")  # fmt: skip
    parser.add_argument("--apply", type=float, default=0.0,
                        help="after a new desired state, wait 0.5-1.5x this many seconds (the agent downloading and "
                             "loading) before reporting and polling again; 0: at once (heaviest)")  # fmt: skip
    parser.add_argument("--load-processes", type=int, default=1)
    parser.add_argument("--enroll-workers", type=int, default=8)
    parser.add_argument("--deploy-timeout", type=float, default=60.0)
    parser.add_argument("--py-spy", default=None, help="profile each server over the window into PREFIX-PID.txt")
    args = parser.parse_args(argv)
    if args.ramp is None:
        # A node's first TLS handshake and full fetch cost the server ~10 ms of CPU: ~80 new nodes a second keeps
        # a shared core from refusing handshakes (measured; a faster ramp gets ConnectionAbortedError retries).
        args.ramp = max(args.heartbeat, args.nodes / 80)
    if args.postgres:
        from strata.testing.postgres import PostgresCluster

        with PostgresCluster.start() as cluster:
            args.db = cluster.create_database("strata")
            report = run(args)
            report["db"] = "postgresql (throwaway cluster, strata.testing.postgres)"
    else:
        report = run(args)
    print(json.dumps(report, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
