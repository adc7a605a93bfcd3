"""Judging variants against the gate and choosing one per target profile: pure functions of measurements.

A variant passes when it was built, its runtime exists on this host (so it was measured) and every clause of
the gate holds. Per target, the fastest passing variant that the target can run wins; a variant that could not
be measured (`unverified`) is chosen only when the target can run no verified, passing one. "Fastest" is the
speedup: each variant's throughput over the fp32 baseline's in the same benchmark round, median over rounds,
which load from other processes on a shared machine disturbs far less than absolute throughput.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from strata.core.profiles import Profile, can_run
from strata.optimize.gate import Gate

Verdict = Literal["passed", "failed", "unverified"]


def as_verdict(text: str) -> Verdict:
    """`text` as a verdict.

    Raises:
        ValueError: not one of passed, failed, unverified.
    """
    if text == "passed":
        return "passed"
    if text == "failed":
        return "failed"
    if text == "unverified":
        return "unverified"
    raise ValueError(f"{text!r} is not a gate verdict")


@dataclass(frozen=True)
class Judgement:
    """The gate's verdict on one variant and, unless it passed, why."""

    gate: Verdict
    reason: str | None


def judge(values: Mapping[str, float | None], gate: Gate, *, verified: bool, error: str | None = None) -> Judgement:
    """Verdict for one variant: `failed` if it could not be built or misses a clause, `unverified` if its runtime
    is not on this host, else `passed`."""
    if error is not None:
        return Judgement("failed", f"not built: {error}")
    if not verified:
        return Judgement("unverified", "its runtime is not on this host, so it was built but not measured")
    failures = gate.failures(values)
    if failures:
        return Judgement("failed", "; ".join(failures))
    return Judgement("passed", None)


@dataclass(frozen=True)
class Measured:
    """What selection needs to know about a variant."""

    id: str
    profile: str
    runtime: str
    precision: str
    gate: Verdict
    speedup: float | None


@dataclass(frozen=True)
class Selection:
    """The variant chosen per target profile, and a one-line account of each choice (or of its absence)."""

    chosen: dict[str, str]
    why: dict[str, str]


def runnable(target: Profile, variant: Measured, profiles: Mapping[str, Profile]) -> bool:
    """The target can run this variant: its profile's requirements, runtime and precision all fit."""
    built_for = profiles.get(variant.profile)
    return (
        built_for is not None and can_run(target, built_for, variant.runtime) and variant.precision in target.precisions
    )


def select_variants(
    targets: Sequence[Profile], variants: Sequence[Measured], profiles: Mapping[str, Profile]
) -> Selection:
    """Per target: the fastest passing variant it can run (ties by id); failing that, an unverified one it can
    run, built for exactly it first; failing that, none."""
    chosen: dict[str, str] = {}
    why: dict[str, str] = {}
    for target in targets:
        usable = [v for v in variants if runnable(target, v, profiles)]
        passing = sorted(
            (v for v in usable if v.gate == "passed" and v.speedup is not None),
            key=lambda v: (-(v.speedup or 0.0), v.id),
        )
        if passing:
            best = passing[0]
            chosen[target.id] = best.id
            why[target.id] = f"fastest of {len(passing)} passing variant(s) it can run ({best.speedup:.2f}x fp32)"
            continue
        unverified = sorted((v for v in usable if v.gate == "unverified"), key=lambda v: (v.profile != target.id, v.id))
        if unverified:
            chosen[target.id] = unverified[0].id
            why[target.id] = "no measured variant passed; this one is unverified"
            continue
        why[target.id] = f"none of the {len(usable)} variant(s) it can run passed the gate"
    return Selection(chosen=chosen, why=why)
