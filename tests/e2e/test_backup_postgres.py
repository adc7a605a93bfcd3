"""Backup and restore on PostgreSQL, the way an operator does it (pg_dump while the server runs, pg_restore into the
database after stopping it): a restored old backup cannot roll a node back, because the node refuses TUF metadata
older than what it has already seen. The SQLite twin is in test_supply_chain.py."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import push_model
from test_supply_chain import served_version, start_node, wait_for_failure

from strata.localfleet import LocalFleet
from strata.testing.postgres import SUPERUSER, PostgresCluster
from strata.trust.signing import create_release_key


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster.start() as running:
        yield running


def _pg(cluster: PostgresCluster, tool: str, *args: str) -> None:
    argv = [str(cluster.bin_dir / tool), "-h", str(cluster.root), "-p", str(cluster.port), "-U", SUPERUSER, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_a_pg_restore_of_an_old_dump_cannot_roll_the_node_back(
    cluster: PostgresCluster, digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    private, public = create_release_key(tmp_path / "keys")
    url = cluster.create_database("strata").replace("postgresql+psycopg://", "postgresql://")
    server_args = ["--release-key", str(public), "--db", url]
    with LocalFleet(tmp_path / "fleet", poll_wait_s=5) as fleet:
        fleet.start_server(extra_args=server_args)
        start_node(fleet)
        push_model(fleet, digits_onnx, "1", tmp_path, sign_key=private)
        fleet.client.deploy("digits", "1", {"site": "lab"})
        fleet.wait_for_versions({"edge-1": {"digits": "1"}})

        dump = tmp_path / "strata.dump"
        _pg(cluster, "pg_dump", "--format=custom", "--file", str(dump), "strata")  # online, consistent
        push_model(fleet, digits_onnx_v2, "2", tmp_path, sign_key=private)
        fleet.client.deploy("digits", "2", {"site": "lab"})
        fleet.wait_for_versions({"edge-1": {"digits": "2"}})

        # The old dump comes back: it says digits 1, with TUF metadata older than what the node has seen.
        fleet.stop_server()
        _pg(cluster, "pg_restore", "--clean", "--if-exists", "--single-transaction", "-d", "strata", str(dump))
        fleet.start_server(extra_args=server_args)
        failure = wait_for_failure(fleet, "edge-1", "1")
        assert failure["kind"] == "tuf"
        assert "director metadata refused (rollback or mix-and-match)" in failure["reason"]
        assert fleet.nodes()["edge-1"]["models"] == {"digits": "2"}
        assert served_version(fleet, "edge-1") == "2"
        assert cluster.password not in (fleet.root / "logs" / "server.log").read_text(errors="replace")
