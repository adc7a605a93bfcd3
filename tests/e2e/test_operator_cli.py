"""An operator's first hour with a real server and agent: config files with JSON logs, an access log without the
probes and long polls, probes without a token, and a missing fleet CA that says which file to pass."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx

from strata.localfleet import LocalFleet


def test_config_files_json_logs_quiet_access_log_probes_and_ca_errors(tmp_path: Path) -> None:
    server_toml = tmp_path / "server.toml"
    # The fleet passes --port and --data-dir on the command line: they must win over the file's.
    server_toml.write_text('log-format = "json"\nport = 1\ndata-dir = "/nonexistent/strata"\nlog_level = "info"\n')
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text('log-format = "json"\ntier = "near-edge"\nreport-interval = "5s"\n')
    with LocalFleet(tmp_path / "fleet", poll_wait_s=1) as fleet:
        fleet.start_server(extra_args=["--config", str(server_toml)])
        agent = fleet.start_agent("edge-1", "device", {"site": "a"}, extra_args=["--config", str(agent_toml)])
        fleet.wait_for(lambda: fleet.nodes().get("edge-1", {}).get("online"), 30, "the agent online", agent.process)
        assert fleet.nodes()["edge-1"]["tier"] == "device"  # --tier on the command line beat the file's near-edge

        # Probes answer without a credential (and a bare HTTPS client that trusts the fleet CA).
        for path in ("/healthz", "/readyz"):
            answer = httpx.get(fleet.server_url + path, verify=fleet.tls())
            assert (answer.status_code, answer.text) == (200, "ok")
        assert httpx.get(fleet.server_url + "/metrics", verify=fleet.tls()).status_code == 401

        # The fleet CA: missing, it is named; given after the command, it works.
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
        env |= {"STRATA_SERVER": fleet.server_url, "STRATA_TOKEN": fleet.admin_token}

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(fleet.strata(*args), env=env, capture_output=True, text=True, timeout=60)

        untrusted = run("nodes", "list")
        message = " ".join(untrusted.stderr.split())
        assert untrusted.returncode == 2, untrusted.stderr
        assert "--ca FILE or set STRATA_CA=FILE" in message
        assert "DATA_DIR/ca.pem in the server's --data-dir" in message
        listed = run("nodes", "list", "--json", "--ca", str(fleet.ca_path))
        assert listed.returncode == 0, listed.stderr
        assert [node["name"] for node in json.loads(listed.stdout)] == ["edge-1"]
        # http:// by mistake: the server drops the request without an answer ("Server disconnected without sending
        # a response", and nothing more, before): the error says to use https.
        plain = fleet.server_url.replace("https://", "http://")
        unreachable = run("nodes", "list", "--server", plain, "--ca", str(fleet.ca_path))
        assert unreachable.returncode == 4, unreachable.stderr
        assert f"serves HTTPS only: --server {fleet.server_url}" in " ".join(unreachable.stderr.split())
        # an unknown event kind is bad input (2); it exited 5, "package invalid", as every 422 did
        unknown = run("events", "--kind", "nope", "--ca", str(fleet.ca_path))
        assert unknown.returncode == 2, unknown.stderr
        assert "unknown event kind nope" in unknown.stderr
        # events of a node that does not exist: "not found" (6), as other commands say it; it printed nothing, 0
        nobody = run("events", "--node", "edge-9", "--ca", str(fleet.ca_path))
        assert (nobody.returncode, nobody.stdout) == (6, ""), nobody.stderr
        assert "no node 'edge-9' (live or revoked)" in nobody.stderr
        # a node that never was is not told to re-enroll (only a revoked one is: tests/e2e/test_trust.py)
        never = run("nodes", "show", "edge-9", "--ca", str(fleet.ca_path))
        assert (never.returncode, never.stderr.strip()) == (
            6,
            "error: there is no node 'edge-9' (`strata nodes list` lists the fleet)",
        )
        quiet = run("events", "--node", "edge-1", "--kind", "gate", "--ca", str(fleet.ca_path))
        assert (quiet.returncode, quiet.stdout) == (0, ""), quiet.stderr  # a node with nothing of that kind

        # Operator tokens: issued with a name, listed (never a secret), revoked by name; then refused (3), gone (6),
        # and the last admin token kept (7: a conflict).
        issued = run("token", "api", "--scope", "read", "--name", "grafana", "--ca", str(fleet.ca_path))
        assert issued.returncode == 0, issued.stderr
        grafana = issued.stdout.strip().splitlines()[-1]
        assert "read API token grafana (id " in issued.stderr
        tokens = run("token", "list", "--json", "--ca", str(fleet.ca_path))
        assert tokens.returncode == 0, tokens.stderr
        rows = {t["name"]: t for t in json.loads(tokens.stdout)}
        assert set(rows) == {None, "grafana"}
        assert rows["grafana"]["scope"] == "read"
        assert grafana not in tokens.stdout
        assert fleet.admin_token not in tokens.stdout
        table = run("token", "list", "--ca", str(fleet.ca_path))
        assert table.returncode == 0, table.stderr
        assert "grafana" in table.stdout
        assert rows["grafana"]["id"] in table.stdout
        assert run("nodes", "list", "--token", grafana, "--ca", str(fleet.ca_path)).returncode == 0
        revoked = run("token", "revoke", "grafana", "--ca", str(fleet.ca_path))
        assert revoked.returncode == 0, revoked.stderr
        assert f"revoked read API token grafana ({rows['grafana']['id']})" in revoked.stderr
        refused = run("nodes", "list", "--token", grafana, "--ca", str(fleet.ca_path))
        assert refused.returncode == 3, refused.stderr
        assert "unknown or revoked token" in refused.stderr
        gone = run("token", "revoke", rows["grafana"]["id"], "--ca", str(fleet.ca_path))
        assert gone.returncode == 6, gone.stderr
        last = run("token", "revoke", rows[None]["id"], "--ca", str(fleet.ca_path))
        assert last.returncode == 7, last.stderr
        assert "last admin token" in last.stderr

        server_log = (fleet.root / "logs" / "server.log").read_text().splitlines()
        agent_log = (fleet.root / "logs" / "edge-1.log").read_text().splitlines()

    # Every line of both logs is one JSON object with the fields a log shipper needs (the agent's name its node).
    server_lines = [json.loads(line) for line in server_log]
    agent_lines = [json.loads(line) for line in agent_log]
    for line in server_lines + agent_lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    assert all(line["node"] == "edge-1" for line in agent_lines)
    enrolled = [line["message"] for line in agent_lines if line["message"].startswith("enrolled as node edge-1")]
    assert len(enrolled) == 1
    # the certificate's expiry as a date, not a Unix time ("valid until 1796512986.645024")
    assert re.search(r"; certificate valid until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", enrolled[0]), enrolled
    # The access log keeps the operator's calls and drops the probes and the node's long polls (seconds of them).
    access = [line["message"] for line in server_lines if line["logger"] == "uvicorn.access"]
    assert any('"GET /v1/nodes HTTP/1.1" 200' in message for message in access), access
    assert not [m for m in access if "/healthz" in m or "/readyz" in m or "/desired" in m], access
