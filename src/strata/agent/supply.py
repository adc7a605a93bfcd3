"""The node's supply-chain guard: release keys pinned at enrollment, and the checks before a package is trusted.

A node that pinned release keys (its server had them when it enrolled) trusts a desired package only when:
1. before downloading it: the desired state names its release signature (unsigned packages are refused at once),
   and TUF says so: the director (this node's metadata) and the image repository (the package's release-signed
   role) both list it with the same hashes and length, the metadata is fresh, never older than what the node has
   seen and consistent, the image role verifies with a pinned release key, and the node's profile can run it;
   the manifest is then fetched with no more than the length TUF states;
2. before staging it: the model-signing bundle verifies against the assembled package folder with a pinned key;
3. before activating it: TUF says so again (a rollback to a package still on disk is caught here).

The checks run in a child process (`python -m strata.trust.verify`, run by `children.run_child`): cryptography,
python-tuf and model_signing would cost the agent more than its 70 MB budget. A node enrolled without release keys
(a development server) accepts unsigned packages; it says so in a warning at start and in every status report
(`supply: unverified`). This module imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from strata.agent.children import ChildFailed, run_child
from strata.agent.client import ControlPlaneClient, raise_for_status
from strata.agent.transport import HttpResponse
from strata.core.errors import MetadataError, SignatureError, TransportError, VerificationError
from strata.core.fsutil import write_bytes_atomic
from strata.core.wire import SupplyMode, VariantRef
from strata.trust.pinned import is_pinned, save_pinned

log = logging.getLogger("strata.agent")

CHILD_TIMEOUT_S: Final = 120.0
MAX_BUNDLE_BYTES: Final = 1 << 20
VERIFIED: Final[SupplyMode] = "verified"
UNVERIFIED: Final[SupplyMode] = "unverified"


@dataclass(frozen=True)
class VerifiedTarget:
    """What TUF vouches for: the package's canonical manifest length and sha256 (= the package digest)."""

    length: int
    sha256: str


