"""`strata.localfleet.free_port` in a range of its own (the suite's workers each have one): in turn, past the
ports in use, and a clear error for a malformed or exhausted range."""

from __future__ import annotations

import socket

import pytest

from strata.localfleet import PORTS_ENV, FleetError, free_port


def _range_of_free_ports(size: int) -> tuple[int, int]:
    """`size` consecutive ports free now, below the kernel's ephemeral ones (from 32768 on this suite's machines)
    and above the ranges the suite's xdist workers take (`tests/conftest.py`: the top 2000 are a single run's)."""
    for low in range(32768 - size, 30800, -size):
        sockets = []
        try:
            for port in range(low, low + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return low, low + size - 1
    pytest.fail("no free ports to test with")


def test_ports_come_in_turn_past_those_in_use_and_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    low, high = _range_of_free_ports(4)
    monkeypatch.setenv(PORTS_ENV, f"{low}-{high}")
    first = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first + 1 if first < high else low))
        taken.listen()
        second = free_port()
        assert second not in (first, taken.getsockname()[1])
        seen = {first, second, free_port()}
    assert seen <= set(range(low, high + 1))
    assert len(seen) == 3  # no port handed out twice while others were free


def test_a_range_with_no_free_port_or_no_range_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    low, _ = _range_of_free_ports(1)
    monkeypatch.setenv(PORTS_ENV, f"{low}-{low}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", low))
        taken.listen()
        with pytest.raises(FleetError, match=f"no port of {PORTS_ENV}={low}-{low} is free"):
            free_port()
    for bad in ("20000", "a-b", "80-90", "30000-20000"):
        monkeypatch.setenv(PORTS_ENV, bad)
        with pytest.raises(FleetError, match=PORTS_ENV):
            free_port()


def test_without_a_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PORTS_ENV)
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free, as said
