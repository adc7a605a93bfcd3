"""The node's pure decisions over TUF targets: the two repositories agree, the desired state names the signed
package, and the node's profile can run it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from strata.core.errors import MetadataError
from strata.core.profiles import get_profile
from strata.trust.targets import TargetFacts, check_agreement, check_desired, check_profile, target_path

IMAGE = TargetFacts(
    path="digits/2/x86_64-avx2-fp32",
    length=812,
    sha256="a" * 64,
    name="digits",
    version="2",
    variant="x86_64-avx2-fp32",
    profile="x86_64-avx2",
    runtime="onnxruntime",
    precision="fp32",
)
DESIRED = {
    "id": "x86_64-avx2-fp32",
    "profile": "x86_64-avx2",
    "runtime": "onnxruntime",
    "precision": "fp32",
    "digest": "sha256:" + "a" * 64,
}


def test_agreeing_repositories_and_an_honest_desired_state_pass() -> None:
    assert target_path("digits", "2", "x86_64-avx2-fp32") == IMAGE.path
    check_agreement(IMAGE, replace(IMAGE))
    check_desired(IMAGE, "digits", "2", DESIRED)
    check_profile(IMAGE, get_profile("x86_64-avx512-vnni"), frozenset({"onnxruntime"}))
    assert TargetFacts.from_json(IMAGE.to_json()) == IMAGE


@pytest.mark.parametrize(
    ("change", "named"),
    [({"sha256": "b" * 64}, "sha256"), ({"length": 813}, "length"), ({"profile": "cpu-generic"}, "profile")],
)
def test_the_director_and_image_must_describe_the_same_package(change: dict[str, object], named: str) -> None:
    with pytest.raises(MetadataError, match=rf"disagree about digits/2/x86_64-avx2-fp32: {named}"):
        check_agreement(IMAGE, replace(IMAGE, **change))


def test_the_desired_state_must_name_the_signed_package() -> None:
    with pytest.raises(MetadataError, match=r"digest sha256:b+ \(signed: sha256:a+\)"):
        check_desired(IMAGE, "digits", "2", {**DESIRED, "digest": "sha256:" + "b" * 64})
    with pytest.raises(MetadataError, match=r"version '1' \(signed: '2'\)"):
        check_desired(IMAGE, "digits", "1", DESIRED)


def test_a_package_for_a_profile_the_node_cannot_run_is_refused() -> None:
    with pytest.raises(MetadataError, match="which this node's profile arm64-neon cannot run"):
        check_profile(IMAGE, get_profile("arm64-neon"))
    with pytest.raises(MetadataError, match="which this node's profile cpu-generic cannot run"):
        check_profile(IMAGE, get_profile("cpu-generic"))
    with pytest.raises(MetadataError, match="needs the onnxruntime runtime"):
        check_profile(IMAGE, get_profile("x86_64-avx2"), frozenset({"openvino"}))
    with pytest.raises(MetadataError, match="unknown profile"):
        check_profile(replace(IMAGE, profile="quantum-9000"), get_profile("x86_64-avx2"))


def test_malformed_targets_are_refused() -> None:
    with pytest.raises(MetadataError, match="no sha256"):
        TargetFacts.parse(IMAGE.path, 5, {"sha512": "x"}, IMAGE.custom())
    with pytest.raises(MetadataError, match="malformed length"):
        TargetFacts.parse(IMAGE.path, True, {"sha256": "a" * 64}, IMAGE.custom())
    with pytest.raises(MetadataError, match=r"lacks the package facts \['profile'\]"):
        TargetFacts.parse(IMAGE.path, 5, {"sha256": "a" * 64}, {**IMAGE.custom(), "profile": ""})
