"""The near-edge artifact relay: child devices fetch package pieces from their site's near-edge node, which
keeps a cache so the site's WAN link carries each piece once.

    GET /relay/v1/blobs/sha256/<piece>?package=<package-digest-hex>     (on the tier port: mutual TLS)

Trust: devices reach the relay over mutual TLS with their fleet certificates, so the relay knows which node asks.
It never decides who may read a package: the first time a device asks for a package, the relay asks the control
plane (`GET /v1/nodes/<device>/packages/<digest>`, as itself) and remembers a yes for a while; a piece is served
only if the package's manifest lists it. Pieces missing here are fetched from the control plane (which lets a
near-edge node read the packages of the devices at its site), checked against their sha256, cached and served;
concurrent requests for one piece wait for a single upstream fetch. Devices check every piece again themselves,
so a relay can make a download fail but never make it wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from strata.agent.httpd import Request, Response
from strata.agent.metrics import MetricsRegistry
from strata.agent.store import ArtifactStore
from strata.agent.transport import HttpResponse, Transport
from strata.agent.vault import piece_aad
from strata.core.counts import holding
from strata.core.errors import Forbidden, StrataError, TransportError, VerificationError
from strata.core.fsutil import write_bytes_atomic
from strata.core.hashing import canonical_json, is_hex_sha256
from strata.core.package import package_pieces, parse_manifest

log = logging.getLogger("strata.agent.relay")

PREFIX = "/relay/v1/blobs/sha256/"
AUTH_TTL_S = 600.0
MAX_PIECE_BYTES = 64 << 20
PACKAGES_KEPT = 64  # piece sets kept in memory: a site rolls out a few packages at a time
RELAY_THREADS = 8  # the relay's own workers: its waits on the control plane never hold the event loop's executor
PER_DEVICE = 2  # requests one device may have in flight (a device fetches its pieces one at a time)


class RelayRefused(Forbidden):
    """The control plane does not let this device read that package (or the piece is not in it)."""

    code = "relay_refused"


class RelayUnavailable(TransportError):
    """The relay cannot get the piece now (the control plane is unreachable or answered badly)."""

    code = "relay_unavailable"
    http_status = 503


class RelayTampered(VerificationError):
    """The control plane sent bytes for a piece that do not hash to its name: refused, and (for the relay's own
    downloads) a failure the node reports, not a network hiccup to wait out."""

    code = "relay_tampered"
    http_status = 502


class _OneFile(dict[Path, bytes]):
    """The last package file the relay decrypted (pieces of one file are asked for one after another)."""

    def __setitem__(self, key: Path, value: bytes) -> None:
        self.clear()
        super().__setitem__(key, value)


class Grants:
    """The control plane's yes answers, by (device, package), each good for `ttl_s`. Expired ones go as new ones
    come: a near-edge node serves many devices through many versions for months, and keeps only recent answers.
    Not thread-safe (the relay holds its lock)."""

    def __init__(self, ttl_s: float = AUTH_TTL_S) -> None:
        self._ttl_s = ttl_s
        self._until: dict[tuple[str, str], float] = {}

    def allowed(self, device: str, package: str, now: float) -> bool:
        return self._until.get((device, package), 0.0) > now

    def grant(self, device: str, package: str, now: float) -> None:
        self._until = {key: until for key, until in self._until.items() if until > now}
        self._until[(device, package)] = now + self._ttl_s

    def __len__(self) -> int:
        return len(self._until)


class RecentPackages(dict[str, frozenset[str]]):
    """The piece sets of the last `PACKAGES_KEPT` packages the relay was asked for (an older one is read from its
    manifest again if asked for), not of every package it ever relayed."""

    def __setitem__(self, package: str, pieces: frozenset[str]) -> None:
        self.pop(package, None)
        while len(self) >= PACKAGES_KEPT:
            del self[next(iter(self))]  # the oldest
        super().__setitem__(package, pieces)


class RelayApp:
    """Serves and caches package pieces for child devices (see the module docstring)."""

    def __init__(
        self,
        store: ArtifactStore,
        cache_dir: Path,
        budget_bytes: int,
        upstream: str,
        transport: Transport,
        registry: MetricsRegistry,
        *,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self.budget_bytes = budget_bytes
        self.upstream = upstream.rstrip("/")
        self.transport = transport
        self.timeout = timeout
        self.clock = clock
        cache_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._authorized = Grants()
        self._pieces = RecentPackages()
        self._inflight: dict[str, Future[bytes]] = {}
        self._opened = _OneFile()
        self._executor = ThreadPoolExecutor(RELAY_THREADS, thread_name_prefix="strata-relay")
        self._in_flight: dict[str, int] = {}  # by device; touched on the event loop only
        self.served = registry.counter("strata_relay_bytes_served", "Bytes of package pieces served to devices")
        self.upstream_bytes = registry.counter(
            "strata_relay_upstream_bytes", "Bytes of package pieces fetched from the control plane"
        )
        self.requests = registry.counter("strata_relay_requests", "Piece requests by outcome", ("outcome",))

    async def handle(self, request: Request) -> Response:
        """Answer one relay request; errors are `{"error": ...}` with 400, 403, 404 or 503."""
        try:
            if request.method not in ("GET", "HEAD"):
                return Response.error(405, f"{request.method} is not allowed on the relay", {"allow": "GET, HEAD"})
            piece = request.path.removeprefix(PREFIX)
            package = request.query.get("package", "")
            if not request.path.startswith(PREFIX) or not is_hex_sha256(piece) or not is_hex_sha256(package):
                return Response.error(404, "relay paths are /relay/v1/blobs/sha256/<sha256>?package=<digest hex>")
            device = request.peer
            if device is None:
                return Response.error(401, "the relay serves fleet nodes: connect with this fleet's certificate")
            held = self._in_flight.get(device, 0)
            if held >= PER_DEVICE:
                # a device (compromised, say) asking for many pieces at once, each waiting on the control plane,
                # would otherwise take every relay worker from the other devices of its site
                self.requests.inc("busy")
                return Response.error(
                    503, f"node {device} has {held} relay requests in flight; retry later", {"retry-after": "1"}
                )
            with holding(self._in_flight, device):
                loop = asyncio.get_running_loop()
                data = await loop.run_in_executor(self._executor, self._piece_for, device, package, piece)
        except (RelayRefused, RelayUnavailable, RelayTampered) as exc:
            self.requests.inc("refused" if isinstance(exc, RelayRefused) else "unavailable")
            return Response.error(exc.http_status, exc.message)
        return self._answer(request, piece, data)

    def _answer(self, request: Request, piece: str, data: bytes) -> Response:
        headers = {"content-type": "application/octet-stream", "etag": f'"sha256:{piece}"', "accept-ranges": "bytes"}
        wanted = request.headers.get("range", "")
        start = 0
        if wanted.startswith("bytes=") and wanted.endswith("-") and wanted[6:-1].isdigit():
            start = int(wanted[6:-1])
            if start >= len(data):
                return Response(416, {"content-range": f"bytes */{len(data)}"})
            headers["content-range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = b"" if request.method == "HEAD" else data[start:]
        self.served.inc(by=len(body))
        return Response(206 if start else 200, headers, body)

    # --- the blocking part, on a worker thread ----------------------------------------------------------

    def _piece_for(self, device: str, package: str, piece: str) -> bytes:
        self._authorize(device, package)
        if piece not in self._package_pieces(package):
            raise RelayRefused(f"package {package[:12]} has no piece {piece[:12]}")
        held = self.store.piece_index().get(piece)
        if held is not None:
            try:
                data = self.store.read_held(held, self._opened)
            except (OSError, VerificationError):
                data = b""
            if hashlib.sha256(data).hexdigest() == piece:
                self.requests.inc("local")
                return data
        data, fetched = self.fetch_piece(piece)
        self.requests.inc("miss" if fetched else "hit")
        return data

    def fetch_piece(self, piece: str) -> tuple[bytes, bool]:
        """A piece from the cache, or fetched once from the control plane (and cached).

        The near-edge node's own downloads come through here too, so a piece its devices ask for while the
        node fetches it for itself crosses the WAN once. Returns the bytes and whether they were fetched now.

        Raises:
            RelayRefused, RelayUnavailable: the control plane refused or could not be reached.
            RelayTampered: the control plane sent bytes that do not hash to the piece's name.
        """
        cached = self.cache_dir / piece
        if cached.is_file():
            try:
                data = cached.read_bytes()
                if self.store.vault is not None:
                    data = self.store.vault.open(piece_aad(piece), data)
            except (OSError, VerificationError):
                data = b""
            if hashlib.sha256(data).hexdigest() == piece:
                os.utime(cached)
                return data, False
            cached.unlink(missing_ok=True)
        return self._fetch_once(piece), True

    def _authorize(self, device: str, package: str) -> None:
        now = self.clock()
        with self._lock:
            if self._authorized.allowed(device, package, now):
                return
        try:
            response = self.transport.request(
                "GET", f"{self.upstream}/v1/nodes/{device}/packages/{package}", headers={}, timeout=self.timeout
            )
        except TransportError as exc:
            raise RelayUnavailable(f"the relay cannot reach the control plane: {exc}") from exc
        if response.status in (401, 403, 404):
            raise RelayRefused(f"the control plane does not let node {device} read package {package[:12]}")
        if response.status != 204:
            raise RelayUnavailable(f"the control plane answered {response.status} about package {package[:12]}")
        with self._lock:
            self._authorized.grant(device, package, now)

    def _package_pieces(self, package: str) -> frozenset[str]:
        with self._lock:
            known = self._pieces.get(package)
        if known is not None:
            return known
        data = self._manifest_bytes(package)
        try:
            manifest = parse_manifest(data)
        except StrataError as exc:
            raise RelayUnavailable(f"manifest of package {package[:12]} does not parse: {exc}") from exc
        if manifest.digest != "sha256:" + package:
            raise RelayUnavailable(f"manifest of package {package[:12]} names another digest")
        pieces = frozenset(package_pieces(manifest))
        with self._lock:
            self._pieces[package] = pieces
        return pieces

    def _manifest_bytes(self, package: str) -> bytes:
        staged = self.store.package_dir("sha256:" + package) / "manifest.json"
        if staged.is_file():
            return canonical_json(json.loads(staged.read_bytes()))
        return self.fetch_piece(package)[0]

    def _fetch_once(self, sha: str) -> bytes:
        """Fetch a blob from the control plane, with one upstream request however many devices wait for it."""
        with self._lock:
            pending = self._inflight.get(sha)
            owner = pending is None
            if owner:
                pending = self._inflight[sha] = Future()
        assert pending is not None
        if not owner:
            try:
                return pending.result(timeout=self.timeout * 4)
            except TimeoutError as exc:
                raise RelayUnavailable(f"the fetch of piece {sha[:12]} from the control plane is still going") from exc
        try:
            data = self._fetch(sha)
            pending.set_result(data)
            return data
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(sha, None)

    def _fetch(self, sha: str) -> bytes:
        response = self._upstream("GET", sha)
        if response.status in (401, 403, 404):
            raise RelayRefused(f"the control plane refused blob {sha[:12]} to this relay")
        if response.status != 200:
            raise RelayUnavailable(f"the control plane answered {response.status} for blob {sha[:12]}")
        data = response.body
        if len(data) > MAX_PIECE_BYTES or hashlib.sha256(data).hexdigest() != sha:
            raise RelayTampered(f"the control plane sent bytes for piece {sha} that do not match their name")
        self.upstream_bytes.inc(by=len(data))
        vault = self.store.vault
        write_bytes_atomic(self.cache_dir / sha, vault.seal(piece_aad(sha), data) if vault is not None else data)
        self._evict()
        return data

    def _upstream(self, method: str, sha: str) -> HttpResponse:
        try:
            return self.transport.request(
                method, f"{self.upstream}/v1/blobs/sha256/{sha}", headers={}, timeout=self.timeout
            )
        except TransportError as exc:
            raise RelayUnavailable(f"the relay cannot reach the control plane: {exc}") from exc

    def _evict(self) -> None:
        """Least recently used pieces go first once the cache is over its budget."""
        entries = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.cache_dir.iterdir() if p.is_file()]
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.budget_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
