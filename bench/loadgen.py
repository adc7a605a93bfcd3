"""A lean closed-loop HTTP/1.1 load generator, run as its own process by bench/serving.py.

N keep-alive connections on raw asyncio sockets (uvloop when installed), each sending one prebuilt request
after another; latencies are kept only for requests sent inside the measurement window (after a warm-up).
Prints one JSON object: answered (200) requests per second and their latency percentiles, every status's
count, and this process's CPU time over the window (so a reader can see whether the client was the bottleneck).
`--rate R` caps the requests sent per second (over all connections; each connection paces itself), and
`--by-version` also counts the answered requests by the `model_version` of their JSON answers (bench/soak.py
checks them against the control plane's telemetry).

    python bench/loadgen.py REQUEST_FILE --port P --connections 32 --warmup 2 --duration 10 [--rate R] [--by-version]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
from pathlib import Path


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


VERSION_FIELD = b'"model_version":'


def answered_version(body: bytes) -> str:
    """The `model_version` of a JSON inference answer ("?" when it has none)."""
    at = body.find(VERSION_FIELD)
    if at < 0:
        return "?"
    value = body[at + len(VERSION_FIELD) :].lstrip()
    return value[1 : value.find(b'"', 1)].decode() if value[:1] == b'"' else "?"


async def _connection(
    port: int,
    request: bytes,
    window: tuple[float, float],
    latencies: list[float],
    statuses: dict[str, int],
    interval: float = 0.0,
    versions: dict[str, int] | None = None,
) -> None:
    start, end = window
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    due = time.perf_counter()
    try:
        while True:
            if interval:  # paced: one request every `interval` seconds, none made up after a slow answer
                due = max(due + interval, time.perf_counter())
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            sent = time.perf_counter()
            if sent >= end:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            done = time.perf_counter()
            if sent >= start:
                status = head[9:12].decode()
                statuses[status] = statuses.get(status, 0) + 1
                if versions is not None:
                    key = answered_version(body) if status == "200" else f"status {status}"
                    versions[key] = versions.get(key, 0) + 1
                if status == "200":  # latency figures are those of answered requests, not of refusals
                    latencies.append(done - sent)
    except (OSError, asyncio.IncompleteReadError):
        statuses["connection_error"] = statuses.get("connection_error", 0) + 1
    finally:
        writer.close()


async def run(
    port: int,
    request: bytes,
    connections: int,
    warmup: float,
    duration: float,
    rate: float | None = None,
    by_version: bool = False,
) -> dict[str, object]:
    """Drive the server for warm-up + duration seconds (at most `rate` requests a second); measure the last
    `duration` seconds."""
    now = time.perf_counter()
    window = (now + warmup, now + warmup + duration)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    versions: dict[str, int] | None = {} if by_version else None
    interval = connections / rate if rate else 0.0

    async def measure_cpu() -> tuple[float, float]:
        await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
        return _cpu_s(), time.perf_counter()

    cpu_task = asyncio.create_task(measure_cpu())
    await asyncio.gather(
        *(_connection(port, request, window, latencies, statuses, interval, versions) for _ in range(connections))
    )
    cpu_start, wall_start = await cpu_task
    cpu = _cpu_s() - cpu_start
    wall = time.perf_counter() - wall_start
    latencies.sort()
    ok = statuses.get("200", 0)
    result: dict[str, object] = {
        "requests": sum(statuses.values()),
        "statuses": statuses,
        "rps": round(ok / duration, 1),
        "p50_ms": round((percentile(latencies, 50) or 0) * 1000, 2),
        "p99_ms": round((percentile(latencies, 99) or 0) * 1000, 2),
        "client_cpu_s": round(cpu, 2),
        "client_cpu_share_of_one_core": round(cpu / wall, 3) if wall > 0 else None,
    }
    if versions is not None:
        result["by_version"] = versions
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("request_file", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument(
        "--rate", type=float, default=None, help="at most this many requests a second (all connections)"
    )
    parser.add_argument("--by-version", action="store_true", help="count answers by their JSON model_version")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    request = args.request_file.read_bytes()
    result = asyncio.run(
        run(args.port, request, args.connections, args.warmup, args.duration, args.rate, args.by_version)
    )
    result["client_pid"] = os.getpid()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
