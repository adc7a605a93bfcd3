"""`strata keys create` and `strata model sign`, offline: the signature lands beside the package (a folder or a
tar), and model-signing's own verifier accepts the folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import model_signing

from strata.core.package import pack_tar, read_manifest
from strata.package_build import build_package


def strata(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    if "PYTHONPATH" in os.environ:  # the sources under test (a worktree's src first), not the installed ones
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(
        [sys.executable, "-m", "strata", *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def test_keys_create_then_sign_a_folder_and_a_tar(digits_onnx: Path, tmp_path: Path) -> None:
    created = strata("keys", "create", "--out", str(tmp_path / "keys"))
    assert created.returncode == 0, created.stderr
    private, public = tmp_path / "keys" / "release.key", tmp_path / "keys" / "release.pub"
    assert created.stdout.strip() == str(public)
    assert private.stat().st_mode & 0o077 == 0
    again = strata("keys", "create", "--out", str(tmp_path / "keys"))
    assert again.returncode == 2
    assert "never overwritten" in again.stderr

    package = build_package(digits_onnx, tmp_path / "digits-1", name="digits", version="1")
    signed = strata("model", "sign", str(package.path), "--key", str(private), "--expires", "30d", "--json")
    assert signed.returncode == 0, signed.stderr
    result = json.loads(signed.stdout)
    assert result["digest"] == package.digest
    assert result["bundle"] == str(tmp_path / "digits-1.sig")
    assert read_manifest(package.path).digest == package.digest
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public).verify(
        package.path, tmp_path / "digits-1.sig"
    )
    role = json.loads((tmp_path / "digits-1.targets.json").read_text())
    assert list(role["signed"]["targets"]) == ["digits/1/cpu-generic-fp32"]

    tar = tmp_path / "digits-1.tar"
    pack_tar(package, tar)
    signed_tar = strata("model", "sign", str(tar), "--key", str(private), "--json")
    assert signed_tar.returncode == 0, signed_tar.stderr
    assert json.loads(signed_tar.stdout)["release_role"] == str(tmp_path / "digits-1.tar.targets.json")
    assert (tmp_path / "digits-1.tar.sig").is_file()

    wrong_key = strata("model", "sign", str(package.path), "--key", str(public))
    assert wrong_key.returncode == 2
    # the public half by mistake: the error says so (it quoted cryptography: "Valid PEM but no BEGIN/END delimiters
    # for a private key found")
    assert f"{public} is a public key: sign with the private half" in wrong_key.stderr.replace("\n", " ")
    not_a_key = strata("model", "sign", str(package.path), "--key", str(tmp_path / "digits-1.sig"))
    assert not_a_key.returncode == 2
    assert "cannot read the release key" in not_a_key.stderr
