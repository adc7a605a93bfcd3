"""The upload bar of `strata model push` and `strata package push`: its speed column shows a rate, not "?"."""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from strata.cli import model
from strata.control_client import ControlClient
from strata.core.errors import SignatureError


@pytest.mark.parametrize("size", [300_000, 2_500_000])  # one piece (a small package: it said "?"), and three
def test_the_upload_bar_shows_a_transfer_speed(size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tar = tmp_path / "p.tar"
    tar.write_bytes(b"x" * size)
    received: list[int] = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/health":  # asked first: does the server want a signature?
            return httpx.Response(200, json={"status": "ok", "version": "0", "release_keys": False})
        received.append(len(request.read()))
        return httpx.Response(201, json={"digest": "sha256:" + "0" * 64})

    shown = Console(file=io.StringIO(), width=120, record=True)
    monkeypatch.setattr(model, "console", shown)
    with ControlClient("https://cp.test", "t", transport=httpx.MockTransport(server)) as client:
        answer = model.upload_with_progress(client, tar, "digits 1")
    assert answer == {"digest": "sha256:" + "0" * 64}
    assert received == [size]
    line = next(line for line in shown.export_text().splitlines() if "upload digits 1" in line)
    assert re.search(r"\d+(\.\d+)? [kMG]?B/s$", line.rstrip()), line
    assert "?" not in line


def test_an_unsigned_push_to_a_server_with_release_keys_stops_before_sending_the_package(tmp_path: Path) -> None:
    # The server refused it with 422 only once it had the whole tar: minutes of upload for a large model, for
    # nothing. `/v1/health` says whether it has release keys (an older server does not say: the upload goes on).
    tar = tmp_path / "p.tar"
    tar.write_bytes(b"x" * 300_000)
    asked: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(200, json={"status": "ok", "version": "0", "release_keys": True})

    sent: list[int] = []
    with (
        ControlClient("https://cp.test", "t", transport=httpx.MockTransport(server)) as client,
        pytest.raises(SignatureError, match="accepts only packages signed by a release key"),
    ):
        client.push_package(tar, sent.append)
    assert asked == ["/v1/health"]
    assert sent == []  # not a byte of the package