class SupplyGuard:
    """Runs the node's supply-chain checks (see the module docstring)."""

    def __init__(
        self,
        data_dir: Path,
        client: ControlPlaneClient,
        profile: str,
        runtimes: Sequence[str],
        *,
        python: str = sys.executable,
        timeout_s: float = CHILD_TIMEOUT_S,
    ) -> None:
        self.data_dir = data_dir
        self.client = client
        self.profile = profile
        self.runtimes = tuple(sorted(runtimes))
        self.python = python
        self.timeout_s = timeout_s
        self._warned = False

    @property
    def pinned(self) -> bool:
        """True when the node pinned release keys and must verify every package."""
        return is_pinned(self.data_dir)

    @property
    def mode(self) -> SupplyMode:
        """`verified` or `unverified`, for status reports."""
        return VERIFIED if self.pinned else UNVERIFIED

    def pin(self, release_keys: Sequence[str], tuf_roots: Mapping[str, str]) -> None:
        """Keep what the server handed out at enrollment; nothing when it gave no release keys.

        Raises:
            ConfigError: keys without both TUF roots.
            OSError: the trust folder cannot be written.
        """
        if not release_keys:
            return
        save_pinned(self.data_dir, release_keys, tuf_roots)
        log.info("pinned %d release key(s) and the TUF roots: only signed packages will run here", len(release_keys))

    def warn_if_unverified(self) -> None:
        """Say once, loudly, that this node accepts unsigned packages (it enrolled without release keys)."""
        if self._warned or self.pinned:
            return
        self._warned = True
        log.warning(
            "NO RELEASE KEYS PINNED: this node accepts UNSIGNED packages (its server had no --release-key when it "
            "enrolled). Development only: enroll again with a server that has release keys."
        )

    # --- checks --------------------------------------------------------------------------------------------

    def check_target(self, model: str, version: str, variant: VariantRef) -> VerifiedTarget:
        """Check a desired package against TUF before it is downloaded or activated.

        Raises:
            SignatureError: the package is unsigned, or not signed by a pinned release key.
            MetadataError: the TUF metadata was refused, or vouches for another package or profile.
            TransportError: the control plane could not be reached (try again later).
        """
        if variant.signature is None:
            raise SignatureError(
                f"{model} {version} ({variant.id}) is not signed; this node runs only packages signed by the "
                "release keys it pinned at enrollment"
            )
        if self.client.node_id is None:
            raise TransportError("not enrolled yet")
        verdict = self._run(
            {
                "op": "target",
                "data_dir": str(self.data_dir),
                "server": self.client.base_url,
                "node_id": self.client.node_id,
                "headers": self.client.auth_headers(),
                "model": model,
                "version": version,
                "variant": variant.to_json(),
                "profile": self.profile,
                "runtimes": list(self.runtimes),
                "timeout": self.client.timeout,
            }
        )
        target = verdict.get("target")
        if not isinstance(target, dict) or not isinstance(target.get("length"), int):
            raise MetadataError(f"the verifier's answer is malformed: {verdict}")
        if "sha256:" + str(target.get("sha256")) != variant.digest:
            raise MetadataError(f"TUF vouches for {target.get('sha256')}, the desired state names {variant.digest}")
        return VerifiedTarget(length=int(target["length"]), sha256=str(target["sha256"]))

    def fetch_bundle(self, variant: VariantRef) -> Path:
        """The package's release signature (model-signing bundle), downloaded from the control plane once.

        Raises:
            SignatureError: the package is unsigned.
            VerificationError: the bytes do not hash to the bundle's id, or are larger than a bundle can be.
            TransportError, AuthError, Forbidden, ServerError: the control plane could not give it.
        """
        if variant.signature is None:
            raise SignatureError(f"{variant.id} is not signed")
        path = self.data_dir / "downloads" / f"{variant.signature}.sig"
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == variant.signature:
            return path
        url = self.client.blob_url(variant.signature)
        with self.client.transport.stream(
            "GET", url, headers=self.client.auth_headers(), timeout=self.client.timeout
        ) as response:
            if response.status != 200:
                raise_for_status(HttpResponse(response.status, {}, b""), "release signature")
            data = b""
            while piece := response.read(1 << 16):
                data += piece
                if len(data) > MAX_BUNDLE_BYTES:
                    raise VerificationError(f"the release signature is larger than {MAX_BUNDLE_BYTES} bytes")
        if hashlib.sha256(data).hexdigest() != variant.signature:
            raise VerificationError(f"the release signature does not hash to {variant.signature}")
        write_bytes_atomic(path, data)
        return path

    def check_package(self, folder: Path, bundle: Path, digest: str, hashes: Mapping[str, str] | None = None) -> None:
        """Check the release signature over an assembled package folder (before it is staged). When its files
        are sealed, `hashes` gives the sha256 of each file's plaintext (computed in memory while sealing).

        Raises:
            SignatureError: not by a pinned release key, or the files are not what was signed.
        """
        self._run(
            {
                "op": "package",
                "data_dir": str(self.data_dir),
                "folder": str(folder),
                "bundle": str(bundle),
                "digest": digest,
                **({} if hashes is None else {"hashes": dict(hashes)}),
            }
        )

    def _run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Ask the verifying child; a child that cannot run or answer refuses (fail closed).

        Raises:
            SignatureError, MetadataError: the child refused, or could not decide.
            TransportError: the child could not reach the control plane.
        """
        refuse: type[VerificationError] = SignatureError if request["op"] == "package" else MetadataError
        try:
            finished = run_child(
                "strata.trust.verify",
                stdin=json.dumps(request).encode(),
                timeout_s=self.timeout_s,
                what="the verifier",
                python=self.python,
                optimize=False,
            )
        except ChildFailed as exc:
            raise refuse(f"the verifier could not run: {exc.reason}") from exc
        try:
            verdict = json.loads(finished.stdout)
        except ValueError:
            raise refuse(f"the verifier failed (exit {finished.returncode}): {finished.failure('no output')}") from None
        if not isinstance(verdict, dict):
            raise refuse(f"the verifier answered {verdict!r}")
        if verdict.get("ok") is True:
            return verdict
        reason = str(verdict.get("reason") or "refused")
        kind = verdict.get("kind")
        if kind == "transport":
            raise TransportError(reason)
        if kind == "signature":
            raise SignatureError(reason)
        raise MetadataError(reason)
