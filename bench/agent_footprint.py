"""Resident memory of an idle agent serving a small model, against python + onnxruntime alone.

Starts a real control plane and a real agent (LocalFleet), deploys the digits classifier, sends a few
requests, lets the agent idle, then reads VmRSS (its anonymous/file split, and PSS, which shares library pages
with other processes fairly) from /proc. Idle means steady: the agent is read every half second for
`--idle-seconds` (default 75), long enough for its telemetry uploads (every 10 s), the end of the model's one-minute
probation and the status report after it, each of which touches memory the first minutes of serving had not; the
figure is the last reading, beside the largest in the window and the reading 5 s in (what this benchmark reported
before it waited: about 1.5 MB less, the first telemetry upload not yet run). The agent runs as
`python -OO -m strata.agent` (docstrings stripped); its bytecode is compiled first, as on a node where it has run
once. The baseline, measured in the same run: a bare python process that imports onnxruntime and loads the same
model. Both are read by mapping too (a library, the heap, unnamed memory), and the difference says where the
agent's memory over the baseline's is.
The process tree is measured too: the agent with the helper children it runs (the vault worker, which stays about a
minute after its last use; the short-lived signing and verification children), at idle and at its peak, sampled
every 20 ms from the deployment until the idle reading.
`--signed`: the control plane has a release key and the package is signed, so the agent pinned the key and
verified the package (TUF metadata and model-signing bundle, in its child process) before serving it.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from strata.core.package import pack_tar
from strata.examples.digits import train_digits
from strata.localfleet import LocalFleet
from strata.package_build import build_package

IDLE_SECONDS = 75.0
EARLY_SECONDS = 5.0
BUDGET_MB = 70.0


def mapping_rss(pid: int) -> dict[str, float]:
    """Resident MB by what is mapped: a library's file name, `[heap]`, or `anon` for unnamed memory."""
    sizes: dict[str, int] = {}
    name = "anon"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=5)
        if "-" in first[0] and ":" not in first[0]:  # a mapping's header: address range, perms, ..., path
            name = first[5].rsplit("/", 1)[-1] if len(first) > 5 else "anon"
        elif first[0] == "Rss:":
            sizes[name] = sizes.get(name, 0) + int(first[1])
    return {key: kb / 1024 for key, kb in sizes.items()}


def largest(sizes: dict[str, float], count: int = 15) -> dict[str, float]:
    """The `count` largest entries by size (by magnitude, for differences), rounded to 0.1 MB, tiny ones left out."""
    ordered = sorted(sizes.items(), key=lambda item: abs(item[1]), reverse=True)[:count]
    return {key: round(size, 1) for key, size in ordered if abs(size) >= 0.05}


