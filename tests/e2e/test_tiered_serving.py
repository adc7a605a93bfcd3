"""Tiered serving with real processes: admission control under overload, and failover between tiers.

One fleet for the module: a control plane; a device agent `dev1` at site s1 with a small queue; a near-edge
agent `edge1` at s1 (the device's parent); a cloud-tier agent `cloud1` with a deep queue; and two gateways.
Two real models: `heavy` (a 1024-wide, 300-layer tanh MLP, ~30 ms a row on one thread: a model the device can
barely serve) on every node, and the digits classifier on edge1 and cloud1 only, so a device's request for it
goes to the parent and, when the parent is gone, to the cloud.

Timing assertions are generous on purpose (the machine is shared); the measured figures are printed (run with
`-s` to see them) and reported with the change.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from strata.core.oip import encode_request
from strata.core.package import pack_tar
from strata.examples.digits import load_data
from strata.localfleet import GatewayHandle, LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow

WIDTH, LAYERS = 1024, 300
FAILOVER_TIMEOUT_S = 2.0  # the failover gateway's per-attempt timeout


def heavy_model(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes, previous = [], "x"
    for i in range(LAYERS):
        nodes += [
            helper.make_node("MatMul", [previous, "w"], [f"m{i}"]),
            helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]),
        ]
        previous = f"t{i}"
    nodes.append(helper.make_node("ReduceMean", [previous], ["y"], axes=[1], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def one_row_seconds(path: Path) -> float:
    """How long one row takes on one thread here (the median of a few runs), in CPU time: one intra-op thread runs
    on this thread, and a wall-clock figure taken while other test workers were busy came out four times too long,
    the device's queue-wait limit with it (its queue then held two rows where the test allows 1.5)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.ones((1, WIDTH), dtype=np.float32)
    times = []
    for _ in range(12):
        started = time.thread_time()
        session.run(None, {"x": x})
        times.append(time.thread_time() - started)
    return statistics.median(times[2:])


@dataclass
class Tiers:
    fleet: LocalFleet
    overload_gateway: GatewayHandle
    failover_gateway: GatewayHandle
    row_s: float

    def url(self, name: str) -> str:
        return self.fleet.agents[name].serve_url


@pytest.fixture(scope="module")
def tiers(tmp_path_factory: pytest.TempPathFactory, digits_onnx: Path) -> Iterator[Tiers]:
    work = tmp_path_factory.mktemp("tiers")
    heavy = heavy_model(work / "heavy.onnx")
    row_s = one_row_seconds(heavy)
    x = np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)
    packages = [
        build_package(heavy, work / "heavy-pkg", name="heavy", version="1", sample={"x": x}),
        build_package(digits_onnx, work / "digits-pkg", name="digits", version="1"),
    ]
    with LocalFleet(work / "fleet", poll_wait_s=5) as fleet:
        fleet.start_server()
        for package in packages:
            pack_tar(package, work / f"{package.manifest.name}.tar")
            fleet.client.push_package(work / f"{package.manifest.name}.tar")
        # the device: one execution at a time, a short queue, and no request admitted that would wait more
        # than half a row's time
        wait_ms = f"{max(1.0, row_s * 1000 / 2):.1f}"
        small_queue = [
            "--threads",
            "1",
            "--instances",
            "1",
            "--max-batch-size",
            "1",
            "--max-queue-size",
            "4",
            "--max-queue-wait-ms",
            wait_ms,
        ]
        fleet.start_agent("dev1", "device", {"site": "s1"}, extra_args=small_queue)
        fleet.start_agent("edge1", "near-edge", {"site": "s1", "serves": "big"}, extra_args=["--threads", "1"])
        deep_queue = ["--threads", "1", "--max-queue-size", "100000", "--max-queue-wait-ms", "0"]
        fleet.start_agent("cloud1", "cloud", {"serves": "big"}, extra_args=deep_queue)
        fleet.client.deploy("heavy", "1", {})
        fleet.client.deploy("digits", "1", {"serves": "big"})
        fleet.wait_for_versions(
            {"dev1": {"heavy": "1"}, "edge1": {"heavy": "1", "digits": "1"}, "cloud1": {"heavy": "1", "digits": "1"}},
            timeout=120,
        )
        overload = fleet.start_gateway(
            "overload", ["--local", fleet.agents["dev1"].serve_url, "--cloud", fleet.agents["cloud1"].serve_url,
                         "--timeout", "60"],
        )  # fmt: skip
        # the failover gateway acts as dev1 (its fleet certificate): topology from the control plane, parents and
        # cloud nodes over mutual TLS on their tier ports
        failover = fleet.start_gateway(
            "failover",
            ["--data-dir", str(fleet.agents["dev1"].data_dir),
             "--timeout", f"{FAILOVER_TIMEOUT_S:g}", "--breaker-cooldown", "1", "--health-interval", "0.5",
             "--topology-interval", "5"],
        )  # fmt: skip
        yield Tiers(fleet, overload, failover, row_s)


