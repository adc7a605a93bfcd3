"""Counts held per key (`strata.core.counts`): a key is in the mapping only while it holds something."""

from __future__ import annotations

import pytest

from strata.core.counts import give_back, holding


def test_a_key_holds_for_its_block_and_leaves_the_mapping_when_it_holds_nothing() -> None:
    counts: dict[str, int] = {}
    with holding(counts, "edge-1"), holding(counts, "edge-1", 3):
        assert counts == {"edge-1": 4}
    assert counts == {}
    with pytest.raises(RuntimeError), holding(counts, "edge-2"):  # an error in the block gives it back too
        raise RuntimeError
    assert counts == {}
    counts["edge-3"] = 5
    give_back(counts, "edge-3", 2)
    assert counts == {"edge-3": 3}
    give_back(counts, "edge-3", 3)
    give_back(counts, "never-held")
    assert counts == {}
