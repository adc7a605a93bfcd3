"""The control plane's rollout driver task (`strata.control.app`) outlives a step that fails for any reason."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import pytest

from strata.control.app import _drive_rollouts_forever

if TYPE_CHECKING:
    from strata.control.plane import ControlPlane


def test_a_step_that_raises_an_unexpected_error_is_logged_and_the_driver_steps_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It caught StoreError and StrataError only: a ValueError from one rollout ended the task, and no rollout of any
    # model moved again until a restart.
    steps: list[int] = []
    done = asyncio.Event()

    def tick() -> int:
        steps.append(len(steps))
        if len(steps) == 1:
            raise ValueError("cannot convert float NaN to integer")
        done.set()
        return 0

    async def wait(_timeout: float) -> bool:
        await asyncio.sleep(0)
        return False

    plane = SimpleNamespace(
        settings=SimpleNamespace(rollout_interval_s=0.0, rollout_debounce_s=0.0),
        nudge=SimpleNamespace(wait=wait),
        rollout_lease=SimpleNamespace(held=lambda: True),
        rollouts=SimpleNamespace(tick=tick),
    )

    async def run() -> None:
        # The driver reads only these four attributes of its plane: a stand-in for the whole control plane.
        task = asyncio.create_task(_drive_rollouts_forever(cast("ControlPlane", plane)))
        await asyncio.wait_for(done.wait(), timeout=10)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="strata.control.app"):
        asyncio.run(run())
    assert len(steps) == 2
    [record] = [r for r in caplog.records if r.name == "strata.control.app"]
    assert record.exc_info is not None  # with its traceback
    assert "NaN" in str(record.exc_info[1])
