"""Helpers for the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

from strata.core.package import Package, build_package, pack_tar
from strata.localfleet import LocalFleet


def push_model(fleet: LocalFleet, model: Path, version: str, workdir: Path, profile: str = "cpu-generic") -> Package:
    """Build a package for `model` and upload it to the fleet's control plane."""
    package = build_package(
        model, workdir / f"pkg-{version}-{profile}", name="digits", version=version, profile=profile
    )
    tar = workdir / f"digits-{version}-{profile}.tar"
    pack_tar(package, tar)
    fleet.client.push_package(tar)
    return package
