"""Which profile a layout-optimized model is tied to, and the ISA facts passes read."""

from __future__ import annotations

from strata.core.profiles import HostFacts, catalog, get_profile
from strata.optimize.base import isa_profile
from strata.optimize.passes.openvino import looks_like_transformer
from strata.optimize.passes.quantize import int8_profile, needs_reduce_range


def test_isa_profile_is_the_most_specific_plain_cpu_profile() -> None:
    profiles = catalog().values()
    amd = HostFacts(arch="x86_64", cpu_vendor="AuthenticAMD", cpu_features=frozenset({"avx2", "fma", "sse4_2"}),
                    runtimes=frozenset({"onnxruntime", "openvino"}))  # fmt: skip
    assert isa_profile(amd, profiles).id == "x86_64-avx2"
    intel_vnni = HostFacts(arch="x86_64", cpu_vendor="GenuineIntel",
                           cpu_features=frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}))  # fmt: skip
    assert isa_profile(intel_vnni, profiles).id == "x86_64-avx512-vnni"
    assert isa_profile(HostFacts(arch="aarch64", cpu_features=frozenset({"asimd", "asimddp"})), profiles).id == (
        "arm64-neon-dotprod"
    )
    assert isa_profile(HostFacts(arch="riscv64"), profiles).id == "cpu-generic"


def test_reduce_range_only_where_u8s8_can_saturate() -> None:
    assert needs_reduce_range("x86_64", frozenset({"avx2"}))
    assert not needs_reduce_range("x86_64", frozenset({"avx2", "avx512_vnni"}))
    assert not needs_reduce_range("aarch64", frozenset({"asimd"}))


def test_full_range_int8_weights_measured_where_they_cannot_saturate_are_for_that_isa_only() -> None:
    # Under `qemu-x86_64 -cpu Haswell` a fused BERT layer's s8 variant scored mean cosine 0.972 where this
    # VNNI host measured 0.9992: an AVX2 node must not be offered what only a VNNI host verified.
    vnni, avx2, neon = (get_profile(p) for p in ("x86_64-avx512-vnni", "x86_64-avx2", "arm64-neon"))
    assert int8_profile(vnni, signed_weights=True, reduce_range=False) == "x86_64-avx512-vnni"
    assert int8_profile(neon, signed_weights=True, reduce_range=False) == "arm64-neon"
    assert int8_profile(avx2, signed_weights=True, reduce_range=False) == "cpu-generic"  # measured saturating
    assert int8_profile(vnni, signed_weights=True, reduce_range=True) == "cpu-generic"  # 7 bits cannot saturate
    assert int8_profile(vnni, signed_weights=False, reduce_range=False) == "cpu-generic"  # u8u8 kernels


def test_transformer_detection() -> None:
    assert looks_like_transformer(["MatMul", "Softmax", "ReduceMean", "Add"])
    assert looks_like_transformer(["MatMul", "Softmax", "LayerNormalization"])
    assert not looks_like_transformer(["MatMul", "Add", "Relu", "Softmax"])
