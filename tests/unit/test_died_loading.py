"""What a loading record left in the state means at the next start (`strata.agent.state.died_loading`)."""

from __future__ import annotations

import pytest

from strata.agent.state import LoadingRecord, died_loading

BOOT = "6f1c2d1e-0d4b-4c55-9f35-2b7f6f3f2a10"


def record(boot: str = BOOT, *, startup: bool = False, deaths: int = 0) -> LoadingRecord:
    return LoadingRecord("digits", "2", "cpu-generic-fp32", "sha256:" + "ab" * 32, 1_000.0, boot, startup, deaths)


@pytest.mark.parametrize(
    ("left", "verdict"),
    [
        (record(), "failed"),  # an activation the agent died in: the version's failure
        (record(startup=True), "again"),  # a start-up load of a served version, cut once: loaded once more
        (record(startup=True, deaths=1), "failed"),  # cut twice in a row in this boot
        (record("another-boot"), "rebooted"),  # a power cut or reboot in the load: nobody's failure
        (record("another-boot", startup=True, deaths=1), "rebooted"),
        # the third death in a row fails it whatever the boots: a load that resets the machine is not retried for ever
        (record("another-boot", deaths=2), "failed"),
        (record("another-boot", startup=True, deaths=2), "failed"),
        (record(""), "failed"),  # a record from before boot ids were kept: as before
    ],
)
def test_a_load_the_agent_died_in(left: LoadingRecord, verdict: str) -> None:
    assert died_loading(left, BOOT) == verdict


def test_without_a_boot_id_no_death_is_taken_for_a_reboot() -> None:
    """Where the kernel gives no boot id (not Linux), a record is judged as in the same boot."""
    assert died_loading(record(), "") == "failed"
    assert died_loading(record(startup=True), "") == "again"


def test_a_loading_record_round_trips_and_reads_the_older_form() -> None:
    left = record(startup=True, deaths=1)
    assert LoadingRecord.from_json(left.to_json()) == left
    older = {k: v for k, v in left.to_json().items() if k not in ("boot", "startup", "deaths")}
    assert LoadingRecord.from_json(older) == record("", startup=False, deaths=0)
    assert LoadingRecord.from_json({**left.to_json(), "deaths": -5, "startup": "yes"}).deaths == 0
    assert LoadingRecord.from_json({**left.to_json(), "startup": "yes"}).startup is False
