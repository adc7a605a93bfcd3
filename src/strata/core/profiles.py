"""Hardware profiles: the catalog (data in profiles.json), host detection, and which variants a profile runs.

The decisions here are pure functions of `HostFacts` and `Profile`s; `read_host_facts` is the only I/O.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from strata.core.errors import ProfileError

RUNTIMES = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

_ARCH_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


@dataclass(frozen=True)
class Profile:
    """A kind of hardware: what a variant built for it needs, and what a node of this kind offers."""

    id: str
    description: str
    arch: str
    cpu_features: frozenset[str]
    cpu_vendor: str | None
    accelerator: str | None
    runtimes: tuple[str, ...]
    precisions: tuple[str, ...]
    memory_mb: int
    rank: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "description": self.description,
            "arch": self.arch,
            "cpu_features": sorted(self.cpu_features),
            "cpu_vendor": self.cpu_vendor,
            "accelerator": self.accelerator,
            "runtimes": list(self.runtimes),
            "precisions": list(self.precisions),
            "memory_mb": self.memory_mb,
            "rank": self.rank,
        }


@dataclass(frozen=True)
class HostFacts:
    """What a machine is, as far as choosing a model variant goes."""

    arch: str
    cpu_vendor: str | None = None
    cpu_features: frozenset[str] = field(default_factory=frozenset)
    accelerators: frozenset[str] = field(default_factory=frozenset)
    runtimes: frozenset[str] = field(default_factory=lambda: frozenset({"onnxruntime"}))
    memory_mb: int | None = None


def _profile_from_json(raw: dict[str, Any]) -> Profile:
    try:
        profile = Profile(
            id=str(raw["id"]),
            description=str(raw.get("description", "")),
            arch=normalize_arch(str(raw["arch"])),
            cpu_features=frozenset(str(f) for f in raw.get("cpu_features", [])),
            cpu_vendor=raw.get("cpu_vendor"),
            accelerator=raw.get("accelerator"),
            runtimes=tuple(str(r) for r in raw["runtimes"]),
            precisions=tuple(str(p) for p in raw["precisions"]),
            memory_mb=int(raw.get("memory_mb", 0)),
            rank=int(raw.get("rank", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"profile entry {raw!r} is malformed: {exc}") from exc
    unknown = [r for r in profile.runtimes if r not in RUNTIMES]
    if unknown:
        raise ProfileError(f"profile {profile.id}: unknown runtimes {unknown}; known: {list(RUNTIMES)}")
    if not profile.runtimes:
        raise ProfileError(f"profile {profile.id} names no runtime")
    return profile


def parse_catalog(document: dict[str, Any]) -> dict[str, Profile]:
    """Parse a profiles document (the shape of profiles.json) into profiles by id.

    Raises:
        ProfileError: the document is malformed or names a profile twice.
    """
    entries = document.get("profiles")
    if not isinstance(entries, list) or not entries:
        raise ProfileError("profile catalog has no 'profiles' list")
    catalog: dict[str, Profile] = {}
    for raw in entries:
        profile = _profile_from_json(raw)
        if profile.id in catalog:
            raise ProfileError(f"profile {profile.id} is listed twice")
        catalog[profile.id] = profile
    return catalog


@cache
def catalog() -> dict[str, Profile]:
    """The built-in catalog shipped with strata (profiles.json)."""
    # Read beside this module rather than with importlib.resources, which costs the agent 0.7 MB resident.
    text = Path(__file__).with_name("profiles.json").read_text()
    return parse_catalog(json.loads(text))


def get_profile(profile_id: str) -> Profile:
    """The built-in profile with this id.

    Raises:
        ProfileError: no such profile; the message lists the known ones.
    """
    profiles = catalog()
    try:
        return profiles[profile_id]
    except KeyError:
        raise ProfileError(f"unknown hardware profile {profile_id!r}; known: {', '.join(sorted(profiles))}") from None


def normalize_arch(arch: str) -> str:
    """Map the many spellings of an architecture to `x86_64` or `aarch64` (others pass through)."""
    arch = arch.lower()
    return _ARCH_ALIASES.get(arch, arch)


def host_matches(profile: Profile, facts: HostFacts) -> bool:
    """True when a machine with these facts is (at least) this kind of hardware."""
    if profile.arch != "any" and profile.arch != facts.arch:
        return False
    if not profile.cpu_features <= facts.cpu_features:
        return False
    if profile.cpu_vendor is not None and profile.cpu_vendor != facts.cpu_vendor:
        return False
    if profile.accelerator is not None and profile.accelerator not in facts.accelerators:
        return False
    # A profile is only this host's if the runtime it prefers is installed here.
    return profile.runtimes[0] in facts.runtimes


def detect_profile(facts: HostFacts, profiles: Iterable[Profile] | None = None) -> Profile:
    """The most specific profile (highest rank, then most features) that this machine satisfies.

    Raises:
        ProfileError: not even the generic fallback matches (a catalog without one).
    """
    candidates = [p for p in (profiles if profiles is not None else catalog().values()) if host_matches(p, facts)]
    if not candidates:
        raise ProfileError(f"no hardware profile matches this host ({facts.arch}); the catalog needs a fallback")
    return max(candidates, key=lambda p: (p.rank, len(p.cpu_features), p.id))


def can_run(host: Profile, variant_profile: Profile, runtime: str) -> bool:
    """The rule: a node of profile `host` can run a variant built for `variant_profile` with `runtime`.

    The variant's requirements (architecture, ISA features, CPU vendor, accelerator) must be a subset
    of what the host profile offers, and the variant's runtime must be one the host profile lists.
    """
    if variant_profile.arch != "any" and variant_profile.arch != host.arch:
        return False
    if not variant_profile.cpu_features <= host.cpu_features:
        return False
    if variant_profile.cpu_vendor is not None and variant_profile.cpu_vendor != host.cpu_vendor:
        return False
    if variant_profile.accelerator is not None and variant_profile.accelerator != host.accelerator:
        return False
    return runtime in host.runtimes


@dataclass(frozen=True)
class VariantChoice:
    """The facts about a variant that choosing one needs."""

    id: str
    profile: str
    runtime: str
    precision: str


def rank_variants(
    host: Profile,
    variants: Sequence[VariantChoice],
    available_runtimes: frozenset[str] | None = None,
    profiles: dict[str, Profile] | None = None,
) -> list[VariantChoice]:
    """The variants `host` can run, best first.

    Order: a variant built for exactly this profile; then the host's runtime preference; then the more
    specific variant profile; then the host's precision preference; then id, so the order is total.
    Variants for unknown profiles, or whose runtime is not installed (when `available_runtimes` is given),
    are left out.
    """
    known = profiles if profiles is not None else catalog()
    usable: list[tuple[tuple[int, int, int, int, str], VariantChoice]] = []
    for variant in variants:
        variant_profile = known.get(variant.profile)
        if variant_profile is None or not can_run(host, variant_profile, variant.runtime):
            continue
        if available_runtimes is not None and variant.runtime not in available_runtimes:
            continue
        precision_rank = (
            host.precisions.index(variant.precision) if variant.precision in host.precisions else len(PRECISIONS)
        )
        key = (
            0 if variant.profile == host.id else 1,
            host.runtimes.index(variant.runtime),
            -variant_profile.rank,
            precision_rank,
            variant.id,
        )
        usable.append((key, variant))
    return [v for _, v in sorted(usable, key=lambda kv: kv[0])]


def choose_variant(
    host: Profile,
    variants: Sequence[VariantChoice],
    available_runtimes: frozenset[str] | None = None,
    profiles: dict[str, Profile] | None = None,
) -> VariantChoice | None:
    """The best variant for `host` (see `rank_variants`), or None when it can run none of them."""
    ranked = rank_variants(host, variants, available_runtimes, profiles)
    return ranked[0] if ranked else None


# --- I/O: reading this machine's facts -------------------------------------------------------------


def _parse_cpuinfo(text: str) -> tuple[str | None, frozenset[str]]:
    vendor: str | None = None
    features: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "vendor_id" and vendor is None:
            vendor = value.strip()
        elif key in ("flags", "features") and not features:
            features = set(value.split())
    return vendor, frozenset(features)


# The runtimes an onnxruntime execution provider gives, when a session on it can really be made.
GPU_PROVIDERS = {"CUDAExecutionProvider": "onnxruntime-cuda", "TensorrtExecutionProvider": "onnxruntime-tensorrt"}

# A serialized ONNX model (opset 13, IR 7): y = x + x over one float. Made with onnx.helper once and kept as
# bytes, so proving a provider needs no onnx import in the agent.
_PROBE_MODEL = (
    b'\x08\x07\x12\x00:9\n\x0e\n\x01x\n\x01x\x12\x01y"\x03Add\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01'
    b"\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


def proven_runtimes(available: Iterable[str], session_providers: Mapping[str, Sequence[str] | None]) -> frozenset[str]:
    """The GPU runtimes onnxruntime really offers: a provider counts only when it is listed as available AND
    a session asked for it came up with it first (`session_providers`: provider -> that session's
    `get_providers()`, None where the session could not be made). onnxruntime-gpu lists CUDA even where
    libcudart or cuDNN cannot be loaded, and then quietly runs the session on the CPU.
    """
    listed = set(available)
    return frozenset(
        runtime
        for provider, runtime in GPU_PROVIDERS.items()
        if provider in listed and list(session_providers.get(provider) or [])[:1] == [provider]
    )


def probe_provider(provider: str) -> list[str] | None:
    """`get_providers()` of a session on `provider` (then the CPU) over a one-node model that has run once;
    None when onnxruntime could not make or run it."""
    import warnings

    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a provider that cannot load logs an error; the answer here says so
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "provider not in available provider names": the answer says so
            session = onnxruntime.InferenceSession(_PROBE_MODEL, options, providers=[provider, "CPUExecutionProvider"])
            session.run(None, {"x": np.ones(1, dtype=np.float32)})
    except Exception:  # onnxruntime's C++ errors: the provider cannot run here
        return None
    return list(session.get_providers())


@cache
def onnxruntime_runtimes() -> frozenset[str]:
    """onnxruntime's runtimes on this host, GPU ones only once a session on them was made (see
    `proven_runtimes`); empty without onnxruntime. Probed once per process."""
    if importlib.util.find_spec("onnxruntime") is None:
        return frozenset()
    import onnxruntime

    available = onnxruntime.get_available_providers()
    probes = {provider: probe_provider(provider) for provider in GPU_PROVIDERS if provider in available}
    return frozenset({"onnxruntime"}) | proven_runtimes(available, probes)


def available_runtimes() -> frozenset[str]:
    """The runtimes installed and usable here: onnxruntime's (see `onnxruntime_runtimes`), OpenVINO."""
    runtimes = set(onnxruntime_runtimes())
    if importlib.util.find_spec("openvino") is not None:
        runtimes.add("openvino")
    return frozenset(runtimes)


def _accelerators() -> frozenset[str]:
    found: set[str] = set()
    if Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists():
        found.add("cuda")
    return frozenset(found)


def _memory_mb() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20))
    except (ValueError, OSError):
        return None


def read_host_facts(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> HostFacts:
    """Read this machine's architecture, CPU vendor and ISA flags, accelerators and installed runtimes.

    On x86-64 the ISA flags are the kernel's less what CPUID masks from this process (`cpuid.visible_features`):
    the runtimes' kernels dispatch on CPUID, so a variant is chosen for the ISA they will really use.
    """
    try:
        vendor, features = _parse_cpuinfo(cpuinfo_path.read_text())
    except OSError:
        vendor, features = None, frozenset()
    arch = normalize_arch(platform.machine())
    if arch == "x86_64":
        from strata.core.cpuid import read_cpuid_features, visible_features

        features = visible_features(features, read_cpuid_features())
    return HostFacts(
        arch=arch,
        cpu_vendor=vendor,
        cpu_features=features,
        accelerators=_accelerators(),
        runtimes=available_runtimes(),
        memory_mb=_memory_mb(),
    )
