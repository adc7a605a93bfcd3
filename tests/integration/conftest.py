"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from strata.agent.vault import Vault


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Vault]:
    """A node's vault (its worker child started on first use), in `tmp_path/node/trust`, closed after the test."""
    opened = Vault(tmp_path / "node" / "trust")
    yield opened
    opened.close()
