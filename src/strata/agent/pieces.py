"""Fetching a package piece by piece: the manifest first, then only the chunks and small files this node does
not already hold, each from the first source that has it (the site's near-edge relay, then the control plane).

Every piece is named by its sha256 and checked on arrival; downloads resume after a cut at the byte where
they stopped (`fetch.download_blob`), and pieces already downloaded survive a restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from strata.agent.client import ControlPlaneClient, ServerError
from strata.agent.fetch import Progress, RateLimiter, download_blob
from strata.agent.store import ArtifactStore, digest_hex
from strata.agent.transport import Transport, rate_allowance
from strata.core.chunking import Chunk
from strata.core.errors import AuthError, Forbidden, NotFound, StrataError, TransportError, VerificationError
from strata.core.package import MAX_MANIFEST_BYTES, Manifest
from strata.core.wire import VariantRef

log = logging.getLogger("strata.agent")


class PieceSource(Protocol):
    """Something that hands out pieces by sha256, checked (the near-edge relay's cache)."""

    def fetch_piece(self, piece: str) -> tuple[bytes, bool]: ...


@dataclass
class FetchReport:
    """Where a package's bytes came from."""

    pieces: int = 0
    reused_bytes: int = 0
    relay_bytes: int = 0
    server_bytes: int = 0
    resumed: list[tuple[str, int]] = field(default_factory=list)


def needed_pieces(manifest: Manifest) -> list[Chunk]:
    """Every piece a package is made of, in file order (a small file is one piece)."""
    pieces: list[Chunk] = []
    for entry in manifest.files:
        pieces.extend(entry.chunks or (Chunk(entry.sha256, entry.size),))
    return pieces


class PackageFetcher:
    """Downloads what a package needs into the artifact store (see the module docstring)."""

    def __init__(
        self,
        client: ControlPlaneClient,
        store: ArtifactStore,
        relays: Callable[[], Sequence[str]] = tuple,
        *,
        rate_limit: int | None = None,
        progress: Progress | None = None,
        relay_transport: Transport | None = None,
        relay_min_rate: int | None = None,
    ) -> None:
        """`relay_transport` reaches the parent relays (mutual TLS with this node's certificate).

        `relay_min_rate` (bytes a second) is what a relay must average over a whole package, past its first request
        timeout, to keep being asked for it; below that the rest comes from the control plane. Each answer has such
        an allowance of its own in the transport; this one is over the package, so a parent that waits just under
        the allowance before every piece (and so never breaks one off) cannot hold a fetch, and with it the agent's
        loop (desired state, revocations, renewal), for the piece count times that wait."""
        self.client = client
        self.relay_transport = relay_transport or client.transport
        self.relay_min_rate = relay_min_rate
        self._relay_spent: dict[str, tuple[float, int]] = {}  # by relay, this fetch: seconds waited, bytes received
        self.store = store
        self.relays = relays
        self.rate_limit = rate_limit
        self.progress = progress
        self.via: PieceSource | None = None
        self._given_up: set[str] = set()  # relays that broke or stalled during this fetch: not asked again in it

    def fetch(self, variant: VariantRef, manifest_limit: int | None = None) -> FetchReport:
        """Fetch the manifest and every missing piece of `variant`, then mark it downloaded.

        `manifest_limit` is the manifest's length as TUF states it: a source that sends more is cut off there
        (endless data), instead of at the 16 MiB any manifest may have.

        Raises:
            TransportError: the control plane could not be reached (what arrived stays and resumes).
            VerificationError: the control plane sent bytes that do not match their name.
            AuthError, Forbidden, ServerError: the control plane refused.
        """
        report = FetchReport()
        self._given_up = set()
        self._relay_spent = {}
        manifest = self.store.load_manifest(variant.digest) or self._manifest(variant, report, manifest_limit)
        held = self.store.piece_index()
        limiter = RateLimiter(self.rate_limit)
        pieces = needed_pieces(manifest)
        total = sum(p.size for p in pieces)
        done = 0
        for piece in pieces:
            report.pieces += 1
            if piece.sha256 in held:
                report.reused_bytes += piece.size
            elif not self.store.has_piece(piece.sha256, piece.size):
                self._download(piece, variant, limiter, report)
            done += piece.size
            if self.progress is not None:
                self.progress(done, total)
        self.store.mark_downloaded(variant.blob)
        return report

    def _sources(self, sha256: str, variant: VariantRef) -> list[tuple[str, str]]:
        """(kind, URL) of each source to try for a piece, the parent relays first (but those given up on)."""
        package = digest_hex(variant.digest)
        sources = [
            ("relay", f"{relay.rstrip('/')}/relay/v1/blobs/sha256/{sha256}?package={package}")
            for relay in self.relays()
            if relay not in self._given_up
        ]
        sources.append(("server", self.client.blob_url(sha256)))
        return sources

    def _relay_of(self, url: str) -> str | None:
        return next((r for r in self.relays() if url.startswith(r.rstrip("/") + "/")), None)

    def _give_up_on(self, url: str, exc: StrataError) -> None:
        """A relay that could not be reached, broke off or sent too slowly is not asked again during this fetch:
        otherwise each piece would wait out its timeouts again (a stalling parent would hold the agent's loop
        piece after piece)."""
        relay = self._relay_of(url)
        # broken, too slow, or refusing this package (its policy keeps it from the relay): not asked again for it
        if relay is not None and isinstance(exc, (TransportError, Forbidden)):
            self._given_up.add(relay)
            log.warning("relay %s failed (%s); fetching the rest of this package from the control plane", relay, exc)

    def _count_relay(self, url: str, seconds: float, received: int) -> None:
        """Add a relay answer's time and bytes to what that relay has spent of this package; give up on it once it
        is below its floor rate over the package (see `__init__`)."""
        relay = self._relay_of(url)
        if relay is None or self.relay_min_rate is None:
            return
        spent, got = self._relay_spent.get(relay, (0.0, 0))
        spent, got = spent + seconds, got + received
        self._relay_spent[relay] = (spent, got)
        # the floor each answer has in the transport, over the package: after the first request timeout, on average
        if rate_allowance(0.0, self.client.timeout, got, self.relay_min_rate, spent) < 0:
            self._give_up_on(
                url,
                TransportError(
                    f"it sent {got} bytes of this package in {spent:.0f} s, slower than {self.relay_min_rate} "
                    "bytes/s on average"
                ),
            )

    def _manifest(self, variant: VariantRef, report: FetchReport, limit: int | None = None) -> Manifest:
        most = MAX_MANIFEST_BYTES if limit is None else min(limit, MAX_MANIFEST_BYTES)
        for kind, url in self._sources(digest_hex(variant.digest), variant):
            try:
                transport = self.relay_transport if kind == "relay" else self.client.transport
                with transport.stream(
                    "GET", url, headers=self.client.auth_headers(), timeout=self.client.timeout
                ) as response:
                    if response.status != 200:
                        raise ServerError(f"manifest from {kind}: HTTP {response.status}")
                    data = b""
                    while piece := response.read(1 << 16):
                        data += piece
                        if len(data) > most:
                            stated = "its TUF target states" if limit is not None else "a manifest may have"
                            raise VerificationError(
                                f"the manifest of {variant.id} from the {kind} is longer than the {most} bytes "
                                f"{stated} (endless data); download cut off"
                            )
                manifest = self.store.save_manifest(variant.digest, data)
            except (TransportError, ServerError, NotFound, VerificationError) as exc:
                if kind == "server":
                    raise
                log.info("relay could not give the manifest of %s (%s); trying the next source", variant.id, exc)
                self._give_up_on(url, exc)
                continue
            if kind == "relay":
                report.relay_bytes += len(data)
            else:
                report.server_bytes += len(data)
            return manifest
        raise TransportError(f"no source gave the manifest of {variant.id}")  # pragma: no cover - server raises

    def _download(self, piece: Chunk, variant: VariantRef, limiter: RateLimiter, report: FetchReport) -> None:
        if self.via is not None:  # this node is a relay: share its cache and its single upstream fetch
            data, fetched = self.via.fetch_piece(piece.sha256)
            limiter.throttle(len(data))
            self.store.write_piece(piece.sha256, data)
            if fetched:
                report.server_bytes += len(data)
            else:
                report.relay_bytes += len(data)
            return
        for kind, url in self._sources(piece.sha256, variant):
            started = time.monotonic()
            # A relay's bytes go to a part file of their own: a parent that sends a wrong byte and hangs up (or
            # answers a range with the whole blob) must not spoil the control plane's, which resumes from its own.
            dest = self.store.piece_path(piece.sha256)
            part = dest.with_name(dest.name + (".relay.part" if kind == "relay" else ".part"))
            try:
                result = download_blob(
                    self.relay_transport if kind == "relay" else self.client.transport,
                    url,
                    dest,
                    sha256=piece.sha256,
                    size=piece.size,
                    headers=self.client.auth_headers(),
                    timeout=self.client.timeout,
                    limiter=limiter,
                    seal=self.store.piece_seal(piece.sha256),
                    part=part,
                )
            except (TransportError, ServerError, NotFound, VerificationError, AuthError, Forbidden) as exc:
                if kind == "server":
                    raise
                log.debug("relay could not give piece %s (%s); trying the next source", piece.sha256[:12], exc)
                part.unlink(missing_ok=True)  # what a relay given up on sent is not resumed, from it or another
                self._count_relay(url, time.monotonic() - started, 0)
                self._give_up_on(url, exc)
                continue
            except StrataError:
                raise
            if kind == "relay":
                self._count_relay(url, time.monotonic() - started, result.received)
            if result.resumed_from:
                report.resumed.append((piece.sha256, result.resumed_from))
                log.info("download of piece %s resumed at byte %d", piece.sha256[:12], result.resumed_from)
            if kind == "relay":
                report.relay_bytes += result.received
            else:
                report.server_bytes += result.received
            return
