"""What a node uploads as telemetry is its claim: a real control plane process, a real node's certificate on the
wire (its agent stopped: a modified agent sends what it likes). Counts past what the database holds, more client
errors than errors, texts longer than their columns (a drift tensor's name among them) and a decompression bomb
are each refused with a 4xx the node drops, never a 500 or a 503 it would retry for ever, and so is a batch of more
rows than a node seals; uploads past two at once are answered 429 unread; another node's endpoint is refused; and
the control plane keeps storing the node's honest batches afterwards."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from strata.control.api.telemetry import MAX_UPLOADS_PER_NODE
from strata.core.package import pack_tar
from strata.core.telemetry import (
    BUCKETS,
    MAX_TENSOR,
    DriftRow,
    MinuteRow,
    TelemetryBatch,
    encode_batch,
)
from strata.localfleet import LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow

CONTENT_TYPE = {"content-type": "application/vnd.strata.telemetry+zstd"}


def _batch(node_id: str, seq: int) -> TelemetryBatch:
    latency = [0] * BUCKETS
    latency[3] = 7
    minute = int(time.time() // 60)
    return TelemetryBatch(
        node_id=node_id,
        seq=seq,
        created=time.time(),
        minutes=[
            MinuteRow("digits", "1", "cpu-generic-fp32", minute, 7, 3, 7, 7000, 70, latency, client_errors=1, shed=1)
        ],
        drift=[DriftRow("digits", "1", minute, "X", [1, 2, 3])],
    )


def _tampered(batch: TelemetryBatch, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The batch as a node would encode it, with `change` applied to its columnar JSON."""
    document = json.loads(zstandard.ZstdDecompressor().decompress(encode_batch(batch)))
    change(document)
    return zstandard.ZstdCompressor().compress(json.dumps(document).encode())


def _set(column: str, field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        document[column][field][0] = value

    return change


def _set_text(column: str, field: str, value: str) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        document["strings"][document[column][field][0]] = value

    return change


def test_a_nodes_telemetry_claims_are_checked_before_they_are_stored(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    pack_tar(build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1"), tmp_path / "digits.tar")
    fleet.client.push_package(tmp_path / "digits.tar")  # telemetry of a model version the registry lacks is left out
    rogue = fleet.start_agent("rogue", "device", {"site": "x"})
    fleet.start_agent("other", "device", {"site": "x"})
    fleet.wait_for(lambda: len(fleet.nodes()) == 2, 30, "two nodes")
    identities = {name: fleet.node_id(name) for name in ("rogue", "other")}
    rogue.process.stop()
    rogue_id = identities["rogue"]
    url = f"{fleet.server_url}/v1/nodes/{rogue_id}/telemetry"
    with httpx.Client(verify=fleet.tls("rogue"), timeout=30) as client:
        attacks = {
            "more client errors than errors": _tampered(_batch(rogue_id, 1), _set("minutes", "client_errors", 4)),
            "more shed than errors": _tampered(_batch(rogue_id, 1), _set("minutes", "shed", 3)),
            "a count past the database's integers": _tampered(_batch(rogue_id, 1), _set("minutes", "requests", 2**70)),
            "a count that is not a number": _tampered(_batch(rogue_id, 1), _set("minutes", "errors", "2")),
            "an infinite count": _tampered(_batch(rogue_id, 1), _set("minutes", "client_errors", 1e400)),
            "an event status longer than its column": _tampered(
                _batch(rogue_id, 1),
                lambda document: document["events"].update(
                    {k: [v] for k, v in _one_event(document["strings"]).items()}
                ),
            ),
            "a drift tensor name longer than its column": _tampered(
                _batch(rogue_id, 1), _set_text("drift", "tensor", "t" * (MAX_TENSOR + 1))
            ),
            "a model name longer than its column": _tampered(
                _batch(rogue_id, 1), _set_text("minutes", "model", "m" * 129)
            ),
        }
        for what, body in attacks.items():
            answer = client.post(url, content=body, headers=CONTENT_TYPE)
            assert answer.status_code == 422, (what, answer.status_code, answer.text)
            assert answer.json()["code"] == "telemetry_invalid", what

        # A zstd bomb: 70 MB of zeros in a few kilobytes; refused without being inflated past the limit.
        bomb = zstandard.ZstdCompressor().compress(b"0" * (70 << 20))
        assert len(bomb) < 64 << 10
        answer = client.post(url, content=bomb, headers=CONTENT_TYPE)
        assert answer.status_code == 422, answer.text
        assert "declares 73400320 bytes" in answer.json()["error"]  # before: inflated, then not JSON

        # 2.5 million events in a 6 KB batch (55 MB inflated: 13.5 s and 750 MB to parse before), and the same
        # rows within the size limit: refused by their count.
        small = _tampered(_batch(rogue_id, 9), lambda d: d.update(events={c: [0] * 30_000 for c in d["events"]}))
        answer = client.post(url, content=small, headers=CONTENT_TYPE)
        assert answer.status_code == 422, answer.text
        assert "30000 events, more than the 20000 a batch may hold" in answer.json()["error"]

        # Uploads at once: two held open (their bodies never come), a third answered 429 at once, not parsed.
        host, port = fleet.server_url.removeprefix("https://").rsplit(":", 1)
        head = f"POST /v1/nodes/{rogue_id}/telemetry HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100\r\n\r\n"
        held = []
        for _ in range(MAX_UPLOADS_PER_NODE):
            sock = fleet.tls("rogue").wrap_socket(socket.create_connection((host, int(port))), server_hostname=host)
            sock.sendall(head.encode())
            held.append(sock)
        time.sleep(0.5)
        answer = client.post(url, content=encode_batch(_batch(rogue_id, 2)), headers=CONTENT_TYPE)
        assert (answer.status_code, answer.json()["code"]) == (429, "too_many_requests"), answer.text
        for sock in held:
            sock.close()

        # Another node's endpoint: refused whatever the batch.
        honest = encode_batch(_batch(rogue_id, 1))
        other_url = f"{fleet.server_url}/v1/nodes/{identities['other']}/telemetry"
        assert client.post(other_url, content=honest, headers=CONTENT_TYPE).status_code == 403

        # And the node's honest batch is stored, its counts as sent (once the held uploads are let go).
        deadline = time.monotonic() + 10
        while (answer := client.post(url, content=honest, headers=CONTENT_TYPE)).status_code == 429:
            assert time.monotonic() < deadline, "the held uploads were never let go"
            time.sleep(0.2)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"seq": 1, "stored": True}
    metrics = httpx.get(
        f"{fleet.server_url}/metrics", headers={"authorization": f"Bearer {fleet.admin_token}"}, verify=fleet.tls()
    ).text
    labels = '{model="digits",node="rogue",version="1"}'
    for name, value in (("requests", 7), ("errors", 3), ("client_errors", 1), ("shed", 1)):
        assert f"strata_inference_{name}_total{labels} {value:.1f}" in metrics, name


def _one_event(strings: list[str]) -> dict[str, Any]:
    """One event row whose status is 33 characters (the column holds 32); appends its strings to `strings`."""

    def text(value: str) -> int:
        strings.append(value)
        return len(strings) - 1

    return {
        "ts_ms": int(time.time() * 1000),
        "model": text("digits"),
        "version": text("1"),
        "variant": text("cpu-generic-fp32"),
        "latency_us": 300,
        "queue_us": 5,
        "batch": 1,
        "status": text("s" * 33),
        "tier": text("local"),
        "priority": 2,
        "summary": text(""),
    }
