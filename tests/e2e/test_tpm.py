"""TPM-quoted attestation with real processes: a control plane that trusts one TPM manufacturer, agents on
software TPMs (swtpm) from that manufacturer and from another, and one without a TPM.

A model that requires `tpm` reaches only the node whose TPM is certified; when that node's identity files are
moved to a machine with another TPM, it loses its attestation and the model, and keeps running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from softtpm import SoftTpm
from strata.core.package import pack_tar
from strata.localfleet import LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow


@pytest.fixture
def tpms(soft_tpm_factory: Callable[..., SoftTpm]) -> dict[str, SoftTpm]:
    return {
        "acme-1": soft_tpm_factory("acme-1", manufacturer="acme"),
        "acme-2": soft_tpm_factory("acme-2", manufacturer="acme"),
        "rogue": soft_tpm_factory("rogue", manufacturer="rogue"),
    }


@pytest.fixture
def tpm_fleet(tmp_path: Path, tpms: dict[str, SoftTpm]) -> Iterator[LocalFleet]:
    """A control plane started with `--tpm-ca` for acme's EK certificate CA."""
    args = [arg for path in tpms["acme-1"].ca_files for arg in ("--tpm-ca", str(path))]
    with LocalFleet(tmp_path / "fleet", poll_wait_s=10) as running:
        running.start_server(extra_args=args)
        yield running


def verdicts_of(fleet: LocalFleet, names: set[str]) -> Callable[[], dict[str, Any] | None]:
    def ready() -> dict[str, Any] | None:
        nodes = fleet.nodes()
        if names <= set(nodes) and all(nodes[name].get("attestation_detail") for name in names):
            return nodes
        return None

    return ready


def test_a_model_that_requires_a_tpm_reaches_only_the_node_with_a_certified_one(
    tpm_fleet: LocalFleet, tpms: dict[str, SoftTpm], digits_onnx: Path, tmp_path: Path
) -> None:
    fleet = tpm_fleet
    fleet.start_agent("trusted", labels={"site": "a"}, extra_args=["--tpm", tpms["acme-1"].tcti])
    fleet.start_agent("plain", labels={"site": "a"})
    fleet.start_agent("rogue", labels={"site": "a"}, extra_args=["--tpm", tpms["rogue"].tcti])

    nodes = fleet.wait_for(verdicts_of(fleet, {"trusted", "plain", "rogue"}), 90, "three nodes to attest")
    assert nodes["trusted"]["attestation"] == "tpm", nodes["trusted"]
    assert "quoted by the node's TPM" in nodes["trusted"]["attestation_detail"]
    assert nodes["trusted"]["tpm_ek"]
    assert nodes["plain"]["attestation"] == "software"
    # The rogue TPM's EK certificate is not from a trusted manufacturer: registration refused, and the node
    # attests without it.
    assert nodes["rogue"]["attestation"] == "software"
    assert nodes["rogue"]["tpm_ek"] is None
    assert "not issued by a trusted TPM manufacturer CA" in fleet.agents["rogue"].process.log_tail(200)

    package = build_package(
        digits_onnx, tmp_path / "pkg", name="digits", version="1", policy={"required_attestation": "tpm"}
    )
    pack_tar(package, tmp_path / "pkg.tar")
    fleet.client.push_package(tmp_path / "pkg.tar")
    fleet.client.deploy("digits", "1", {"site": "a"})
    fleet.wait_for_versions({"trusted": {"digits": "1"}, "plain": {}, "rogue": {}})
    for name in ("plain", "rogue"):
        assert not list((fleet.agents[name].data_dir / "packages").iterdir())  # not even downloaded

    # The trusted node's identity files moved to a machine with another (genuine) TPM: the node stays bound to
    # the TPM it registered, so the new one is refused, its unquoted report is not attested, and the model that
    # requires a TPM leaves it. The agent keeps running.
    fleet.agents["trusted"].process.stop()
    fleet.start_agent("trusted", labels={"site": "a"}, extra_args=["--tpm", tpms["acme-2"].tcti], enroll=False)

    def lost() -> dict[str, Any] | None:
        node = fleet.nodes()["trusted"]
        return node if node["attestation"] is None and node.get("attestation_detail") else None

    node = fleet.wait_for(lost, 90, "the moved node to lose its attestation")
    assert "registered a TPM, but its report came without a quote" in node["attestation_detail"]
    assert "bound to another TPM" in fleet.agents["trusted"].process.log_tail(200)
    fleet.wait_for_versions({"trusted": {}, "plain": {}, "rogue": {}})
    assert fleet.agent_live("trusted")