def rss(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    found = dict(re.findall(r"^(VmRSS|RssAnon|RssFile):\s+(\d+) kB", status, re.M))
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    found.update(re.findall(r"^(Pss):\s+(\d+) kB", rollup, re.M))
    return {key: int(value) / 1024 for key, value in found.items()}


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _name(pid: int) -> str:
    """A helper child's name: the module it runs (`python -m MODULE`), else its command."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    return argv[argv.index("-m") + 1] if "-m" in argv[:-1] else Path(argv[0]).name


def tree_rss(pid: int) -> dict[str, float]:
    """Resident MB of `pid` (as "agent") and of each process below it (by name; a repeated name gets `#n`)."""
    sizes = {"agent": rss(pid)["VmRSS"]}
    pending = _children(pid)
    while pending:
        child = pending.pop()
        try:
            name, size = _name(child), rss(child)["VmRSS"]
        except (OSError, KeyError, ValueError):  # exited while being read
            continue
        key, n = name, 1
        while key in sizes:
            n += 1
            key = f"{name}#{n}"
        sizes[key] = size
        pending += _children(child)
    return sizes


class TreePeak(threading.Thread):
    """Samples the agent's process tree until stopped; keeps the largest total and what it was made of."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak: dict[str, float] = {}
        self.largest: dict[str, float] = {}  # each helper's largest reading
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            try:
                sizes = tree_rss(self.pid)
            except (OSError, KeyError, ValueError):
                continue
            if sum(sizes.values()) > sum(self.peak.values()):
                self.peak = sizes
            for name, size in sizes.items():
                name = name.split("#")[0]
                self.largest[name] = max(size, self.largest.get(name, 0.0))


BASELINE = """
import sys, time, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
for _ in range(10): s.run(None, {"X": np.zeros((1, 64), np.float32)})
print("ready", flush=True); time.sleep(60)
"""


def main() -> None:
    import strata

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signed", action="store_true", help="a release key on the server, a signed package")
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS, help="how long the agent idles")
    args = parser.parse_args()
    signed, idle_s = args.signed, max(args.idle_seconds, EARLY_SECONDS)

    package_dir = Path(strata.__file__).parent
    subprocess.run([sys.executable, "-OO", "-m", "compileall", "-q", str(package_dir)], check=True)
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        root = Path(tmp)
        train_digits(root / "digits.onnx")
        package = build_package(root / "digits.onnx", root / "pkg", name="digits", version="1")
        signature, server_args = None, []
        if signed:
            from strata.trust.release import sign_release
            from strata.trust.signing import create_release_key

            private_key, public_key = create_release_key(root / "keys")
            signature = sign_release(package.path, private_key, time.time(), 86400).to_base64()
            server_args = ["--release-key", str(public_key)]
        pack_tar(package, root / "digits.tar")
        with LocalFleet(root / "fleet", poll_wait_s=30) as fleet:
            fleet.start_server(extra_args=server_args)
            agent = fleet.start_agent("edge")
            sampler = TreePeak(agent.process.pid)
            sampler.start()
            fleet.client.push_package(root / "digits.tar", signature=signature)
            fleet.client.deploy("digits", "1", {})
            fleet.wait_for_versions({"edge": {"digits": "1"}})
            body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
            for _ in range(50):
                httpx.post(f"{agent.serve_url}/v2/models/digits/infer", json=body).raise_for_status()
            idle_start, readings, early = time.monotonic(), [], None
            while (elapsed := time.monotonic() - idle_start) < idle_s:
                readings.append(rss(agent.process.pid)["VmRSS"])
                if early is None and elapsed >= EARLY_SECONDS:
                    early = readings[-1]
                time.sleep(0.5)
            agent_rss = rss(agent.process.pid)
            readings.append(agent_rss["VmRSS"])
            mappings = mapping_rss(agent.process.pid)
            idle_tree = tree_rss(agent.process.pid)
            sampler.done.set()
            sampler.join()

            baseline = subprocess.Popen(
                [sys.executable, "-c", BASELINE, str(root / "digits.onnx")], stdout=subprocess.PIPE, text=True
            )
            assert baseline.stdout is not None
            baseline.stdout.readline()
            time.sleep(1.0)
            baseline_rss, baseline_mappings = rss(baseline.pid), mapping_rss(baseline.pid)
            baseline.kill()
    over = {name: mappings.get(name, 0.0) - baseline_mappings.get(name, 0.0) for name in mappings | baseline_mappings}
    result = {
        "benchmark": "agent_footprint",
        "signed": signed,
        "agent_rss_mb": round(agent_rss["VmRSS"], 1),
        "agent_rss_anon_mb": round(agent_rss["RssAnon"], 1),
        "agent_rss_file_mb": round(agent_rss["RssFile"], 1),
        "agent_pss_mb": round(agent_rss["Pss"], 1),
        "idle_seconds": idle_s,
        "agent_rss_idle_max_mb": round(max(readings), 1),
        "agent_rss_after_5s_idle_mb": round(early if early is not None else readings[-1], 1),
        "baseline_python_onnxruntime_session_rss_mb": round(baseline_rss["VmRSS"], 1),
        "agent_over_baseline_mb": round(agent_rss["VmRSS"] - baseline_rss["VmRSS"], 1),
        "ratio_to_baseline": round(agent_rss["VmRSS"] / baseline_rss["VmRSS"], 3),
        "budget_mb": BUDGET_MB,
        "within_budget": agent_rss["VmRSS"] < BUDGET_MB,
        "agent_largest_mappings_mb": largest(mappings),
        "agent_over_baseline_by_mapping_mb": largest(over),
        "tree_idle_rss_mb": round(sum(idle_tree.values()), 1),
        "tree_idle_processes_mb": {name: round(size, 1) for name, size in idle_tree.items()},
        "tree_peak_rss_mb": round(sum(sampler.peak.values()), 1),
        "tree_peak_processes_mb": {name: round(size, 1) for name, size in sampler.peak.items()},
        "largest_rss_by_process_mb": {name: round(size, 1) for name, size in sampler.largest.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
