"""A soak run: a real fleet under steady load for many minutes, with new versions and control-plane outages, to
see what grows.

Starts a control plane and one agent (LocalFleet), deploys the digits classifier, and for `--minutes`:
- drives steady inference load (bench/loadgen.py in its own process: `--connections` keep-alive connections
  capped at `--rate` requests a second, JSON answers counted by the `model_version` that answered them);
- deploys and activates a new version every `--deploy-every` seconds (a real new package: digits trained with
  another seed);
- stops the control plane every `--outage-every` seconds for `--outage` seconds and starts it again on the same
  port and data (the agent keeps serving; its telemetry waits in its buffer);
- samples every `--sample-every` seconds the agent's and the control plane's resident memory, open fds and
  threads (/proc), the agent's telemetry buffer (file, WAL, rows waiting by table from /metrics), its data
  folder (bytes, packages kept, download files), the number of series in its /metrics, and the control plane's
  data folder.
At the end it waits for the agent's buffer to drain and checks telemetry is exactly once: the requests the load
generator saw answered, per version, against what the control plane's telemetry API reports for the node.
Growth: a least-squares line through each series over the second half of the run, per hour; the control plane's
series are fitted within each of its incarnations (a restart starts a new process), pooled.

    python bench/soak.py [--minutes 10] [--rate 200] [--connections 8]

Prints one JSON object. Not part of `make bench` (it is long).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from strata.core.package import pack_tar
from strata.examples.digits import load_data, train_digits
from strata.localfleet import LocalFleet
from strata.package_build import build_package

BENCH_DIR = Path(__file__).resolve().parent
NODE = "soak"


# --- reading processes and folders -----------------------------------------------------------------------


def process_sample(pid: int) -> dict[str, float]:
    """Resident MB, open fds and threads of a live process."""
    status = dict(re.findall(r"^(VmRSS|Threads):\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_mb": round(int(status["VmRSS"]) / 1024, 2), "fds": fds, "threads": int(status["Threads"])}


def children(pid: int) -> int:
    """How many processes `pid` has started that are alive now."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += len((task / "children").read_text().split())
        except OSError:
            continue
    return total


def tree_size(root: Path) -> tuple[int, int]:
    """Bytes and files under `root` (files that vanish while it is walked are skipped)."""
    size = files = 0
    for path in root.rglob("*"):
        try:
            if path.is_file():
                size += path.stat().st_size
                files += 1
        except OSError:
            continue
    return size, files


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def metrics_sample(url: str) -> dict[str, float]:
    """From the agent's /metrics: how many series it has, the versions they name, and the telemetry buffer's rows."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    out: dict[str, float] = {
        "metrics_series": len(lines),
        "metrics_versions": len(set(re.findall(r'version="([^"]*)"', "\n".join(lines)))),
    }
    for line in lines:
        name, _, value = line.rpartition(" ")
        found = re.fullmatch(r'strata_telemetry_buffer_rows\{table="(\w+)"\}', name)
        if found:
            out[f"telemetry_rows_{found.group(1)}"] = float(value)
        elif name == "strata_telemetry_bytes_pending":
            out["telemetry_bytes_pending"] = float(value)
    return out


# --- fitting ---------------------------------------------------------------------------------------------


def slope_per_hour(points: list[tuple[float, float, int]]) -> float | None:
    """Least-squares slope (per hour) of (t seconds, value, group) points, fitted within each group and pooled:
    a control plane restarted mid-run is a new process whose memory starts afresh, not a drop."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for t, value, group in points:
        groups.setdefault(group, []).append((t, value))
    num = den = 0.0
    for members in groups.values():
        if len(members) < 2:
            continue
        mean_t = sum(t for t, _ in members) / len(members)
        mean_v = sum(v for _, v in members) / len(members)
        num += sum((t - mean_t) * (v - mean_v) for t, v in members)
        den += sum((t - mean_t) ** 2 for t, _ in members)
    return round(num / den * 3600, 3) if den else None