# --- load --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    status: int
    seconds: float  # from writing the request to reading the whole answer
    lag: float  # how late the request was written after its scheduled time (the client's own delay)
    served_by: str | None
    retry_after: str | None


def heavy_request(port: int, path: str) -> bytes:
    body, length = encode_request({"x": np.ones((1, WIDTH), dtype=np.float32)})
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {length}\r\n\r\n"
    )
    return head.encode() + body


class Client:
    """A lean HTTP/1.1 client on raw asyncio sockets (so the test's own CPU does not become the bottleneck):
    each request takes an idle keep-alive connection, or opens one."""

    def __init__(self, url: str, path: str) -> None:
        self.port = int(url.rsplit(":", 1)[1])
        self.request = heavy_request(self.port, path)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def shoot(self, scheduled: float) -> Shot:
        loop = asyncio.get_running_loop()
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection("127.0.0.1", self.port)
        started = loop.time()
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        headers = dict(
            line.decode("latin-1").lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
        )
        await reader.readexactly(int(headers.get("content-length", "0")))
        elapsed = loop.time() - started
        if headers.get("connection") == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return Shot(int(head[9:12]), elapsed, started - scheduled, headers.get("strata-served-by"),
                    headers.get("retry-after"))  # fmt: skip

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


def open_loop(url: str, path: str, rate: float, seconds: float) -> list[Shot]:
    """Send requests at a fixed rate whatever the answers (an open loop)."""

    async def run() -> list[Shot]:
        client = Client(url, path)
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for index in range(int(rate * seconds)):
            scheduled = start + index / rate
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            tasks.append(asyncio.create_task(client.shoot(scheduled)))
        shots = list(await asyncio.gather(*tasks))
        client.close()
        return shots

    return asyncio.run(run())


def sequential(url: str, path: str, count: int) -> list[Shot]:
    async def run() -> list[Shot]:
        client = Client(url, path)
        loop = asyncio.get_running_loop()
        shots = [await client.shoot(loop.time()) for _ in range(count)]
        client.close()
        return shots

    return asyncio.run(run())


