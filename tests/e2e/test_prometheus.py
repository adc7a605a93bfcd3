"""The monitoring stack with real processes: Debian's Prometheus, started with deploy/prometheus/prometheus.yml
(rendered for loopback: ports, a read token, the fleet CA, a 1 s scrape interval), scrapes a real fleet (the control
plane over HTTPS with a bearer token, an agent's serving port through file_sd) and holds, in PromQL, the counts the
fleet served; every query of deploy/grafana/strata-fleet.json parses (promtool) and answers on that fleet. Without
Prometheus the tests FAIL saying so (tools/install-prometheus-deps installs it); they never skip."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from e2e_helpers import hammer, infer_request, push_model

from strata.examples.digits import load_data
from strata.localfleet import LocalFleet, ManagedProcess, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "strata-fleet.json"
REQUESTS = 20

# What Grafana puts in place of the dashboard's variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$model": ".*"}
# PromQL words that are neither metrics nor functions.
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}


def binary(name: str) -> str:
    """The path of Debian's `prometheus` or `promtool`; the test fails with the fix when it is missing."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run tools/install-prometheus-deps (apt-get install prometheus)")
    return found


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, with Grafana's variables substituted."""
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside label matchers, grouping lists and strings
    that are not called as functions."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    return {name for name in names if name not in PROMQL_KEYWORDS and not re.fullmatch(r"\d.*|e\d+|Inf|NaN", name)}


def render_config(
    folder: Path, server_port: int, token: str, ca: Path, agents: list[tuple[str, int]]
) -> tuple[Path, dict[str, Any]]:
    """deploy/prometheus/prometheus.yml pointed at this fleet: only addresses, file paths and intervals change."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"strata-control-plane", "strata-agents"}
    control = jobs["strata-control-plane"]
    (folder / "read.token").write_text(token + "\n")
    control["authorization"]["credentials_file"] = str(folder / "read.token")
    control["tls_config"]["ca_file"] = str(ca)
    control["static_configs"] = [{"targets": [f"127.0.0.1:{server_port}"]}]
    (folder / "agents").mkdir()
    targets = [{"targets": [f"127.0.0.1:{port}"], "labels": {"node": name}} for name, port in agents]
    (folder / "agents" / "local.yml").write_text(yaml.safe_dump(targets))
    (sd,) = jobs["strata-agents"]["file_sd_configs"]
    sd["files"] = [str(folder / "agents" / "*.yml")]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config


class Prometheus:
    """A Prometheus server on a free loopback port with its own TSDB folder, and its HTTP query API."""

    def __init__(self, config: Path, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.process = ManagedProcess("prometheus", argv, folder / "prometheus.log", dict(os.environ))

    def start(self, timeout: float = 20.0) -> None:
        self.process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.running, f"prometheus exited:\n{self.process.log_tail()}"
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"prometheus was not ready in {timeout:g} s:\n{self.process.log_tail()}")

    def api(self, path: str, **params: str) -> Any:
        answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5).json()
        assert answer["status"] == "success", f"{path} {params}: {answer}"
        return answer["data"]

    def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query's vector: label set (sorted pairs) -> value."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in data["result"]}

    def value(self, expr: str) -> float | None:
        """The one value an instant query answers, None while it answers nothing."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} answered {len(result)} series: {result}"
        return next(iter(result.values()), None)


