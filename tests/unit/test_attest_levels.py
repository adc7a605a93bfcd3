"""Attestation levels (pure): which level meets which requirement, required PCR values, and how a TPM quote's
outcome changes the software verdict."""

from __future__ import annotations

import pytest

from strata.core.attest import Verdict, judge_tpm, meets, parse_pcr_requirements
from strata.core.errors import ConfigError
from strata.core.policy import ModelFacts, NodeFacts, Policy, evaluate
from strata.trust.tpm_verify import strip_der_padding

SOFTWARE_OK = Verdict(True, "software", "agent code and 1 active package attested")
SOFTWARE_BAD = Verdict(False, None, "agent code sha256:x is not on the release allowlist")


@pytest.mark.parametrize(
    ("offered", "wanted", "ok"),
    [
        ("tpm", "tpm", True),
        ("tpm", "software", True),
        ("software", "tpm", False),
        ("software", "software", True),
        (None, "software", False),
        ("", "tpm", False),
        (None, "", True),
        (None, "none", True),
        ("tpm", "sev-snp", False),  # an unknown level is met only by itself
        ("sev-snp", "sev-snp", True),
    ],
)
def test_levels_are_ordered(offered: str | None, wanted: str, ok: bool) -> None:
    assert meets(offered, wanted) is ok


def test_a_tpm_node_meets_a_policy_that_requires_software() -> None:
    policy = Policy.from_json({"required_attestation": "software"})
    model = ModelFacts("m", "1")
    assert evaluate(policy, model, NodeFacts.of("n", "device", "p", {}, attestation="tpm")).allowed
    strict = Policy.from_json({"required_attestation": "tpm"})
    refused = evaluate(strict, model, NodeFacts.of("n", "device", "p", {}, attestation="software"))
    assert not refused.allowed
    assert "requires tpm attestation; node offers software" in refused.reason


def test_pcr_requirements_parse_and_refuse_nonsense() -> None:
    assert parse_pcr_requirements(["SHA256:07=AB12", "sha256:0=00"]) == {"sha256:7": "ab12", "sha256:0": "00"}
    for bad in ["sha256:7", "7=ab", "sha256:x=ab", "sha256:7=zz", "sha256:7="]:
        with pytest.raises(ConfigError, match="PCR"):
            parse_pcr_requirements([bad])


def test_judge_tpm() -> None:
    # No TPM registered: the software verdict stands (a quote it cannot check is said so).
    assert judge_tpm(SOFTWARE_OK, False, False, None, None) == SOFTWARE_OK
    unchecked = judge_tpm(SOFTWARE_OK, False, True, None, None)
    assert unchecked.level == "software"
    assert "not checked" in unchecked.reason
    # A failed software verdict is never rescued by a quote.
    rejected = judge_tpm(SOFTWARE_BAD, True, True, None, None)
    assert (rejected.attested, rejected.level, rejected.reason) == (False, None, SOFTWARE_BAD.reason)
    assert rejected.tpm_registered is True  # the node learns the control plane holds its TPM
    # Registered: a good quote earns tpm; a missing, bad or off-policy one earns nothing at all.
    assert judge_tpm(SOFTWARE_OK, True, True, None, None).level == "tpm"
    missing = judge_tpm(SOFTWARE_OK, True, False, None, None)
    assert (missing.attested, missing.level) == (False, None)
    bad = judge_tpm(SOFTWARE_OK, True, True, "not signed by this node's registered attestation key", None)
    assert (bad.attested, bad.level) == (False, None)
    assert "refused" in bad.reason
    off = judge_tpm(SOFTWARE_OK, True, True, None, "PCR sha256:7 is 11..., not the required 00...")
    assert (off.attested, off.level) == (False, None)
    assert "boot state" in off.reason


def test_an_ek_certificate_padded_in_nv_is_read() -> None:
    der = bytes.fromhex("3082000a") + b"\x01" * 10
    assert strip_der_padding(der + b"\xff" * 20) == der
    assert strip_der_padding(b"\x30\x03abc" + b"\0" * 5) == b"\x30\x03abc"
    assert strip_der_padding(b"junk") == b"junk"
