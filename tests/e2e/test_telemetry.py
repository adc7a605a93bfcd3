"""Telemetry with real processes: 100,000 requests through an outage and two kill -9s, counted exactly once, and
malformed ones counted as the caller's errors, not the model's; drift that shows on shifted inputs and not on
unshifted ones, in the API and in `strata telemetry --json --per-node`."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from e2e_helpers import hammer, infer_request, push_model

from strata.examples.digits import load_data
from strata.localfleet import LocalFleet

pytestmark = pytest.mark.slow

TOTAL = 100_000
MALFORMED = 3


def server_counts(fleet: LocalFleet) -> tuple[int, int]:
    answer = fleet.client.telemetry("digits", since_s=86400)
    return sum(m["requests"] for m in answer["minutes"]), sum(m["errors"] for m in answer["minutes"])


def test_an_outage_and_two_kills_lose_and_double_nothing(fleet: LocalFleet, digits_onnx: Path, tmp_path: Path) -> None:
    push_model(fleet, digits_onnx, "1", tmp_path)
    handle = fleet.start_agent("edge", extra_args=["--telemetry-interval", "1"])
    fleet.client.deploy("digits", "1", {})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    request = infer_request(handle.serve_port, load_data().test_x[:1])

    fleet.stop_server()
    served = 0
    bursts = [TOTAL // 3, TOTAL // 3, TOTAL - 2 * (TOTAL // 3)]
    for index, burst in enumerate(bursts):
        counts = hammer(handle.serve_port, request, burst)
        assert counts == {"ok": burst, "failed": 0}
        served += counts["ok"]
        if index < 2:  # between bursts, nothing in flight: a kill -9 at this instant must lose nothing answered
            handle.process.kill()
            handle = fleet.restart_agent("edge", extra_args=["--telemetry-interval", "1"])
            fleet.wait_for(lambda: fleet.agent_live("edge"), 30, "the agent after kill -9", handle.process)
    assert served == TOTAL
    # Clients that send garbage: refused as their fault, counted as errors but not as the model's.
    good = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    malformed: list[dict[str, Any]] = [
        {"content": b'{"inputs": ['},
        {"json": {"inputs": [{**good["inputs"][0], "shape": [1, 65]}]}},
        {"json": {"inputs": [{**good["inputs"][0], "name": "Y"}]}},
    ]
    assert len(malformed) == MALFORMED
    for request in malformed:
        assert httpx.post(f"{handle.serve_url}/v2/models/digits/infer", timeout=30, **request).status_code == 400

    fleet.start_server()
    everything = TOTAL + MALFORMED
    fleet.wait_for(lambda: server_counts(fleet)[0] >= everything, 120, "the node's telemetry to arrive", handle.process)
    time.sleep(2)  # a stray duplicate would land now
    assert server_counts(fleet) == (everything, MALFORMED)
    [summary] = fleet.client.telemetry("digits", since_s=86400)["nodes"]
    assert (summary["errors"], summary["client_errors"]) == (MALFORMED, MALFORMED)
    assert (summary["error_rate"], summary["client_error_rate"]) == (0.0, round(MALFORMED / everything, 6))
    db = sqlite3.connect(f"file:{fleet.server_dir / 'strata.db'}?mode=ro", uri=True)
    try:
        batches, distinct = db.execute("SELECT COUNT(*), COUNT(DISTINCT seq) FROM telemetry_batches").fetchone()
        dropped = db.execute("SELECT COALESCE(SUM(count), 0) FROM telemetry_dropped").fetchone()[0]
    finally:
        db.close()
    assert batches == distinct
    assert dropped == 0
    metrics = httpx.get(f"{handle.serve_url}/metrics").text
    assert 'strata_telemetry_buffer_rows{table="outbox"} 0' in metrics


def test_shifted_inputs_show_drift_and_unshifted_do_not(fleet: LocalFleet, digits_onnx: Path, tmp_path: Path) -> None:
    # PSI between two samples of one distribution is not 0: about chi2(bins - 1) * (1/n + 1/m) for n live and m
    # reference values. With the whole training set as reference (m = 1437) and the whole test set as traffic
    # (n = 360), a tensor of up to 10 bins stays under 27.9 * (1/360 + 1/1437) = 0.097 in 99.9% of draws: below
    # the 0.1 "no shift" line (measured: 0.037, the label output). 200 against 500 would cross 0.1 in 7-11% of
    # draws, and a figure read before all traffic is counted (under load the first read saw 160 of 200
    # requests) is one over a smaller sample still (0.10 after 30 requests).
    data = load_data()
    push_model(fleet, digits_onnx, "1", tmp_path, sample={"X": data.train_x})
    steady = fleet.start_agent("steady", extra_args=["--telemetry-interval", "1"])
    shifted = fleet.start_agent("shifted", extra_args=["--telemetry-interval", "1"])
    fleet.client.deploy("digits", "1", {})
    fleet.wait_for_versions({"steady": {"digits": "1"}, "shifted": {"digits": "1"}})
    rng = np.random.default_rng(0)
    requests = len(data.test_x)
    for i in range(requests):
        x = data.test_x[i : i + 1]
        hammer(steady.serve_port, infer_request(steady.serve_port, x), 1, concurrency=1)
        dimmed = np.clip(x * 0.4 + 0.5 + rng.normal(0, 0.05, x.shape), 0, 1)  # a washed-out camera
        hammer(shifted.serve_port, infer_request(shifted.serve_port, dimmed), 1, concurrency=1)

    def drift() -> dict[str, float] | None:
        # Only once every request's counts have arrived (each tensor has at least one value per request): a
        # figure over the first few uploads is a figure over a small sample.
        nodes = fleet.client.telemetry("digits")["nodes"]
        found = {
            n["node"]: max(d["psi"] for d in n["drift"])
            for n in nodes
            if n["requests"] == requests and n["drift"] and all(d["samples"] >= requests for d in n["drift"])
        }
        return found if len(found) == 2 else None

    psi = fleet.wait_for(drift, 60, "drift figures over all the traffic from both nodes")
    assert psi["shifted"] > 0.25
    assert psi["steady"] < 0.1
    # Scripts get the table's per-node rows with --json --per-node (--json alone printed only the minutes, which
    # carry no drift); --json alone is still the list of minutes.
    per_node = fleet.cli("telemetry", "digits", "--json", "--per-node", "--since", "1d")
    assert per_node.returncode == 0, per_node.stderr
    rows = {n["node"]: n for n in json.loads(per_node.stdout)}
    assert sorted(rows) == ["shifted", "steady"]
    assert {name: max(d["psi"] for d in row["drift"]) for name, row in rows.items()} == psi
    assert all(row["requests"] == requests and row["error_rate"] == 0.0 for row in rows.values())
    minutes = json.loads(fleet.cli("telemetry", "digits", "--json", "--since", "1d").stdout)
    assert isinstance(minutes, list)
    assert all("minute" in m and "drift" not in m for m in minutes)
    assert sum(m["requests"] for m in minutes) == 2 * requests
    # A version nobody served says so (an empty table with its headers did not); --per-node is --json's only
    none = fleet.cli("telemetry", "digits", "--version", "99", "--node", "steady")
    assert none.returncode == 0, none.stderr
    assert none.stdout.strip() == "no telemetry for digits version 99 on node steady over the last 1h"
    table_only = fleet.cli("telemetry", "digits", "--per-node")
    assert table_only.returncode == 2
    assert "only with --json: the table already has a row per node and version" in " ".join(table_only.stderr.split())
    # The node shows it too, without the control plane.
    local = [
        line
        for line in httpx.get(f"{shifted.serve_url}/metrics").text.splitlines()
        if line.startswith("strata_drift_psi{")
    ]
    assert max(float(line.rsplit(" ", 1)[1]) for line in local) > 0.25