def heavy_counters(url: str) -> dict[str, float]:
    """The device's counters for `heavy` so far (Triton's metrics): runtime calls (`executions`) and the seconds
    they took (`compute_s`), requests answered (`successes`) and the seconds those waited in the queue
    (`queue_s`)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    labels = '{model="heavy",version="1"}'

    def value(name: str) -> float:
        line = next((line for line in text.splitlines() if line.startswith(name + labels + " ")), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    return {
        "executions": value("nv_inference_exec_count"),
        "compute_s": value("nv_inference_compute_infer_duration_us") / 1e6,
        "successes": value("nv_inference_request_success"),
        "queue_s": value("nv_inference_queue_duration_us") / 1e6,
    }


def counted_since(url: str, before: dict[str, float]) -> dict[str, float]:
    return {name: value - before[name] for name, value in heavy_counters(url).items()}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# --- admission control, and the cloud taking the rest ------------------------------------------------------


def test_overload_sheds_the_rest_keeps_admitted_latency_bounded_and_the_gateway_answers_everything(
    tiers: Tiers,
) -> None:
    path = "/v2/models/heavy/infer"
    device = tiers.url("dev1")
    before = heavy_counters(device)
    unloaded = [s.seconds for s in sequential(device, path, 100) if s.status == 200]
    assert len(unloaded) == 100
    measured = counted_since(device, before)
    rate = measured["executions"] / measured["compute_s"]  # what the node can serve: calls per second of runtime

    before = heavy_counters(device)
    direct = open_loop(device, path, 4 * rate, 3.0)
    # the node's own account of the overload: how long an admitted request waited in its queue, in rows of its
    # runtime's time then (a slower machine makes both longer alike; the client's own delays are in neither)
    node = counted_since(device, before)
    served_any = node["successes"] > 0 and node["compute_s"] > 0
    queued_rows = (node["queue_s"] / node["successes"]) / (node["compute_s"] / node["executions"]) if served_any else 0
    busy = node["compute_s"] / 3.0  # the share of the 3 s its one runtime instance was running a row
    admitted = [s.seconds for s in direct if s.status == 200]
    shed = [s for s in direct if s.status != 200]
    processes = {
        "gateway": tiers.overload_gateway.process,
        **{n: tiers.fleet.agents[n].process for n in ("dev1", "cloud1")},
    }
    cpu_before = {name: cpu_seconds(process.pid) for name, process in processes.items()}
    started = time.monotonic()
    through = open_loop(tiers.overload_gateway.url, path, 4 * rate, 3.0)
    wall = time.monotonic() - started
    cpu = {name: round((cpu_seconds(p.pid) - cpu_before[name]) / wall, 2) for name, p in processes.items()}
    served = Counter(s.served_by for s in through)

    figures = {
        "row_ms_in_process": round(tiers.row_s * 1000, 2),
        "capacity_rps": round(rate, 1),
        "offered_rps": round(4 * rate, 1),
        "unloaded_p50_ms": round(statistics.median(unloaded) * 1000, 2),
        "unloaded_p99_ms": round(p99(unloaded) * 1000, 2),
        "direct": {
            "sent": len(direct),
            "admitted": len(admitted),
            "shed": Counter(s.status for s in shed),
            "admitted_p50_ms": round(statistics.median(admitted) * 1000, 2),
            "admitted_p99_ms": round(p99(admitted) * 1000, 2),
            "shed_p99_ms": round(p99([s.seconds for s in shed]) * 1000, 2) if shed else None,
            "client_lag_p99_ms": round(p99([s.lag for s in direct]) * 1000, 2),
            "node_mean_queue_wait_rows": round(queued_rows, 2),
            "node_busy": round(busy, 2),
        },
        "gateway": {
            "sent": len(through),
            "statuses": Counter(s.status for s in through),
            "served_by": served,
            "p50_ms": round(statistics.median(s.seconds for s in through) * 1000, 2),
            "p99_ms": round(p99([s.seconds for s in through]) * 1000, 2),
            "client_lag_p99_ms": round(p99([s.lag for s in through]) * 1000, 2),
            "seconds_until_all_answered": round(wall, 2),
            "cpu_cores_while_answering": cpu,
            "load_average": os.getloadavg()[0],
        },
    }
    print("\noverload figures:", json.dumps(figures, default=dict))

    # the node shed what it could not serve, at once and with Retry-After ...
    assert shed
    assert all(s.status == 503 and s.retry_after is not None for s in shed)
    assert p99([s.seconds for s in shed]) < p99(unloaded) + 0.25
    # ... and what it admitted did not wait in a queue. The latency target (2x unloaded) is measured by
    # bench/serving.py; this is a test of admission control, not a benchmark. The node's own account decides it, in
    # rows of its runtime's time (a loaded machine slows rows and waits alike, and the client's delays are in
    # neither): an admitted request waited 0.42 rows on average; with no shedding by estimated wait (only the
    # queue of 4) 4.05 rows. The line is 1.5 rows.
    # it kept serving meanwhile: its one runtime instance ran rows most of the 3 s (0.91 of it under three CPU
    # hogs; a node that shed everything would sit idle). Counted in requests against the capacity measured before
    # the overload, as it was, the loaded machine came to 1.7 s of the 3 against a line of 1 s.
    assert busy > 0.5, figures["direct"]
    assert queued_rows < 1.5, figures["direct"]
    # End to end, as the client saw it: without any admission control the queue grows by 3 s of work each second
    # and the last admitted requests wait ~9 s; with it, admitted p99 measured 2.6-3.8x unloaded on 2 shared
    # cores, and once 0.54 s (12x) while the suite's other workers took the cores (the client's own delay: its
    # lag p99 was 0.51 s). The line is 4x unloaded or 1.5 s, six times under the bug and three over that worst.
    assert p99(admitted) < max(4 * p99(unloaded) + 0.01, 1.5)
    # through the gateway every request got an answer, some from the cloud
    assert [s.status for s in through] == [200] * len(through)
    assert served["local"] > 0
    assert served["cloud"] > 0
    assert set(served) <= {"local", "cloud"}


# --- failover ------------------------------------------------------------------------------------------------


def ask_digits(gateway: GatewayHandle) -> tuple[str | None, float, str]:
    x = load_data().test_x[:1].astype(np.float32)
    body, length = encode_request({"X": x})
    started = time.perf_counter()
    response = httpx.post(
        f"{gateway.url}/v2/models/digits/infer",
        content=body,
        headers={"inference-header-content-length": str(length)},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.headers.get("strata-served-by"), time.perf_counter() - started, response.headers["strata-route"]


def wait_until_served_by(gateway: GatewayHandle, tier: str, timeout: float) -> float:
    """Ask until `tier` answers; return how long that took."""
    started = time.monotonic()
    while True:
        served_by, _, _ = ask_digits(gateway)
        if served_by == tier:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"still served by {served_by}, not {tier}"
        time.sleep(0.1)


def test_the_device_fails_over_to_the_cloud_and_comes_back_to_its_parent(tiers: Tiers) -> None:
    gateway = tiers.failover_gateway
    edge = tiers.fleet.agents["edge1"]
    figures: dict[str, Any] = {"attempt_timeout_s": FAILOVER_TIMEOUT_S}
    figures["first_parent_s"] = round(wait_until_served_by(gateway, "parent", 30), 2)  # topology read, probes done

    # the near-edge node hangs (its process stopped): one request waits at most one timeout, then the cloud
    edge.process.signal(signal.SIGSTOP)
    try:
        served_by, seconds, route = ask_digits(gateway)
        figures["hung_parent"] = {"served_by": served_by, "seconds": round(seconds, 3), "route": route}
        assert served_by == "cloud"
        assert seconds < FAILOVER_TIMEOUT_S + 1.5
        later = [ask_digits(gateway) for _ in range(5)]
        figures["hung_parent_next"] = [round(s, 3) for _, s, _ in later]
        assert all(served == "cloud" for served, _, _ in later)
    finally:
        edge.process.signal(signal.SIGCONT)
    figures["back_after_resume_s"] = round(wait_until_served_by(gateway, "parent", 20), 2)

    # the near-edge node is killed: connections are refused, the cloud answers at once
    edge.process.kill()
    served_by, seconds, route = ask_digits(gateway)
    figures["killed_parent"] = {"served_by": served_by, "seconds": round(seconds, 3), "route": route}
    assert served_by == "cloud"
    assert seconds < FAILOVER_TIMEOUT_S
    restarted_at = time.monotonic()
    tiers.fleet.start_agent("edge1", "near-edge", extra_args=["--threads", "1"])
    figures["back_after_restart_s"] = round(wait_until_served_by(gateway, "parent", 60), 2)
    figures["restart_to_parent_s"] = round(time.monotonic() - restarted_at, 2)
    print("\nfailover figures:", json.dumps(figures))
    # the device's own model never left the device
    assert httpx.get(f"{gateway.url}/v2/models/heavy/ready", timeout=10).headers["strata-served-by"] == "local"
