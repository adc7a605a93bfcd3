"""Requests per second of the control plane for desired-state polls, unchanged (304) against full (200).

An agent polls with If-None-Match; an unchanged fleet must cost the server almost nothing and no database
write. This starts a real control plane, enrolls NODES nodes, deploys a model to all of them, then drives
each kind of poll over CONNECTIONS keep-alive connections for SECONDS each, from a lean asyncio load
generator (prebuilt request bytes, so the server saturates first; wait=0 so nothing sleeps on the server):
- unchanged: `If-None-Match` with the node's current ETag -> 304, empty body;
- baseline: the same request without the ETag -> 200 with the whole desired state (what a naive agent
  that re-downloads its state every time costs);
- floor: GET /v1/health with the same credentials, the cheapest authenticated call the server has.
Every connection is mutual TLS as one of the nodes (its own key and fleet certificate), as agents connect.
Database commits are counted with SQLite's `PRAGMA data_version` from a separate connection; the only
expected ones are the batched presence flushes (one transaction every 15 s at most, not one per poll).
Prints one JSON object; compare the ratio, not the absolute numbers (the machine is shared).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import sqlite3
import ssl
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx

from strata.core.package import pack_tar
from strata.examples.digits import train_digits
from strata.localfleet import LocalFleet
from strata.package_build import build_package
from strata.trust.node import make_csr

NODES = 50
LOAD_PROCESSES = 1
CONNECTIONS = 8
SECONDS = 5.0


def _node_tls(ca: Path, node_dir: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(node_dir / "node.pem", node_dir / "node.key")
    return context


async def _connection(
    host: str,
    port: int,
    tls: ssl.SSLContext,
    requests: list[bytes],
    expected: int,
    deadline: float,
    counts: dict[str, int],
) -> None:
    """One keep-alive connection, as one node, sending that node's prebuilt requests back to back (a lean
    client, so the server is what saturates, not the load generator)."""
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    index = 0
    try:
        while time.monotonic() < deadline:
            writer.write(requests[index % len(requests)])
            index += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            counts["requests"] += 1
            counts["status_ok"] += status == expected
    finally:
        writer.close()


def _load_process(
    url: str,
    ca: Path,
    nodes: list[tuple[Path, list[bytes]]],
    expected: int,
    seconds: float,
    out: mp.Queue,
) -> None:
    parts = urllib.parse.urlsplit(url)
    counts = {"requests": 0, "status_ok": 0}

    async def run() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            *(
                _connection(parts.hostname or "127.0.0.1", parts.port or 443, _node_tls(ca, node_dir), requests,
                            expected, deadline, counts)
                for node_dir, requests in nodes
            )
        )  # fmt: skip

    asyncio.run(run())
    out.put(counts)


def _request(url: str, node_id: str, etag: str | None, path: str | None = None) -> bytes:
    netloc = urllib.parse.urlsplit(url).netloc
    lines = [f"GET {path or f'/v1/nodes/{node_id}/desired?wait=0'} HTTP/1.1", f"Host: {netloc}"]
    if etag is not None:
        lines.append(f"If-None-Match: {etag}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def drive(url: str, ca: Path, nodes: list[tuple[Path, list[bytes]]], expected: int) -> dict[str, float]:
    """Run LOAD_PROCESSES processes of CONNECTIONS connections each (one node each) for SECONDS; requests per
    second."""
    queue: mp.Queue = mp.Queue()
    per_process = [nodes[i * CONNECTIONS : (i + 1) * CONNECTIONS] for i in range(LOAD_PROCESSES)]
    processes = [
        mp.Process(target=_load_process, args=(url, ca, chunk, expected, SECONDS, queue)) for chunk in per_process
    ]
    started = time.monotonic()
    for process in processes:
        process.start()
    results = [queue.get() for _ in processes]
    for process in processes:
        process.join()
    elapsed = time.monotonic() - started
    total = sum(r["requests"] for r in results)
    return {
        "requests": total,
        "rps": round(total / elapsed, 1),
        "expected_status_fraction": round(sum(r["status_ok"] for r in results) / max(total, 1), 4),
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        root = Path(tmp)
        train_digits(root / "digits.onnx")
        for profile in ("cpu-generic", "x86_64-avx2"):
            package = build_package(root / "digits.onnx", root / profile, name="digits", version="1", profile=profile)
            pack_tar(package, root / f"{profile}.tar")
        with LocalFleet(root / "fleet") as fleet:
            fleet.start_server()
            targets = []  # (node id, its folder with node.key and node.pem)
            with httpx.Client(base_url=fleet.server_url, verify=fleet.tls()) as http:
                for i in range(NODES):
                    token = fleet.client.create_enrollment_token(600)["token"]
                    node_dir = root / "nodes" / f"n{i}"
                    node_dir.mkdir(parents=True)
                    csr = make_csr(node_dir / "node.key", f"n{i}").decode()
                    enrolled = http.post(
                        "/v1/enroll",
                        json={"token": token, "name": f"n{i}", "tier": "device", "labels": {"fleet": "bench"},
                              "profile": "x86_64-avx2", "csr": csr},
                    ).json()  # fmt: skip
                    (node_dir / "node.pem").write_text(enrolled["certificate"])
                    targets.append((enrolled["node_id"], node_dir))
                for profile in ("cpu-generic", "x86_64-avx2"):
                    fleet.client.push_package(root / f"{profile}.tar")
                fleet.client.deploy("digits", "1", {"fleet": "bench"})
            with_etags = []
            for node_id, node_dir in targets:
                with httpx.Client(base_url=fleet.server_url, verify=_node_tls(fleet.ca_path, node_dir)) as http:
                    response = http.get(f"/v1/nodes/{node_id}/desired")
                    response.raise_for_status()
                with_etags.append((node_id, node_dir, response.headers["etag"]))
            body_bytes = len(response.content)
            db = sqlite3.connect(fleet.server_dir / "strata.db")
            version = db.execute("PRAGMA data_version").fetchone()[0]
            url = fleet.server_url
            ca = fleet.ca_path
            unchanged = drive(url, ca, [(d, [_request(url, n, etag)]) for n, d, etag in with_etags], 304)
            commits = db.execute("PRAGMA data_version").fetchone()[0] - version
            baseline = drive(url, ca, [(d, [_request(url, n, None)]) for n, d, _ in with_etags], 200)
            health = drive(url, ca, [(d, [_request(url, n, None, "/v1/health")]) for n, d, _ in with_etags], 200)
            db.close()
    print(
        json.dumps(
            {
                "benchmark": "poll_throughput",
                "nodes": NODES,
                "connections": LOAD_PROCESSES * CONNECTIONS,
                "seconds_each": SECONDS,
                "unchanged_poll_304": unchanged,
                "baseline_full_fetch_200": baseline,
                "floor_authenticated_health_200": health,
                "ratio_unchanged_to_full": round(unchanged["rps"] / baseline["rps"], 3),
                "ratio_unchanged_to_health": round(unchanged["rps"] / health["rps"], 3),
                "desired_state_bytes": body_bytes,
                "db_commits_during_unchanged_polls": commits,
                "db_commits_note": "presence is flushed in one batched transaction every 15 s, never per poll",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
