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


@pytest.mark.parametrize("size", [300_000, 2_500_000])  # one piece (a small package: it said "?"), and three
def test_the_upload_bar_shows_a_transfer_speed(size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tar = tmp_path / "p.tar"
    tar.write_bytes(b"x" * size)
    received: list[int] = []

    def server(request: httpx.Request) -> httpx.Response:
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