# --- the run ---------------------------------------------------------------------------------------------


@dataclass(eq=False)  # a thread is hashed by identity
class Sampler(threading.Thread):
    """Samples the fleet every `interval` seconds until stopped."""

    fleet: LocalFleet
    interval: float
    start_time: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    incarnation: int = 0  # the control plane's: bumped at each restart
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        super().__init__(daemon=True)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.samples.append(self.sample())

    def sample(self) -> dict[str, Any]:
        agent = self.fleet.agents[NODE]
        data = agent.data_dir
        row: dict[str, Any] = {"t": round(time.monotonic() - self.start_time, 1), "incarnation": self.incarnation}
        row.update({f"agent_{k}": v for k, v in process_sample(agent.process.pid).items()})
        row["agent_children"] = children(agent.process.pid)
        row["agent_telemetry_db_bytes"] = file_size(data / "telemetry.db")
        row["agent_telemetry_wal_bytes"] = file_size(data / "telemetry.db-wal")
        row["agent_data_bytes"], row["agent_data_files"] = tree_size(data)
        packages = data / "packages"
        row["agent_packages"] = len(list(packages.iterdir())) if packages.exists() else 0
        row["agent_download_files"] = tree_size(data / "downloads")[1]
        with contextlib.suppress(httpx.HTTPError):
            row.update({f"agent_{k}": v for k, v in metrics_sample(agent.serve_url).items()})
        server = self.fleet.server
        if server is not None and server.running:
            with contextlib.suppress(OSError):  # stopped meanwhile
                row.update({f"server_{k}": v for k, v in process_sample(server.pid).items()})
        row["server_data_bytes"] = tree_size(self.fleet.server_dir)[0]
        return row


def build_versions(root: Path, count: int) -> list[Path]:
    """`count` real versions of digits (each trained with its own seed, with drift references from its training
    data), packed; version i is at index i-1."""
    tars = []
    sample = {"X": load_data().train_x}
    for version in range(1, count + 1):
        onnx = root / f"digits-{version}.onnx"
        train_digits(onnx, seed=version)
        package = build_package(onnx, root / f"pkg-{version}", name="digits", version=str(version), sample=sample)
        pack_tar(package, root / f"digits-{version}.tar")
        tars.append(root / f"digits-{version}.tar")
    return tars


