"""A lean closed-loop HTTP/1.1 load generator, run as its own process by bench/serving.py.

N keep-alive connections on raw asyncio sockets (uvloop when installed), each sending one prebuilt request
after another; latencies are kept only for requests sent inside the measurement window (after a warm-up).
Prints one JSON object: answered (200) requests per second and their latency percentiles, every status's
count, and this process's CPU time over the window (so a reader can see whether the client was the bottleneck).

    python bench/loadgen.py REQUEST_FILE --port P --connections 32 --warmup 2 --duration 10
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


async def _connection(
    port: int, request: bytes, window: tuple[float, float], latencies: list[float], statuses: dict[str, int]
) -> None:
    start, end = window
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            sent = time.perf_counter()
            if sent >= end:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            done = time.perf_counter()
            if sent >= start:
                status = head[9:12].decode()
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200":  # latency figures are those of answered requests, not of refusals
                    latencies.append(done - sent)
    except (OSError, asyncio.IncompleteReadError):
        statuses["connection_error"] = statuses.get("connection_error", 0) + 1
    finally:
        writer.close()


async def run(port: int, request: bytes, connections: int, warmup: float, duration: float) -> dict[str, object]:
    """Drive the server for warm-up + duration seconds; measure the last `duration` seconds."""
    now = time.perf_counter()
    window = (now + warmup, now + warmup + duration)
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def measure_cpu() -> tuple[float, float]:
        await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
        return _cpu_s(), time.perf_counter()

    cpu_task = asyncio.create_task(measure_cpu())
    await asyncio.gather(*(_connection(port, request, window, latencies, statuses) for _ in range(connections)))
    cpu_start, wall_start = await cpu_task
    cpu = _cpu_s() - cpu_start
    wall = time.perf_counter() - wall_start
    latencies.sort()
    ok = statuses.get("200", 0)
    return {
        "requests": sum(statuses.values()),
        "statuses": statuses,
        "rps": round(ok / duration, 1),
        "p50_ms": round((percentile(latencies, 50) or 0) * 1000, 2),
        "p99_ms": round((percentile(latencies, 99) or 0) * 1000, 2),
        "client_cpu_s": round(cpu, 2),
        "client_cpu_share_of_one_core": round(cpu / wall, 3) if wall > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("request_file", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    request = args.request_file.read_bytes()
    result = asyncio.run(run(args.port, request, args.connections, args.warmup, args.duration))
    result["client_pid"] = os.getpid()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
