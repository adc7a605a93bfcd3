"""What the near-edge relay remembers between requests stays bounded on a node that runs for months: the control
plane's answers about (device, package) while they are good, the piece sets of recent packages."""

from __future__ import annotations

from strata.agent.relay import AUTH_TTL_S, PACKAGES_KEPT, Grants, RecentPackages


def test_expired_grants_are_forgotten_as_new_ones_come() -> None:
    grants = Grants()
    now = 1000.0
    for day in range(30):  # a new version a day, fetched by 100 devices
        for device in range(100):
            grants.grant(f"device-{device}", f"package-{day}", now)
        now += 86_400
    assert len(grants) == 100  # the last day's, not 3,000
    assert grants.allowed("device-7", "package-29", now - 86_400 + AUTH_TTL_S - 1)
    assert not grants.allowed("device-7", "package-29", now - 86_400 + AUTH_TTL_S)
    assert not grants.allowed("device-7", "package-28", now - 86_400)


def test_only_the_piece_sets_of_recent_packages_are_kept() -> None:
    recent = RecentPackages()
    for version in range(PACKAGES_KEPT * 3):
        recent[f"package-{version}"] = frozenset({f"piece-{version}"})
    assert len(recent) == PACKAGES_KEPT
    assert "package-0" not in recent
    assert recent[f"package-{PACKAGES_KEPT * 3 - 1}"] == frozenset({f"piece-{PACKAGES_KEPT * 3 - 1}"})
    oldest = f"package-{PACKAGES_KEPT * 2}"
    recent[oldest] = frozenset({"piece"})  # set again: now the newest
    recent["package-x"] = frozenset()
    assert oldest in recent
    assert f"package-{PACKAGES_KEPT * 2 + 1}" not in recent  # the oldest went instead
    assert len(recent) == PACKAGES_KEPT
