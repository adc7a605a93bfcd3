"""Hardware profiles: the catalog, host detection from facts, and the can-run rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.core.cpuid import cpuid_features, visible_features
from strata.core.errors import ProfileError
from strata.core.profiles import (
    HostFacts,
    VariantChoice,
    _parse_cpuinfo,
    can_run,
    catalog,
    choose_variant,
    detect_profile,
    get_profile,
    parse_catalog,
    rank_variants,
    read_host_facts,
)

EPYC_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse4_1 sse4_2 avx fma avx2 bmi2
"""

ARM_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp
CPU implementer\t: 0x41
"""


def test_catalog_has_the_profiles_edge_fleets_need() -> None:
    ids = set(catalog())
    assert len(ids) >= 6
    assert {"cpu-generic", "x86_64-avx2", "x86_64-avx512-vnni", "arm64-neon", "jetson-cuda", "intel-openvino"} <= ids


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match=r"known: .*cpu-generic"):
        get_profile("tpu-v9")


def test_cpuinfo_parsing_for_x86_and_arm() -> None:
    vendor, flags = _parse_cpuinfo(EPYC_CPUINFO)
    assert vendor == "AuthenticAMD"
    assert {"avx2", "fma"} <= flags
    vendor, flags = _parse_cpuinfo(ARM_CPUINFO)
    assert vendor is None
    assert {"asimd", "asimddp"} <= flags


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (HostFacts(arch="x86_64", cpu_vendor="AuthenticAMD", cpu_features=frozenset({"avx2", "fma"})), "x86_64-avx2"),
        (
            HostFacts(
                arch="x86_64",
                cpu_vendor="GenuineIntel",
                cpu_features=frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}),
            ),
            "x86_64-avx512-vnni",
        ),
        (
            HostFacts(
                arch="x86_64",
                cpu_vendor="GenuineIntel",
                cpu_features=frozenset({"avx2", "fma"}),
                runtimes=frozenset({"onnxruntime", "openvino"}),
            ),
            "intel-openvino",
        ),
        (HostFacts(arch="aarch64", cpu_features=frozenset({"asimd"})), "arm64-neon"),
        (HostFacts(arch="aarch64", cpu_features=frozenset({"asimd", "asimddp"})), "arm64-neon-dotprod"),
        (
            HostFacts(
                arch="aarch64",
                cpu_features=frozenset({"asimd"}),
                accelerators=frozenset({"cuda"}),
                runtimes=frozenset({"onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt"}),
            ),
            "jetson-cuda",
        ),
        (HostFacts(arch="riscv64"), "cpu-generic"),
        # AVX512_BF16 (also on every AMX CPU): bf16 is a precision of its own there; the flag as /proc/cpuinfo has it.
        (
            HostFacts(
                arch="x86_64",
                cpu_vendor="AuthenticAMD",
                cpu_features=frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}),
            ),
            "x86_64-avx512-bf16",
        ),
        # An Intel CPU with AVX-512 and OpenVINO is an AVX-512 node (whose profiles run OpenVINO too): as
        # intel-openvino (AVX2 only) it could run none of the AVX-512 variants built for it.
        (
            HostFacts(
                arch="x86_64",
                cpu_vendor="GenuineIntel",
                cpu_features=frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}),
                runtimes=frozenset({"onnxruntime", "openvino"}),
            ),
            "x86_64-avx512-vnni",
        ),
        (
            HostFacts(
                arch="x86_64",
                cpu_vendor="GenuineIntel",
                cpu_features=frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}),
                runtimes=frozenset({"onnxruntime", "openvino"}),
            ),
            "x86_64-avx512-bf16",
        ),
        # An Intel CPU without OpenVINO installed is an AVX2 CPU, not an OpenVINO target.
        (HostFacts(arch="x86_64", cpu_vendor="GenuineIntel", cpu_features=frozenset({"avx2", "fma"})), "x86_64-avx2"),
    ],
)
def test_detection_picks_the_most_specific_match(facts: HostFacts, expected: str) -> None:
    assert detect_profile(facts).id == expected


def test_bf16_is_offered_only_where_the_cpu_computes_it() -> None:
    assert "bf16" in get_profile("x86_64-avx512-bf16").precisions
    offered = {p.id for p in catalog().values() if "bf16" in p.precisions}
    assert all("avx512_bf16" in catalog()[p].cpu_features for p in offered)
    # x86 profiles list OpenVINO after onnxruntime: where it is installed its variants are built and measured.
    assert all(catalog()[p].runtimes == ("onnxruntime", "openvino") for p in ("x86_64-avx2", "x86_64-avx512-vnni"))


def test_this_host_is_detected() -> None:
    facts = read_host_facts()
    assert "onnxruntime" in facts.runtimes
    assert detect_profile(facts).id in catalog()


def test_can_run_rule() -> None:
    avx2, vnni, neon, generic = (
        get_profile(p) for p in ("x86_64-avx2", "x86_64-avx512-vnni", "arm64-neon", "cpu-generic")
    )
    assert can_run(vnni, avx2, "onnxruntime")  # a superset of the features runs the AVX2 build
    assert not can_run(avx2, vnni, "onnxruntime")  # but not the other way round
    assert not can_run(neon, avx2, "onnxruntime")  # another architecture
    assert all(can_run(host, generic, "onnxruntime") for host in catalog().values())
    assert not can_run(avx2, get_profile("intel-openvino"), "openvino")
    assert not can_run(avx2, generic, "onnxruntime-cuda")


def _v(variant_id: str, profile: str, runtime: str = "onnxruntime", precision: str = "fp32") -> VariantChoice:
    return VariantChoice(id=variant_id, profile=profile, runtime=runtime, precision=precision)


def test_choice_prefers_exact_profile_then_specific_then_generic() -> None:
    variants = [
        _v("g", "cpu-generic"),
        _v("a", "x86_64-avx2"),
        _v("arm", "arm64-neon"),
        _v("ov", "intel-openvino", "openvino"),
    ]
    vnni = get_profile("x86_64-avx512-vnni")
    assert [v.id for v in rank_variants(vnni, variants)] == ["a", "g"]
    assert choose_variant(get_profile("x86_64-avx2"), variants) == variants[1]
    assert choose_variant(get_profile("arm64-neon-dotprod"), variants) == variants[2]
    assert choose_variant(get_profile("jetson-cuda"), [_v("a", "x86_64-avx2")]) is None


def test_choice_follows_runtime_and_precision_preference() -> None:
    openvino = get_profile("intel-openvino")
    variants = [_v("ort", "x86_64-avx2"), _v("ov", "intel-openvino", "openvino", "int8")]
    assert choose_variant(openvino, variants) == variants[1]
    # OpenVINO not installed on the node after all: fall back to a compatible onnxruntime build.
    assert choose_variant(openvino, variants, available_runtimes=frozenset({"onnxruntime"})) == variants[0]
    avx2 = get_profile("x86_64-avx2")
    both = [_v("fp32", "x86_64-avx2"), _v("int8", "x86_64-avx2", precision="int8")]
    assert choose_variant(avx2, both) == both[1]


def test_malformed_catalogs_are_refused() -> None:
    with pytest.raises(ProfileError, match="no 'profiles' list"):
        parse_catalog({})
    entry = get_profile("cpu-generic").to_json()
    with pytest.raises(ProfileError, match="listed twice"):
        parse_catalog({"profiles": [entry, entry]})
    with pytest.raises(ProfileError, match="unknown runtimes"):
        parse_catalog({"profiles": [{**entry, "runtimes": ["tflite-gpu"]}]})


def test_a_gpu_runtime_needs_a_session_made_on_its_provider() -> None:
    """onnxruntime-gpu lists CUDA where libcudart or cuDNN cannot load, then makes sessions on the CPU."""
    from strata.core.profiles import proven_runtimes

    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cuda_first = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert proven_runtimes(available, {"CUDAExecutionProvider": cuda_first}) == {"onnxruntime-cuda"}
    # listed, but the session fell back to the CPU, or could not be made at all
    assert proven_runtimes(available, {"CUDAExecutionProvider": ["CPUExecutionProvider"]}) == frozenset()
    assert proven_runtimes(available, {"CUDAExecutionProvider": None, "TensorrtExecutionProvider": []}) == frozenset()
    both = {
        "CUDAExecutionProvider": cuda_first,
        "TensorrtExecutionProvider": ["TensorrtExecutionProvider", *cuda_first],
    }
    assert proven_runtimes(available, both) == {"onnxruntime-cuda", "onnxruntime-tensorrt"}
    # a session report for a provider onnxruntime does not list counts for nothing
    assert proven_runtimes(["CPUExecutionProvider"], {"CUDAExecutionProvider": cuda_first}) == frozenset()


def test_the_probe_model_loads_and_runs_in_this_onnxruntime() -> None:
    from strata.core.profiles import onnxruntime_runtimes, probe_provider

    assert probe_provider("CPUExecutionProvider") == ["CPUExecutionProvider"]
    assert "onnxruntime" in onnxruntime_runtimes()


def test_isa_flags_are_the_kernels_less_what_cpuid_masks_from_this_process() -> None:
    # Haswell as `qemu-x86_64 -cpu Haswell` reports it on an AVX-512 host: leaf 1 ecx (fma, avx), leaf 7 ebx
    # (avx2, bmi1, bmi2), nothing in leaf 7 subleaf 1; /proc/cpuinfo still lists the host's AVX-512.
    registers = {
        (0, 0): (0xD, 0, 0, 0),
        (1, 0): (0, 0, 1 << 12 | 1 << 28, 0),
        (7, 0): (0, 1 << 3 | 1 << 5 | 1 << 8, 0, 0),
    }
    haswell = cpuid_features(lambda leaf, subleaf: registers.get((leaf, subleaf), (0, 0, 0, 0)))
    assert haswell == {"fma", "avx", "avx2", "bmi1", "bmi2"}  # leaf 7 lists no subleaf 1: bf16 is not read
    kernel = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "ht", "sse4_2"})
    visible = visible_features(kernel, haswell)
    assert visible == {"avx2", "fma", "ht"}  # flags CPUID does not describe (ht) are the kernel's word
    facts = HostFacts(arch="x86_64", cpu_features=visible, runtimes=frozenset({"onnxruntime", "openvino"}))
    assert detect_profile(facts).id == "x86_64-avx2"
    assert visible_features(kernel, None) == kernel  # CPUID could not be run: the kernel's flags as they are
    assert visible_features(frozenset({"avx2"}), frozenset({"avx2", "avx512f"})) == {"avx2"}  # OS-disabled stays off


def test_this_process_cpuid_agrees_with_the_kernel_on_a_plain_host() -> None:
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("CPUID is x86-64's")
    from strata.core.cpuid import read_cpuid_features

    found = read_cpuid_features()
    assert found is not None
    _, kernel = _parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    assert "avx2" not in kernel or "avx2" in found
