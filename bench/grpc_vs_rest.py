"""gRPC against REST on one agent: throughput of the digits model over each protocol, in one run, and what gRPC costs
the agent in memory.

Starts a real control plane and one agent with `--grpc-port` (LocalFleet), deploys the digits classifier, then
drives the agent for `--duration` seconds over each protocol in turn with a closed-loop client in its own process:
REST with bench/loadgen.py (raw keep-alive HTTP/1.1, the binary tensor extension), gRPC with this file's
`--client` mode (grpc.aio, one channel, as many concurrent RPCs as REST has connections, a prebuilt serialized
ModelInferRequest with raw_input_contents). Both send the same batch-1 tensor and ask for the label only. Reported
per protocol: answered requests per second, latency percentiles, the agent's CPU cores over the window and its CPU
per request; `grpc_over_rest` is the ratio of the two throughputs. Memory: the agent's VmRSS before and after the
load, and, in a separate probe process, what importing strata's gRPC service (grpcio, protobuf, the message
classes) and starting its server add to a process that already holds numpy, onnxruntime and the REST server.

    PYTHONPATH=src python bench/grpc_vs_rest.py [--duration 5] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
METHOD = "/inference.GRPCInferenceService/ModelInfer"

PROBE = """
import asyncio, re, sys
from pathlib import Path
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
import numpy, onnxruntime
import strata.agent.main, strata.agent.oip_server
before = rss()
import strata.agent.oip_grpc as g
from strata.agent.oip_grpc_codec import message_class
message_class("ModelInferRequest")
imported = rss()
async def serve():
    server = g.GrpcInferenceServer(None, max_message_bytes=1 << 20, message_budget_bytes=8 << 20)
    await server.start("127.0.0.1:0")
    await asyncio.sleep(0.5)
    started = rss()
    await server.stop(0)
    return started
started = asyncio.run(serve())
print(before, imported, started)
"""


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return round(int(match.group(1)) / 1024, 1)


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the gRPC client (its own process) --------------------------------------------------------------------


async def grpc_client(address: str, request: bytes, concurrency: int, warmup: float, duration: float) -> dict[str, Any]:
    import grpc.aio

    now = time.perf_counter()
    start, end = now + warmup, now + warmup + duration
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

        async def loop() -> None:
            while (sent := time.perf_counter()) < end:
                try:
                    await call(request)
                    status = "OK"
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name
                if sent >= start:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == "OK":
                        latencies.append(time.perf_counter() - sent)

        await asyncio.sleep(0)
        cpu_start = None

        async def measure() -> float:
            await asyncio.sleep(max(0.0, start - time.perf_counter()))
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return usage.ru_utime + usage.ru_stime

        cpu_task = asyncio.create_task(measure())
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        cpu_start = await cpu_task
    usage = resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] * 1000, 2) if latencies else 0

    return {
        "requests": sum(statuses.values()),
        "statuses": statuses,
        "rps": round(statuses.get("OK", 0) / duration, 1),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "client_cpu_share_of_one_core": round((usage.ru_utime + usage.ru_stime - cpu_start) / duration, 3),
    }


# --- the run ------------------------------------------------------------------------------------------------


def drive(argv: list[str], agent_pid: int, warmup: float, duration: float) -> dict[str, Any]:
    """Run a load generator process; add the agent's CPU over its measured window."""
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    time.sleep(warmup)
    cpu_start = process_cpu_s(agent_pid)
    time.sleep(duration)
    cpu = process_cpu_s(agent_pid) - cpu_start
    out, _ = client.communicate(timeout=duration + 60)
    result: dict[str, Any] = json.loads(out)
    result.pop("client_pid", None)
    result["agent_cpu_cores"] = round(cpu / duration, 2)
    result["agent_cpu_us_per_request"] = round(cpu / max(result["rps"] * duration, 1) * 1e6, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--client", nargs=2, metavar=("ADDRESS", "REQUEST_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        address, request_file = args.client
        request = Path(request_file).read_bytes()
        result = asyncio.run(grpc_client(address, request, args.concurrency, args.warmup, args.duration))
        print(json.dumps(result))
        return

    from strata.agent.oip_grpc_codec import message_class
    from strata.core.oip import encode_request
    from strata.core.package import pack_tar
    from strata.examples.digits import load_data, train_digits
    from strata.localfleet import LocalFleet, free_port
    from strata.package_build import build_package

    x = load_data().test_x[:1].astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        root = Path(tmp)
        train_digits(root / "digits.onnx")
        package = build_package(root / "digits.onnx", root / "pkg", name="digits", version="1")
        pack_tar(package, root / "digits.tar")
        with LocalFleet(root / "fleet", poll_wait_s=30) as fleet:
            fleet.start_server()
            grpc_port = free_port()
            agent = fleet.start_agent("edge", extra_args=["--grpc-port", str(grpc_port)])
            fleet.client.push_package(root / "digits.tar")
            fleet.client.deploy("digits", "1", {})
            fleet.wait_for_versions({"edge": {"digits": "1"}})
            pid = agent.process.pid
            idle_rss = rss_mb(pid)

            body, length = encode_request({"X": x}, outputs=["label"])
            head = (
                f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1:{agent.serve_port}\r\n"
                f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {length}\r\n\r\n"
            )
            (root / "rest.bin").write_bytes(head.encode() + body)
            message = message_class("ModelInferRequest")(model_name="digits")
            message.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
            message.outputs.add(name="label")
            message.raw_input_contents.append(x.tobytes())
            (root / "grpc.bin").write_bytes(message.SerializeToString())

            timing = ["--warmup", str(args.warmup), "--duration", str(args.duration)]
            rest_argv = [sys.executable, str(BENCH_DIR / "loadgen.py"), str(root / "rest.bin")]
            rest_argv += ["--port", str(agent.serve_port), "--connections", str(args.concurrency), *timing]
            grpc_argv = [sys.executable, __file__, "--client", f"127.0.0.1:{grpc_port}", str(root / "grpc.bin")]
            grpc_argv += ["--concurrency", str(args.concurrency), *timing]
            rest = drive(rest_argv, pid, args.warmup, args.duration)
            grpc = drive(grpc_argv, pid, args.warmup, args.duration)
            loaded_rss = rss_mb(pid)
    probe = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True)
    before, imported, started = (float(v) for v in probe.stdout.split())
    result = {
        "benchmark": "grpc_vs_rest",
        "model": "digits (batch 1, label only)",
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "cpus": os.cpu_count(),
        "rest": rest,
        "grpc": grpc,
        "grpc_over_rest": round(grpc["rps"] / rest["rps"], 3) if rest["rps"] else None,
        "agent_rss_mb": {"idle_with_grpc_port": idle_rss, "after_both_loads": loaded_rss},
        "grpc_cost_rss_mb": {
            "import_grpc_service": round(imported - before, 1),
            "import_and_start_server": round(started - before, 1),
            "process_before_mb": round(before, 1),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