def request_file(root: Path, port: int) -> Path:
    """One inference request on a held-out digit, as loadgen sends it (JSON in, JSON out)."""
    row = [float(x) for x in load_data().test_x[0]]
    body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": row}]}).encode()
    head = f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    path = root / "request.bin"
    path.write_bytes(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return path


def telemetry_by_version(fleet: LocalFleet, since_s: float) -> dict[str, int]:
    answer = fleet.client.telemetry("digits", node=NODE, since_s=since_s)
    return {row["version"]: int(row["requests"]) for row in answer["nodes"]}


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(2)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rate", type=float, default=200.0, help="requests a second, all connections together")
    parser.add_argument("--deploy-every", type=float, default=120.0, help="seconds between new versions")
    parser.add_argument("--outage-every", type=float, default=180.0, help="seconds between control-plane stops")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the control plane stays down")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--keep", type=Path, default=None, help="run in this folder and leave it (logs, databases)")
    args = parser.parse_args()
    duration = args.minutes * 60

    with tempfile.TemporaryDirectory(prefix="strata-soak-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        deploys = list(range(int(args.deploy_every), int(duration) - 30, int(args.deploy_every)))
        outages = list(range(int(args.outage_every), int(duration - args.outage - 10), int(args.outage_every)))
        tars = build_versions(root, len(deploys) + 1)
        with LocalFleet(root / "fleet", poll_wait_s=30) as fleet:
            fleet.start_server()
            agent = fleet.start_agent(NODE, tier="near-edge")
            fleet.client.push_package(tars[0])
            fleet.client.deploy("digits", "1", {})
            fleet.wait_for_versions({NODE: {"digits": "1"}}, timeout=120)

            argv = [sys.executable, str(BENCH_DIR / "loadgen.py"), str(request_file(root, agent.serve_port))]
            argv += ["--port", str(agent.serve_port), "--connections", str(args.connections), "--warmup", "0"]
            argv += ["--duration", str(duration), "--rate", str(args.rate), "--by-version"]
            start = time.monotonic()
            load = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            sampler = Sampler(fleet, args.sample_every, start)
            sampler.samples.append(sampler.sample())
            sampler.start()

            timeline: list[dict[str, Any]] = []
            events = sorted([(t, 0, "deploy") for t in deploys] + [(t, 1, "outage") for t in outages])
            version = 1
            for due, _, kind in events:
                time.sleep(max(0.0, due - (time.monotonic() - start)))
                began = time.monotonic() - start
                if kind == "deploy":
                    version += 1
                    fleet.client.push_package(tars[version - 1])
                    fleet.client.deploy("digits", str(version), {})
                    fleet.wait_for_versions({NODE: {"digits": str(version)}}, timeout=120)
                    took = round(time.monotonic() - start - began, 1)
                    timeline.append({"t": round(began), "deployed": version, "active_after_s": took})
                else:
                    fleet.stop_server()
                    time.sleep(args.outage)
                    sampler.incarnation += 1
                    fleet.start_server()
                    took = round(time.monotonic() - start - began, 1)
                    timeline.append({"t": round(began), "control_plane_down_s": took})
            out, _ = load.communicate(timeout=duration + 120)
            loaded: dict[str, Any] = json.loads(out)
            sampler.done.set()
            sampler.join()

            # exactly once: wait for the buffer to drain and the control plane to count every answered request
            answered = {v: n for v, n in loaded.get("by_version", {}).items() if not v.startswith("status ")}
            since = duration + 600
            counted: dict[str, int] = {}

            def drained() -> bool:
                nonlocal counted
                counted = telemetry_by_version(fleet, since)
                return counted == answered

            drain_start = time.monotonic()
            exact = wait_until(drained, 180)
            drain_s = round(time.monotonic() - drain_start, 1)
            final = sampler.sample()

    samples = sampler.samples
    half = duration / 2
    series = sorted({key for row in samples for key in row if key not in ("t", "incarnation")})
    growth = {}
    for key in series:
        points = [(row["t"], float(row[key]), row["incarnation"] if key.startswith("server_") else 0)
                  for row in samples if key in row and row["t"] >= half]  # fmt: skip
        first = next((row[key] for row in samples if key in row), None)
        last = next((row[key] for row in reversed(samples) if key in row), None)
        growth[key] = {"first": first, "last": last, "per_hour_second_half": slope_per_hour(points)}
    incarnations: dict[int, list[dict[str, Any]]] = {}
    for row in samples:
        if "server_rss_mb" in row:
            incarnations.setdefault(row["incarnation"], []).append(row)
    # the control plane restarted: does each of its processes start and end where the one before did?
    per_incarnation = [
        {"from_t": rows[0]["t"], "to_t": rows[-1]["t"]}
        | {f"{key}_first_last": [rows[0][f"server_{key}"], rows[-1][f"server_{key}"]] for key in ("rss_mb", "fds")}
        for rows in incarnations.values()
    ]
    result = {
        "benchmark": "soak",
        "minutes": args.minutes,
        "connections": args.connections,
        "rate_cap": args.rate,
        "load": {k: v for k, v in loaded.items() if k != "client_pid"},
        "timeline": timeline,
        "telemetry_exactly_once": exact,
        "answered_by_version": answered,
        "telemetry_by_version": counted,
        "drain_s": drain_s,
        "after_drain": {k: final[k] for k in sorted(final) if k.startswith("agent_telemetry") or k == "agent_packages"},
        "samples": len(samples),
        "growth": growth,
        "control_plane_incarnations": per_incarnation,
        "agent_rss_mb_series": [[row["t"], row["agent_rss_mb"]] for row in samples[:: max(1, len(samples) // 20)]],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
