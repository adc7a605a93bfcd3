"""Attack tests: a real control plane and real agents on loopback, attacked the way the hardening issue says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from strata.localfleet import LocalFleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    """A running control plane; agents are started by each test. Everything is stopped afterwards."""
    with LocalFleet(tmp_path / "fleet", poll_wait_s=10) as running:
        running.start_server()
        yield running
