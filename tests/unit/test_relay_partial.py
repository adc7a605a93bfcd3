"""A relay that fails before sending anything (refused, 403, 503 busy) made the device delete the part file that
held its progress from the control plane: the next download started at byte 0, so on a link that breaks more often
than one piece takes, a piece never finished while the relay was down. What a relay adds to a part file is dropped
when it fails; what was there before stays to resume from.

The transports are stand-ins (a source that breaks after 200 kB, a relay that refuses): what is tested is which
bytes the fetcher keeps and where it resumes, not HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from strata.agent.fetch import RateLimiter
from strata.agent.pieces import FetchReport, PackageFetcher
from strata.core.chunking import Chunk
from strata.core.errors import TransportError
from strata.core.wire import VariantRef

DATA = bytes(range(256)) * 1024  # 256 KiB
SHA = hashlib.sha256(DATA).hexdigest()


class Answer:
    def __init__(self, data: bytes, status: int = 200) -> None:
        self.status, self.headers, self._data = status, {}, data

    def read(self, size: int) -> bytes:
        out, self._data = self._data[:size], self._data[size:]
        return out


@dataclass
class Source:
    """Serves DATA from the Range asked; the first answer breaks after `cut` bytes, or sends `junk` instead."""

    cut: int | None = None
    junk: bytes | None = None
    ranges: list[str | None] = field(default_factory=list)

    @contextlib.contextmanager
    def stream(self, method: str, url: str, *, headers: dict[str, str], timeout: float) -> Iterator[Answer]:
        asked = headers.get("range")
        self.ranges.append(asked)
        if self.junk is not None:
            yield Answer(self.junk)
            return
        start = int(asked[len("bytes=") : -1]) if asked else 0
        data = DATA[start:]
        if self.cut is not None and len(self.ranges) == 1:
            data = data[: self.cut]
        yield Answer(data, 206 if start else 200)


class Refusing:
    @contextlib.contextmanager
    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Answer]:
        raise TransportError("connection refused (the relay is down)")
        yield Answer(b"")  # pragma: no cover - never reached


class Client:
    timeout = 30.0

    def __init__(self, transport: Source) -> None:
        self.transport = transport

    def blob_url(self, sha256: str) -> str:
        return f"https://control-plane/v1/blobs/sha256/{sha256}"

    def auth_headers(self) -> dict[str, str]:
        return {}


class Store:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def piece_path(self, sha256: str) -> Path:
        return self.folder / sha256

    def piece_seal(self, sha256: str) -> None:
        return None


def fetch_piece(fetcher: PackageFetcher) -> None:
    fetcher._given_up, fetcher._relay_spent = set(), {}  # a new fetch: the agent's next round
    variant = VariantRef("v", "cpu-generic", "onnxruntime", "fp32", "sha256:" + "0" * 64, "0" * 64, 1)
    fetcher._download(Chunk(SHA, len(DATA)), variant, RateLimiter(None), FetchReport())


@pytest.mark.parametrize("relay", ["refusing", "spoiling"])
def test_a_failing_relay_keeps_the_control_planes_progress(tmp_path: Path, relay: str) -> None:
    server = Source(cut=200_000)
    relay_transport = Refusing() if relay == "refusing" else Source(junk=b"\xff" * 10)
    fetcher = PackageFetcher(
        Client(server), Store(tmp_path), relays=lambda: ["https://relay:9000"], relay_transport=relay_transport
    )
    with pytest.raises(TransportError):
        fetch_piece(fetcher)  # the relay fails, the control plane's answer breaks after 200 kB
    assert (tmp_path / f"{SHA}.part").stat().st_size == 200_000
    fetch_piece(fetcher)  # the relay fails again; the control plane resumes where it stopped
    assert server.ranges == [None, "bytes=200000-"]
    assert (tmp_path / SHA).read_bytes() == DATA
