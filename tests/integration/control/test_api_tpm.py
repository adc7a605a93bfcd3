"""TPM-quoted attestation against real software TPMs (swtpm): registering an attestation key by credential
activation against a certified endorsement key, quotes over the report, and every way to get either wrong.

The node's side is the agent's own code (`NodeTpm`, which runs `python -m strata.trust.tpm` children); the
control plane is the real app over a real SQLite file.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from control_harness import Harness, NodeCredentials, StartServer
from test_api_attestation import report_for, send

from softtpm import SoftTpm
from strata.agent.attestation import NodeTpm
from strata.control.settings import ServerSettings
from strata.core.attest import Report
from strata.core.errors import ConfigError
from strata.core.package import tar_bytes
from strata.core.policy import Policy
from strata.package_build import build_package
from strata.trust.tpm import AK_ATTRIBUTES

pytestmark = pytest.mark.slow


@pytest.fixture
def acme(soft_tpm_factory: Callable[..., SoftTpm]) -> SoftTpm:
    """A TPM from the manufacturer the control plane trusts."""
    return soft_tpm_factory("acme-1", manufacturer="acme")


@pytest.fixture
def tpm_server(settings: ServerSettings, start_server: StartServer, acme: SoftTpm) -> Iterator[Harness]:
    """A control plane that trusts acme's EK certificates; its clock is now (the EK certificates' validity)."""
    with start_server(replace(settings, tpm_cas=tuple(acme.ca_files))) as harness:
        harness.clock.now = time.time()
        yield harness


def challenge(server: Harness, node: NodeCredentials, identity: dict[str, Any]) -> Any:
    body = {key: identity[key] for key in ("ek_public", "ek_certificate", "ak_public")}
    return server.client.post(f"/v1/nodes/{node.node_id}/tpm/challenge", json=body, headers=node.headers)


def activate(server: Harness, node: NodeCredentials, secret: str) -> Any:
    return server.client.post(f"/v1/nodes/{node.node_id}/tpm/activate", json={"secret": secret}, headers=node.headers)


def register(server: Harness, node: NodeCredentials, tpm: NodeTpm) -> dict[str, Any]:
    asked = challenge(server, node, tpm.identify())
    assert asked.status_code == 200, asked.text
    answer = activate(server, node, tpm.activate(asked.json()))
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def send_quoted(server: Harness, node: NodeCredentials, report: Report, quote: dict[str, Any] | None) -> dict[str, Any]:
    """Sign the report with the node key, attach `quote`, send; the verdict."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    assert node.key is not None
    signature = base64.b64encode(node.key.sign(report.payload(), ec.ECDSA(hashes.SHA256()))).decode()
    body: dict[str, Any] = {"report": report.to_json(), "signature": signature}
    if quote is not None:
        body["quote"] = quote
    response = server.client.post(f"/v1/nodes/{node.node_id}/attestation", json=body, headers=node.headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def quote_over(tpm: SoftTpm, report: Report, selection: str) -> dict[str, Any]:
    """A quote by the node's AK over the PCRs `selection` names (tpm2-tools syntax; "" for none)."""
    from tpm2_pytss import TPM2_ALG, TPML_PCR_SELECTION, TPMT_SIG_SCHEME

    from strata.trust.tpm import attestation_key, connect, loaded

    pcrs = TPML_PCR_SELECTION.parse(selection) if selection else TPML_PCR_SELECTION()
    with connect(tpm.tcti) as ectx, loaded(ectx, attestation_key(ectx)[0]) as ak:
        _, _, values = ectx.pcr_read(pcrs) if selection else (None, None, None)
        qualifying = hashlib.sha256(report.payload()).digest()
        quoted, signature = ectx.quote(ak, pcrs, qualifying, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
    indices = [int(i) for i in selection.partition(":")[2].split(",") if i]
    reported = {str(i): bytes(d).hex() for i, d in zip(indices, values.digests if values else [], strict=True)}
    return {
        "quoted": base64.b64encode(bytes(quoted)).decode(),
        "signature": base64.b64encode(signature.marshal()).decode(),
        "pcrs": {"sha256": reported} if selection else {},
    }


def ecc_ek_of(tpm: SoftTpm) -> dict[str, Any]:
    """The TPM's other certified EK (ECC P-384, high range), as the node would present it."""
    from tpm2_pytss import ESYS_TR, TPM2B_SENSITIVE_CREATE
    from tpm2_pytss.utils import create_ek_template

    from strata.trust.tpm import connect, loaded, nv_reader

    with connect(tpm.tcti) as ectx:
        certificate, template = create_ek_template("EK-HIGH-ECC384", nv_reader(ectx))
        handle, public, *_ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
        with loaded(ectx, handle):
            pass
    assert certificate
    return {
        "ek_public": base64.b64encode(public.marshal()).decode(),
        "ek_certificate": base64.b64encode(certificate).decode(),
    }


def test_a_node_with_a_certified_tpm_attests_at_tpm_level(
    tpm_server: Harness, acme: SoftTpm, digits_onnx: Path, tmp_path: Path
) -> None:
    server = tpm_server
    node = server.enroll("edge")
    tpm = NodeTpm(acme.tcti)
    registered = register(server, node, tpm)
    assert registered["registered"] is True
    report = report_for(server, node)
    verdict = send_quoted(server, node, report, tpm.quote(report.payload()))
    assert verdict["level"] == "tpm", verdict
    view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert view["attestation"] == "tpm"
    assert view["tpm_ek"] == registered["ek"]
    assert sorted(view["tpm_pcrs"]["sha256"], key=int) == [str(i) for i in range(8)]

    # Placement: `tpm` meets a model that requires tpm and one that requires software; a software-attested node
    # meets only the latter.
    plain = server.enroll("plain")
    assert send(server, plain, report_for(server, plain)).json()["level"] == "software"
    for name, level in (("needs-tpm", "tpm"), ("needs-software", "software")):
        policy = Policy.from_json(yaml.safe_load(f"required_attestation: {level}"))
        package = build_package(digits_onnx, tmp_path / name, name=name, version="1", policy=policy.to_json())
        assert server.upload(tar_bytes(package)).status_code == 201
        server.deploy(name, "1")
    assert sorted(m["name"] for m in server.desired(node).json()["models"]) == ["needs-software", "needs-tpm"]
    assert [m["name"] for m in server.desired(plain).json()["models"]] == ["needs-software"]


def test_tpm_registration_refusals(
    tpm_server: Harness, acme: SoftTpm, soft_tpm_factory: Callable[..., SoftTpm]
) -> None:
    server = tpm_server
    node = server.enroll("edge")
    tpm = NodeTpm(acme.tcti)
    identity = tpm.identify()

    # A TPM from a manufacturer the server does not trust (its own EK CA).
    stranger = NodeTpm(soft_tpm_factory("rogue", manufacturer="rogue").tcti)
    other = NodeTpm(soft_tpm_factory("acme-2", manufacturer="acme").tcti)
    server.clock.now = time.time()  # after those TPMs were made (their EK certificates start now)
    refused = challenge(server, node, stranger.identify())
    assert refused.status_code == 401
    assert "not issued by a trusted TPM manufacturer CA" in refused.json()["error"]

    # No EK certificate: nothing proves it is a TPM.
    refused = challenge(server, node, {**identity, "ek_certificate": None})
    assert refused.status_code == 401
    assert "no EK certificate" in refused.json()["error"]

    # The certified EK of this TPM, with another TPM's key as the "AK": the challenge is bound to that key's
    # name, and this TPM, not holding it, cannot recover the secret.
    mixed = challenge(server, node, {**identity, "ak_public": other.identify()["ak_public"]})
    assert mixed.status_code == 200, mixed.text
    with pytest.raises(ConfigError, match=r"TPM activate \(swtpm:.*\) failed: TPM error"):
        tpm.activate(mixed.json())
    # ... and a node that answers with a guess is refused.
    guessed = activate(server, node, base64.b64encode(b"\0" * 32).decode())
    assert guessed.status_code == 401
    assert "credential activation failed" in guessed.json()["error"]
    # The challenge is spent: answering again, even correctly, needs a new one.
    assert activate(server, node, base64.b64encode(b"\0" * 32).decode()).status_code == 401

    # An AK that is not a restricted signing key could sign a forged quote; one of another algorithm, or with a
    # policy, is not the key the node makes: refused before any challenge.
    from tpm2_pytss import TPM2B_PUBLIC

    for template, attributes, error in (
        ("ecc256:ecdsa-sha256:null", "fixedtpm|fixedparent|sensitivedataorigin|sign|userwithauth", "restricted"),
        ("rsa2048:rsassa-sha256:null", AK_ATTRIBUTES, "not ECC P-256 with ECDSA-SHA256"),
        ("ecc256:ecdsa-sha1:null", AK_ATTRIBUTES, "not ECC P-256 with ECDSA-SHA256"),
        ("ecc256:ecdsa-sha256:null", AK_ATTRIBUTES + "|adminwithpolicy", "authorization policy"),
    ):
        odd = TPM2B_PUBLIC.parse(template, objectAttributes=attributes)
        refused = challenge(server, node, {**identity, "ak_public": base64.b64encode(odd.marshal()).decode()})
        assert refused.status_code == 401, template
        assert error in refused.json()["error"]

    # The same TPM's other certified EK (ECC P-384): one TPM must not answer for two nodes, so only the TCG
    # default RSA 2048 EK is taken.
    refused = challenge(server, node, {**identity, **ecc_ek_of(acme)})
    assert refused.status_code == 401
    assert "not the TCG default EK-RSA2048 EK" in refused.json()["error"]
    # Another TPM's EK certificate beside this TPM's EK.
    refused = challenge(server, node, {**identity, "ek_certificate": other.identify()["ek_certificate"]})
    assert refused.status_code == 401
    assert "certifies another key" in refused.json()["error"]
    # Not a public area at all.
    refused = challenge(server, node, {**identity, "ek_public": base64.b64encode(b"\x00\x04junk").decode()})
    assert refused.status_code == 401
    # A certificate not valid yet at the server's time.
    server.clock.now -= 86400
    refused = challenge(server, node, identity)
    assert refused.status_code == 401
    assert "not valid now" in refused.json()["error"]
    server.clock.now += 86400

    # Nothing was registered by any of that.
    view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert view["tpm_ek"] is None

    # One TPM, one node: a second node presenting the same TPM is refused; and the first stays bound to it.
    register(server, node, tpm)
    second = server.enroll("copy")
    refused = challenge(server, second, identity)
    assert refused.status_code == 409
    assert "registered to another node" in refused.json()["error"]
    refused = challenge(server, node, other.identify())
    assert refused.status_code == 409
    assert "bound to another TPM" in refused.json()["error"]


def test_a_server_without_manufacturer_cas_refuses_tpm_registration(
    server: Harness, soft_tpm_factory: Callable[..., SoftTpm]
) -> None:
    tpm = NodeTpm(soft_tpm_factory("acme-1").tcti)
    server.clock.now = time.time()
    node = server.enroll("edge")
    refused = challenge(server, node, tpm.identify())
    assert refused.status_code == 401
    assert "trusts no TPM manufacturer" in refused.json()["error"]


def test_bad_quotes_leave_the_node_unattested(
    tpm_server: Harness, acme: SoftTpm, soft_tpm_factory: Callable[..., SoftTpm]
) -> None:
    server = tpm_server
    node = server.enroll("edge")
    tpm = NodeTpm(acme.tcti)
    register(server, node, tpm)
    old = report_for(server, node)
    old_quote = tpm.quote(old.payload())
    assert send_quoted(server, node, old, old_quote)["level"] == "tpm"

    def verdict(quote: dict[str, Any] | None) -> dict[str, Any]:
        answer = send_quoted(server, node, report_for(server, node), quote)
        view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
        assert view["attestation"] == answer["level"]
        return answer

    # A quote from an earlier report (replayed with a fresh, correctly signed report).
    answer = verdict(old_quote)
    assert answer["attested"] is False
    assert "qualifying data does not match" in answer["reason"]
    # Lying about the PCR values the quote covers.
    fresh = report_for(server, node)
    quote = tpm.quote(fresh.payload())
    quote["pcrs"]["sha256"]["7"] = "11" * 32
    answer = send_quoted(server, node, fresh, quote)
    assert answer["attested"] is False
    assert "not the ones the TPM quoted" in answer["reason"]
    # A quote made by another (genuine) TPM's AK.
    other = NodeTpm(soft_tpm_factory("acme-2", manufacturer="acme").tcti)
    server.clock.now = time.time()
    fresh = report_for(server, node)
    answer = send_quoted(server, node, fresh, other.quote(fresh.payload()))
    assert answer["attested"] is False
    assert "not signed by this node's registered attestation key" in answer["reason"]
    # A bit flipped in the quoted structure.
    fresh = report_for(server, node)
    quote = tpm.quote(fresh.payload())
    raw = bytearray(base64.b64decode(quote["quoted"]))
    raw[-1] ^= 1
    quote["quoted"] = base64.b64encode(bytes(raw)).decode()
    answer = send_quoted(server, node, fresh, quote)
    assert answer["attested"] is False
    assert "not signed by this node's registered attestation key" in answer["reason"]
    # No quote at all from a node that registered a TPM: not attested (no quiet fall-back to software).
    answer = verdict(None)
    assert answer["attested"] is False
    assert "without a quote" in answer["reason"]
    # Garbage in the quote's fields: a stated refusal, not a server error.
    answer = verdict({"quoted": "not base64!", "signature": "", "pcrs": {}})
    assert answer["attested"] is False
    assert "the quote is not base64" in answer["reason"]
    answer = verdict({"quoted": base64.b64encode(b"\xff" * 7).decode(), "signature": "AAAA", "pcrs": {}})
    assert answer["attested"] is False
    assert "does not unmarshal" in answer["reason"]
    # A genuine quote by the registered AK over no PCRs at all (chosen by a changed agent): no boot evidence.
    fresh = report_for(server, node)
    answer = send_quoted(server, node, fresh, quote_over(acme, fresh, ""))
    assert answer["attested"] is False
    assert "covers no PCRs, not sha256:0-7" in answer["reason"]
    fresh = report_for(server, node)
    answer = send_quoted(server, node, fresh, quote_over(acme, fresh, "sha256:0"))
    assert "covers sha256:0, not sha256:0-7" in answer["reason"]
    # And an honest quote restores it.
    fresh = report_for(server, node)
    assert send_quoted(server, node, fresh, tpm.quote(fresh.payload()))["level"] == "tpm"


def test_required_pcr_values_catch_another_boot_state(
    settings: ServerSettings, start_server: StartServer, acme: SoftTpm
) -> None:
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    zero = "00" * 32
    extended = hashlib.sha256(bytes(32) + hashlib.sha256(b"secure boot off").digest()).hexdigest()
    with start_server(replace(settings, tpm_cas=tuple(acme.ca_files), tpm_pcrs=(f"sha256:7={zero}",))) as server:
        server.clock.now = time.time()
        node = server.enroll("edge")
        tpm = NodeTpm(acme.tcti)
        register(server, node, tpm)
        report = report_for(server, node)
        assert send_quoted(server, node, report, tpm.quote(report.payload()))["level"] == "tpm"

        # Something measured into PCR 7 (the Secure Boot policy PCR) after that.
        ectx = ESAPI(acme.tcti)
        measured = hashlib.sha256(b"secure boot off").digest()
        digests = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=measured))])
        ectx.pcr_extend(ESYS_TR.PCR7, digests)
        ectx.close()

        report = report_for(server, node)
        answer = send_quoted(server, node, report, tpm.quote(report.payload()))
        assert answer["attested"] is False
        assert "another boot state" in answer["reason"]
        assert "PCR sha256:7" in answer["reason"]
        view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
        assert view["tpm_pcrs"]["sha256"]["7"] == extended


def test_reenrolling_or_revoking_a_node_frees_its_tpm(tpm_server: Harness, acme: SoftTpm) -> None:
    server = tpm_server
    tpm = NodeTpm(acme.tcti)
    node = server.enroll("edge")
    register(server, node, tpm)
    report = report_for(server, node)
    assert send_quoted(server, node, report, tpm.quote(report.payload()))["level"] == "tpm"

    # The operator enrolls the machine again (a new key under the same name): what was known of the old
    # credential's machine is forgotten, its attestation included, and the TPM is registered again.
    again = server.enroll("edge", reenroll=True)
    assert again.node_id == node.node_id
    view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert (view["attestation"], view["tpm_ek"]) == (None, None)
    register(server, again, tpm)

    # Revoked: the TPM is free for the machine enrolled under another name.
    assert server.client.delete(f"/v1/nodes/{node.node_id}", headers=server.admin).status_code == 204
    renamed = server.enroll("edge-b")
    assert register(server, renamed, tpm)["registered"] is True
