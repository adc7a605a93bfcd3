"""What placement policies cost the agent: resident memory with each kind of policy, and the CEL child process.

Starts a real control plane and agent (LocalFleet), and deploys the digits classifier three times over: without a
policy, with built-in constraints only (`allowed_regions`, evaluated in the agent with no import), and with a CEL
rule (evaluated in a child process `python -m strata.core.policy`, so cel-python never joins the agent). After each
activation it sends requests, lets the agent idle and reads its VmRSS. Then it times the child evaluator alone and
reads its peak RSS, and, for comparison, what importing cel-python in-process would have added. Prints JSON.

Each activation leaves the agent a little larger (heap that glibc keeps), policy or not: compare the three RSS
figures with a run of the same three deploys without policies, not with each other.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from strata.core.package import pack_tar
from strata.examples.digits import train_digits
from strata.localfleet import LocalFleet
from strata.package_build import build_package

IDLE_SECONDS = 5.0
BUDGET_MB = 70.0
POLICIES = {
    "none": {},
    "builtin": {"data_class": "personal", "allowed_regions": ["eu-*"]},
    "cel": {"rules": [{"name": "eu-devices", "allow": 'node.region.startsWith("eu-") && node.tier == "device"'}]},
}
CHILD = """
import json, resource, subprocess, sys, time
request = json.dumps({"policy": %s, "model": {"name": "digits", "version": "3"},
    "node": {"name": "edge", "tier": "device", "profile": "cpu-generic", "labels": {"region": "eu-west"}}})
started = time.perf_counter()
out = subprocess.run([sys.executable, "-m", "strata.core.policy"], input=request, capture_output=True, text=True)
elapsed = time.perf_counter() - started
print(json.dumps({"seconds": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "answer": json.loads(out.stdout)}))
"""
IN_PROCESS = """
import re
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
import numpy, onnxruntime
before = rss()
from strata.core.policy import Policy, ModelFacts, NodeFacts, evaluate
node = NodeFacts.of("edge", "device", "cpu-generic", {"region": "eu-west"})
evaluate(Policy.from_json(%s), ModelFacts("digits", "3"), node)
print(rss() - before)
"""


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


def main() -> None:
    results: dict[str, object] = {"benchmark": "policy_footprint", "budget_mb": BUDGET_MB}
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        root = Path(tmp)
        train_digits(root / "digits.onnx")
        with LocalFleet(root / "fleet", poll_wait_s=2) as fleet:
            fleet.start_server()
            agent = fleet.start_agent("edge", labels={"region": "eu-west"})
            body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
            for version, (kind, policy) in enumerate(POLICIES.items(), start=1):
                package = build_package(
                    root / "digits.onnx", root / f"pkg{version}", name="digits", version=str(version), policy=policy
                )
                pack_tar(package, root / f"digits{version}.tar")
                fleet.client.push_package(root / f"digits{version}.tar")
                fleet.client.deploy("digits", str(version), {})
                started = time.perf_counter()
                fleet.wait_for_versions({"edge": {"digits": str(version)}})
                activation_s = time.perf_counter() - started
                for _ in range(50):
                    httpx.post(f"{agent.serve_url}/v2/models/digits/infer", json=body).raise_for_status()
                time.sleep(IDLE_SECONDS)
                results[f"agent_rss_mb_policy_{kind}"] = round(rss_mb(agent.process.pid), 1)
                results[f"deploy_to_active_s_policy_{kind}"] = round(activation_s, 2)
    child = json.loads(subprocess.check_output([sys.executable, "-c", CHILD % json.dumps(POLICIES["cel"])]))
    results["cel_child_seconds"] = round(child["seconds"], 3)
    results["cel_child_peak_rss_mb"] = round(child["peak_rss_mb"], 1)
    results["cel_child_allowed"] = child["answer"]["allowed"]
    added = float(subprocess.check_output([sys.executable, "-c", IN_PROCESS % json.dumps(POLICIES["cel"])]))
    results["cel_in_process_would_add_mb"] = round(added, 1)
    results["within_budget"] = all(
        value < BUDGET_MB
        for key, value in results.items()
        if key.startswith("agent_rss_mb") and isinstance(value, float)
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
