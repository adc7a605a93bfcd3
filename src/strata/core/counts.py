"""Counts held per key (connections per peer, requests per device, polls per node), for limits on what one caller
holds at once: a key is in the mapping only while it holds something, so the mapping stays as small as the callers
holding something now."""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def give_back(counts: dict[K, int], key: K, amount: int = 1) -> None:
    """`key` holds `amount` less; at nothing it leaves the mapping (a key not there holds nothing already)."""
    left = counts.pop(key, 0) - amount
    if left > 0:
        counts[key] = left


@contextlib.contextmanager
def holding(counts: dict[K, int], key: K, amount: int = 1) -> Iterator[None]:
    """`key` holds `amount` more for the block."""
    counts[key] = counts.get(key, 0) + amount
    try:
        yield
    finally:
        give_back(counts, key, amount)