def test_the_shipped_config_passes_promtool() -> None:
    # --syntax-only: the token and CA files it names live on the Prometheus machine, not here (the e2e test below
    # checks the rendered config in full)
    checked = subprocess.run(
        [binary("promtool"), "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    board = dashboard()
    assert board["uid"] == "strata-fleet"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    # promtool parses PromQL in rule files: every panel query becomes a recording rule
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"panel:{i}", "expr": e} for i, (_, e) in enumerate(panel_queries())],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = subprocess.run(
        [binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    titles = "\n".join(f"panel:{i} is {title!r}" for i, (title, _) in enumerate(panel_queries()))
    assert checked.returncode == 0, f"{checked.stdout}{checked.stderr}{titles}"
    assert f"SUCCESS: {len(panel_queries())} rules found" in checked.stdout, checked.stdout


def test_prometheus_scrapes_a_real_fleet_and_holds_what_it_served(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    push_model(fleet, digits_onnx, "1", tmp_path)
    agent = fleet.start_agent("edge", extra_args=["--telemetry-interval", "1"])
    fleet.client.deploy("digits", "1", {})
    read_token = str(fleet.client.create_api_token("read")["token"])
    folder = tmp_path / "prometheus"
    folder.mkdir()
    config, _ = render_config(folder, fleet.server_port, read_token, fleet.ca_path, [("edge", agent.serve_port)])
    checked = subprocess.run(
        [binary("promtool"), "check", "config", str(config)], capture_output=True, text=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    prometheus = Prometheus(config, folder)
    prometheus.start()
    try:
        fleet.wait_for_versions({"edge": {"digits": "1"}})
        good = infer_request(agent.serve_port, load_data().test_x[:1])
        assert hammer(agent.serve_port, good, REQUESTS, concurrency=4) == {"ok": REQUESTS, "failed": 0}
        bad = infer_request(agent.serve_port, np.zeros((1, 3)))  # the model takes 64 features: a bad request
        assert hammer(agent.serve_port, bad, 1, concurrency=1) == {"ok": 0, "failed": 1}

        served = 'nv_inference_request_success{job="strata-agents", node="edge", model="digits", version="1"}'
        failed = 'sum(nv_inference_request_failure{job="strata-agents", node="edge", model="digits"})'
        reported = 'strata_inference_requests_total{job="strata-control-plane", node="edge", model="digits"}'
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = (prometheus.value(served), prometheus.value(failed), prometheus.value(reported))
            if now[0] == REQUESTS and now[1] == 1 and now[2] is not None and now[2] >= REQUESTS:
                break
            time.sleep(0.5)
        else:
            targets = prometheus.api("targets")["activeTargets"]
            pytest.fail(f"Prometheus holds {now}; targets: {targets}\n{prometheus.process.log_tail()}")
        time.sleep(2)  # a late telemetry upload or a double count would show now
        assert prometheus.value(served) == REQUESTS
        failure = prometheus.query('nv_inference_request_failure{node="edge", model="digits"}')
        assert failure == {
            (
                ("__name__", "nv_inference_request_failure"),
                ("instance", f"127.0.0.1:{agent.serve_port}"),
                ("job", "strata-agents"),
                ("model", "digits"),
                ("node", "edge"),
                ("reason", "bad_request"),
                ("version", "1"),
            ): 1.0
        }
        # The control plane's count, from the node's telemetry, matches what the agent itself counts: every request
        # the node answered, the failed one included, and that one as an error, the caller's (a bad request); none
        # shed.
        telemetry = (
            prometheus.value(reported),
            prometheus.value('strata_inference_errors_total{node="edge", model="digits"}'),
            prometheus.value('strata_inference_client_errors_total{node="edge", model="digits"}'),
            prometheus.value('strata_inference_shed_total{node="edge", model="digits"}'),
        )
        assert telemetry == (REQUESTS + 1, 1, 1, 0)
        assert prometheus.value('sum(strata_nodes{job="strata-control-plane", online="true"})') == 1
        assert prometheus.value('strata_model_version_nodes{model="digits", version="1"}') == 1
        assert (prometheus.value('strata_telemetry_batches_total{job="strata-control-plane"}') or 0) >= 1
        up = prometheus.query("up")
        assert {dict(labels)["job"]: value for labels, value in up.items()} == {
            "strata-control-plane": 1.0,
            "strata-agents": 1.0,
        }

        # The dashboard's metrics are all ones this fleet exports, and each of its queries answers on it.
        exported = set(prometheus.api("label/__name__/values"))
        used = {name for _, expr in panel_queries() for name in metric_names(expr)}
        variable = re.fullmatch(r"label_values\((\w+), model\)", dashboard()["templating"]["list"][1]["definition"])
        assert variable is not None
        used.add(variable[1])
        assert used - exported == set(), f"the dashboard uses metrics strata does not export: {used - exported}"
        for title, expr in panel_queries():
            assert prometheus.query(expr), f"panel {title!r} answers nothing: {expr}"
    finally:
        prometheus.process.stop()
