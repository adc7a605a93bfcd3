"""Replicas: two `strata server` processes on one data folder (one SQLite database, blob store, CA and TUF keys)
serve one fleet. A deploy made through one reaches a node long-polling the other within a second; the rollout
driver runs on the one replica holding its lease, and when that replica is SIGKILLed mid-rollout the other carries
the rollout on, applying nothing twice; one enrollment token, one attestation nonce and one rollout action raced
through both replicas at once take effect once.
"""

from __future__ import annotations

import base64
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from strata.control_client import ControlClient
from strata.core.attest import Report, strata_code_hash
from strata.core.package import pack_tar
from strata.localfleet import LocalFleet
from strata.package_build import build_package
from strata.testing.postgres import PostgresCluster

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path / "fleet", poll_wait_s=10) as running:
        running.start_server()  # replica "a": it starts first, so it takes the rollout lease
        running.start_replica("b")
        yield running


def race(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Run the calls at the same moment, one thread each; return their answers in order."""
    barrier = threading.Barrier(len(calls))
    answers: list[httpx.Response | None] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        answers[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(answer is not None for answer in answers)
    return [answer for answer in answers if answer is not None]


def enroll_body(
    token: str, name: str, key: ec.EllipticCurvePrivateKey, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return {
        "token": token,
        "name": name,
        "tier": "device",
        "labels": labels or {},
        "profile": "cpu-generic",
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
    }


class Node:
    """A node enrolled by hand: its key and certificate files, for mutual-TLS calls to any replica."""

    def __init__(self, fleet: LocalFleet, folder: Path, answer: dict[str, Any], key: ec.EllipticCurvePrivateKey):
        self.node_id: str = answer["node_id"]
        self.key = key
        folder.mkdir(parents=True, exist_ok=True)
        self.cert_path = folder / "node.pem"
        self.key_path = folder / "node.key"
        self.cert_path.write_text(answer["certificate"])
        self.key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.ca = str(fleet.ca_path)

    def client(self, url: str) -> httpx.Client:
        context = ssl.create_default_context(cafile=self.ca)
        context.load_cert_chain(self.cert_path, self.key_path)
        return httpx.Client(base_url=url, verify=context, timeout=60)


def enroll(fleet: LocalFleet, url: str, name: str, folder: Path, labels: dict[str, str] | None = None) -> Node:
    token = str(fleet.client.create_enrollment_token(600, name, "device", labels or {})["token"])
    key = ec.generate_private_key(ec.SECP256R1())
    answer = httpx.post(f"{url}/v1/enroll", json=enroll_body(token, name, key, labels), verify=fleet.tls(), timeout=30)
    assert answer.status_code == 201, answer.text
    return Node(fleet, folder / name, answer.json(), key)


def lease_holder_pid(fleet: LocalFleet) -> int | None:
    with sqlite3.connect(fleet.server_dir / "strata.db") as db:
        row = db.execute("SELECT holder, expires_at FROM leases WHERE name = 'rollouts'").fetchone()
    if row is None or row[1] < time.time():
        return None
    return int(row[0].split(":")[-2])


def push(fleet: LocalFleet, model: Path, version: str, workdir: Path) -> None:
    package = build_package(model, workdir / f"digits-{version}", name="digits", version=version)
    tar = workdir / f"digits-{version}.tar"
    pack_tar(package, tar)
    fleet.client.push_package(tar)


def wait_for_versions(fleet: LocalFleet, client: ControlClient, expected: dict[str, str], timeout: float) -> None:
    def reached() -> bool:
        nodes = {n["name"]: n for n in client.nodes()}
        return all(nodes.get(name, {}).get("models") == {"digits": v} for name, v in expected.items())

    fleet.wait_for(reached, timeout, f"nodes to run {expected}")


def test_a_deploy_through_one_replica_wakes_a_long_poll_on_the_other_within_a_second(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    replica_b = fleet.replicas["b"]
    fleet.start_agent("agent-b", labels={"fleet": "x"}, server_url=replica_b.url)
    node = enroll(fleet, replica_b.url, "watcher", tmp_path / "nodes", {"fleet": "x"})
    push(fleet, digits_onnx, "1", tmp_path)
    with node.client(replica_b.url) as on_b:
        first = on_b.get(f"/v1/nodes/{node.node_id}/desired")
        assert first.status_code == 200, first.text
        etag = first.headers["etag"]
        for attempt in range(3):  # three deploys, each must wake the poll on B within a second
            answered: dict[str, Any] = {}

            def poll(etag: str = etag, answered: dict[str, Any] = answered) -> None:
                response = on_b.get(
                    f"/v1/nodes/{node.node_id}/desired", params={"wait": 30}, headers={"If-None-Match": etag}
                )
                answered["at"] = time.monotonic()
                answered["response"] = response

            poller = threading.Thread(target=poll)
            poller.start()
            time.sleep(1.0)  # the poll is waiting on B
            assert "at" not in answered
            selector = {"fleet": "x"} if attempt % 2 == 0 else {}
            fleet.client.deploy("digits", "1", selector)  # through A
            deployed = time.monotonic()
            poller.join(30)
            response = answered["response"]
            assert response.status_code == 200, response.text
            assert response.headers["etag"] != etag
            assert answered["at"] - deployed < 1.0, f"B's long poll woke {answered['at'] - deployed:.2f}s after"
            etag = response.headers["etag"]
    # The agent long-polling B runs what was deployed through A.
    with fleet.replica_client("b") as client_b:
        wait_for_versions(fleet, client_b, {"agent-b": "1"}, timeout=60)


def test_one_enrollment_token_presented_to_both_replicas_at_once_enrolls_one_node(fleet: LocalFleet) -> None:
    urls = [fleet.server_url, fleet.replicas["b"].url]
    for round_ in range(4):
        token = str(fleet.client.create_enrollment_token(600)["token"])
        keys = [ec.generate_private_key(ec.SECP256R1()) for _ in urls]
        bodies = [enroll_body(token, f"racer-{round_}-{i}", key) for i, key in enumerate(keys)]
        answers = race(
            [
                lambda url=url, body=body: httpx.post(f"{url}/v1/enroll", json=body, verify=fleet.tls(), timeout=30)
                for url, body in zip(urls, bodies, strict=True)
            ]
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [201, 401], [a.text for a in answers]
    names = [n["name"] for n in fleet.client.nodes()]
    assert len([n for n in names if n.startswith("racer-")]) == 4


def csr_pem(key: ec.EllipticCurvePrivateKey) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def renewed(fleet: LocalFleet, node: Node, answer: httpx.Response, key: ec.EllipticCurvePrivateKey, at: Path) -> Node:
    assert answer.status_code == 200, answer.text
    return Node(fleet, at, {"node_id": node.node_id, "certificate": answer.json()["certificate"]}, key)


def test_a_certificate_renewed_away_through_one_replica_buys_nothing_on_the_other(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    """A node's certificate stolen before the node renewed through replica a: replica b, which had it cached, took
    it until some unrelated change moved the fleet's counter, and a renewal through b with it made the thief's the
    node's only current certificate (the real node locked out). Two renewals with one certificate raced through
    both replicas: one certificate is issued."""
    urls = [fleet.server_url, fleet.replicas["b"].url]
    node = enroll(fleet, urls[0], "renewer", tmp_path)
    stolen = node.client(urls[1])
    assert stolen.get(f"/v1/nodes/{node.node_id}").status_code == 200  # b has it cached now
    key = node.key  # the agent renews over the key it holds
    answer = node.client(urls[0]).post(f"/v1/nodes/{node.node_id}/certificate", json={"csr": csr_pem(key)})
    current = renewed(fleet, node, answer, key, tmp_path / "current")
    fleet.wait_for(
        lambda: stolen.get(f"/v1/nodes/{node.node_id}").status_code == 401, 5, "replica b to refuse the old one"
    )
    # The replaced certificate renews nothing: over another key it is refused; over the node's own key (a node whose
    # renewal answer was lost) it is given the current certificate again, and nothing is replaced.
    path = f"/v1/nodes/{node.node_id}/certificate"
    again = stolen.post(path, json={"csr": csr_pem(ec.generate_private_key(ec.SECP256R1()))})
    assert again.status_code == 401, again.text
    resent = stolen.post(path, json={"csr": csr_pem(key)})
    assert resent.status_code == 200, resent.text
    assert resent.json()["certificate"] == answer.json()["certificate"]
    for url in urls:
        assert current.client(url).get(f"/v1/nodes/{node.node_id}").status_code == 200

    for round_ in range(2):  # both replicas hold the current one cached, then two renewals race (4 live at most)
        for url in urls:
            assert current.client(url).get(f"/v1/nodes/{node.node_id}").status_code == 200
        keys = [node.key for _ in urls]
        answers = race(
            [
                lambda url=url, key=key, holder=current: holder.client(url).post(
                    f"/v1/nodes/{node.node_id}/certificate", json={"csr": csr_pem(key)}
                )
                for url, key in zip(urls, keys, strict=True)
            ]
        )
        # one certificate is issued: the renewal that lost the race is given the winner's (or, racing on before the
        # winner's commit was seen, refused)
        issued = {a.json()["certificate"] for a in answers if a.status_code == 200}
        assert len(issued) == 1, [a.text for a in answers]
        assert {a.status_code for a in answers} <= {200, 401}, [a.text for a in answers]
        winner = next(i for i, a in enumerate(answers) if a.status_code == 200)
        current = renewed(fleet, node, answers[winner], keys[winner], tmp_path / f"round-{round_}")


@pytest.fixture
def pg_fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    """Two replicas on one PostgreSQL database (a throwaway cluster)."""
    with PostgresCluster.start() as cluster, LocalFleet(tmp_path / "pg-fleet", poll_wait_s=10) as running:
        url = cluster.create_database("strata").replace("postgresql+psycopg://", "postgresql://")
        running.start_server(extra_args=["--db", url])
        running.start_replica("b")
        yield running


def test_two_variants_of_a_new_model_uploaded_through_both_replicas_at_once_are_both_registered(
    pg_fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    """CI jobs pushing each profile's variant of a new version behind a load balancer: both uploads added the model
    and version rows, and the second failed with 409 "reload and try again"."""
    fleet = pg_fleet
    urls = [fleet.server_url, fleet.replicas["b"].url]
    headers = {"Authorization": f"Bearer {fleet.admin_token}", "Content-Type": "application/x-tar"}
    for round_ in range(3):
        tars = []
        for profile in ("cpu-generic", "x86_64-avx2"):
            package = build_package(
                digits_onnx, tmp_path / f"{round_}-{profile}", name=f"model-{round_}", version="1", profile=profile
            )
            pack_tar(package, tmp_path / f"{round_}-{profile}.tar")
            tars.append((tmp_path / f"{round_}-{profile}.tar").read_bytes())
        answers = race(
            [
                lambda url=url, tar=tar: httpx.post(
                    f"{url}/v1/packages", content=tar, headers=headers, verify=fleet.tls(), timeout=60
                )
                for url, tar in zip(urls, tars, strict=True)
            ]
        )
        assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
    variants = {m["name"]: m for m in fleet.client.models()}
    for round_ in range(3):
        assert len(variants[f"model-{round_}"]["versions"][0]["variants"]) == 2, variants[f"model-{round_}"]


def test_an_attestation_nonce_issued_by_one_replica_is_accepted_by_the_other_once(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    url_a, url_b = fleet.server_url, fleet.replicas["b"].url
    node = enroll(fleet, url_a, "attested", tmp_path / "nodes")
    with node.client(url_a) as on_a, node.client(url_b) as on_b:

        def signed_report() -> dict[str, Any]:
            challenge = on_a.post(f"/v1/nodes/{node.node_id}/attestation/challenge")
            assert challenge.status_code == 200, challenge.text
            report = Report(
                node.node_id,
                challenge.json()["nonce"],
                strata_code_hash(),
                "sha256:cfg",
                ("sha256:" + "a" * 64,),
                "boot",
                1.0,
            )
            signature = node.key.sign(report.payload(), ec.ECDSA(hashes.SHA256()))
            return {"report": report.to_json(), "signature": base64.b64encode(signature).decode()}

        body = signed_report()  # nonce issued by A
        accepted = on_b.post(f"/v1/nodes/{node.node_id}/attestation", json=body)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["attested"] is True
        for replica in (on_a, on_b):  # spent, on both
            replayed = replica.post(f"/v1/nodes/{node.node_id}/attestation", json=body).json()
            assert replayed["attested"] is False
            assert "nonce" in replayed["reason"]
        # The same report sent to both replicas at the same moment is accepted once.
        for _ in range(3):
            body = signed_report()
            answers = race(
                [
                    lambda r=r, body=body: r.post(f"/v1/nodes/{node.node_id}/attestation", json=body)
                    for r in (on_a, on_b)
                ]
            )
            assert sorted(a.json()["attested"] for a in answers) == [False, True], [a.text for a in answers]


def test_the_rollout_driver_survives_its_replica_being_killed_and_applies_nothing_twice(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    replica_b = fleet.replicas["b"]
    names = [f"n{i}" for i in range(3)]
    for name in names:
        fleet.start_agent(
            name,
            labels={"fleet": "r"},
            server_url=replica_b.url,
            extra_args=["--report-interval", "1s", "--probation", "0"],
        )
    push(fleet, digits_onnx, "1", tmp_path)
    fleet.wait_for(lambda: lease_holder_pid(fleet) == fleet.server.pid if fleet.server else None, 20, "A's lease")

    def all_online() -> bool:  # as A sees them: B writes their last-seen times every presence flush
        nodes = {n["name"]: n for n in fleet.client.nodes()}
        return all(nodes.get(name, {}).get("online") for name in names)

    fleet.wait_for(all_online, 40, "the nodes to be online on A")
    # No traffic reaches these nodes: the serving gates have no data, and the rollout is let through unjudged
    # (under the default policy it would hold each wave until its deadline).
    spec = {"waves": "1,2,100%", "bake_seconds": 3, "on_no_data": "pass"}
    created = fleet.client.create_rollout({"model": "digits", "version": "1", "selector": {"fleet": "r"}, **spec})
    rollout_id = str(created["id"])
    client_b = fleet.replica_client("b")
    try:
        # One rollout action raced through both replicas is applied once.
        paused = race(
            [
                lambda url=url: httpx.post(
                    f"{url}/v1/rollouts/{rollout_id}/pause",
                    headers={"authorization": f"Bearer {fleet.admin_token}"},
                    verify=fleet.tls(),
                    timeout=30,
                )
                for url in (fleet.server_url, replica_b.url)
            ]
        )
        assert sorted(a.status_code for a in paused) == [200, 409], [a.text for a in paused]
        client_b.rollout_action(rollout_id, "resume")

        # Mid-rollout (the first wave is healthy, the rest is not done), SIGKILL the lease holder, A.
        def first_wave_done() -> bool:
            rollout = client_b.rollout(rollout_id)
            healthy = [n for n in rollout["nodes"] if n["state"] == "healthy"]
            return len(healthy) >= 1 and rollout["status"] == "running"

        fleet.wait_for(first_wave_done, 90, "the first wave to be healthy")
        assert client_b.rollout(rollout_id)["status"] == "running"
        assert fleet.server is not None
        fleet.server.kill()
        killed = time.monotonic()

        def b_holds() -> bool:
            return lease_holder_pid(fleet) == replica_b.process.pid

        fleet.wait_for(b_holds, 30, "replica b to take the rollout lease over", replica_b.process)
        took_over = time.monotonic() - killed
        assert took_over < 30

        def finished() -> dict[str, Any] | None:
            rollout = client_b.rollout(rollout_id)
            return rollout if rollout["status"] != "running" else None

        rollout = fleet.wait_for(finished, 90, "the rollout to finish on replica b", replica_b.process)
        assert rollout["status"] == "succeeded", rollout
        wait_for_versions(fleet, client_b, dict.fromkeys(names, "1"), timeout=30)
        # Nothing applied twice: every node activated version 1 exactly once.
        history = client_b.model_history("digits")
        activations = [e for e in history if e["kind"] == "activated" and e["version"] == "1"]
        assert sorted(e["node"] for e in activations) == names, history
        print(f"replica b took the rollout lease over {took_over:.1f}s after A was killed")
    finally:
        client_b.close()
