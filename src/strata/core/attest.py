"""Attestation reports: what a node says it runs, bound to a fresh nonce, signed with its node key.

A node with a TPM registered on the control plane also sends a TPM quote whose qualifying data is sha256 of the
report: the report is then bound to that TPM and to the PCR values the quote covers (level `tpm`).

The report names the hash of the agent's code, of its configuration, the packages it serves and the boot it
runs in. The control plane checks the signature with the node's current certificate, the nonce it issued, and
the code hash against the release allowlist. All pure but the file hashing here (no `cryptography`: signing
and verifying happen in `strata.trust`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from strata.core.errors import AuthError, ConfigError
from strata.core.hashing import canonical_json
from strata.core.words import plural

LEVEL_SOFTWARE: Final = "software"  # a node-key-signed report that matched the allowlist
LEVEL_TPM: Final = "tpm"  # the same report, also quoted by the node's registered TPM attestation key
LEVELS: Final = (LEVEL_SOFTWARE, LEVEL_TPM)  # weakest first: a node at one level meets every level before it
NONCE_TTL_S: Final = 300.0


def code_hash(package_root: Path) -> str:
    """`sha256:<hex>` over every Python source file of a package tree (sorted relative paths and contents)."""
    digest = hashlib.sha256()
    for path in sorted(package_root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(package_root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def strata_code_hash() -> str:
    """The code hash of the strata package this process runs."""
    import strata

    return code_hash(Path(strata.__file__).resolve().parent)


@dataclass(frozen=True)
class Report:
    """What a node attests to."""

    node_id: str
    nonce: str
    agent_code: str
    config: str
    packages: tuple[str, ...]
    boot_id: str
    time: float

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "nonce": self.nonce,
            "agent_code": self.agent_code,
            "config": self.config,
            "packages": list(self.packages),
            "boot_id": self.boot_id,
            "time": self.time,
        }

    def payload(self) -> bytes:
        """The exact bytes that are signed."""
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Report:
        """Raises:
        AuthError: a field is missing or of the wrong type.
        """
        try:
            return cls(
                node_id=str(raw["node_id"]),
                nonce=str(raw["nonce"]),
                agent_code=str(raw["agent_code"]),
                config=str(raw["config"]),
                packages=tuple(str(p) for p in raw["packages"]),
                boot_id=str(raw["boot_id"]),
                time=float(raw["time"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AuthError(f"the attestation report is malformed: {exc}") from exc


@dataclass(frozen=True)
class Verdict:
    """The control plane's judgement of a report whose signature verified."""

    attested: bool
    level: str | None
    reason: str
    tpm_registered: bool = False  # the control plane holds an attestation key of this node's TPM


def judge(report: Report, node_id: str, issued_nonce: str | None, allowlist: Iterable[str]) -> Verdict:
    """Decide on a report whose signature already verified: the right node, the nonce just issued, known code."""
    if report.node_id != node_id:
        return Verdict(False, None, f"the report names node {report.node_id}, not {node_id}")
    if issued_nonce is None or report.nonce != issued_nonce:
        return Verdict(False, None, "the report does not answer the nonce this server issued (replayed or expired)")
    allowed = set(allowlist)
    if report.agent_code not in allowed:
        return Verdict(False, None, f"agent code {report.agent_code} is not on the release allowlist")
    return Verdict(True, LEVEL_SOFTWARE, f"agent code and {plural(len(report.packages), 'active package')} attested")


def meets(offered: str | None, wanted: str) -> bool:
    """Whether a node attested at `offered` satisfies a policy that requires `wanted` (an unknown `wanted` is
    met only by exactly that level)."""
    if not wanted or wanted == "none":
        return True
    if not offered:
        return False
    if offered in LEVELS and wanted in LEVELS:
        return LEVELS.index(offered) >= LEVELS.index(wanted)
    return offered == wanted


def parse_pcr_requirements(entries: Iterable[str]) -> dict[str, str]:
    """`BANK:INDEX=HEX` entries (from `--tpm-pcr`) as `{"BANK:INDEX": hex}`.

    Raises:
        ConfigError: an entry does not have that shape.
    """
    required: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        bank, colon, index = key.strip().lower().partition(":")
        value = value.strip().lower()
        if not sep or not colon or not bank or not index.isdigit() or not value:
            raise ConfigError(f"a required PCR is BANK:INDEX=HEX (e.g. sha256:7=ab12...), got {entry!r}")
        try:
            bytes.fromhex(value)
        except ValueError as exc:
            raise ConfigError(f"the required value of PCR {key} is not hex: {entry!r}") from exc
        required[f"{bank}:{int(index)}"] = value
    return required


def judge_tpm(
    software: Verdict, registered: bool, quoted: bool, quote_error: str | None, pcr_problem: str | None
) -> Verdict:
    """Combine the software verdict with what the TPM quote showed.

    A node that registered a TPM must quote every report: one that stops (a changed agent dropping the TPM, or a
    disk moved to another machine) is not attested at all rather than quietly falling back to `software`.
    """
    if not software.attested or not registered:
        if software.attested and quoted:
            reason = software.reason + "; the quote was not checked (no TPM registered)"
            return Verdict(True, software.level, reason, registered)
        return Verdict(software.attested, software.level, software.reason, registered)
    if not quoted:
        return Verdict(False, None, "this node registered a TPM, but its report came without a quote", True)
    if quote_error is not None:
        return Verdict(False, None, f"the TPM quote was refused: {quote_error}", True)
    if pcr_problem is not None:
        return Verdict(False, None, f"the TPM quote shows another boot state: {pcr_problem}", True)
    return Verdict(True, LEVEL_TPM, software.reason + ", quoted by the node's TPM", True)
