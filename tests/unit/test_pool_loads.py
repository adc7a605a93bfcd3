"""How the agent's serving pool takes a new model into its other serving processes (`ServingPool.put`), as pure
bookkeeping: each "serving process" here is a sleeping process with the other end of a real channel, answering the
way a worker would, or dying (closing its channel and killed) when asked to load. tests/e2e/test_crash_loading.py
kills a real worker in the middle of a real load."""

from __future__ import annotations

import asyncio
import gc
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from strata.agent.channel import Channel, Message
from strata.agent.config import AgentConfig
from strata.agent.pool import ServingPool, _Child
from strata.agent.repository import LoadedModel, MirrorStopping
from strata.agent.serving import ServingTracker
from strata.core.errors import ModelLoadError, StrataError


class Loop:
    """An event loop in its own thread: the pool lives there, `put` is called from this (the agent's loop) thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


class Process:
    """One serving process's far end: `behaviour` says what it does with a `load` (ok, error, die)."""

    def __init__(self, behaviour: str, on_load: Callable[[], None] | None = None) -> None:
        self.behaviour = behaviour
        self.on_load = on_load
        self.ops: list[str] = []
        self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        self.channel: Channel | None = None

    async def handle(self, header: Message, _blob: bytes) -> tuple[Message, bytes]:
        self.ops.append(str(header["op"]))
        if header["op"] == "load" and self.on_load is not None:
            self.on_load()
        if header["op"] == "load" and self.behaviour == "error":
            raise StrataError("model does not load here: golden check failed")
        if header["op"] == "load" and self.behaviour == "die":  # the OOM killer, in the middle of the load
            self.process.kill()
            assert self.channel is not None
            self.channel.close()
            await asyncio.sleep(30)
        return {}, b""


async def _child(index: int, far: Process) -> _Child:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = await Channel.open(ours)

    async def ignore(_header: Message, _blob: bytes) -> tuple[Message, bytes]:
        return {}, b""

    reader = asyncio.get_running_loop().create_task(channel.serve(ignore))
    far.channel = await Channel.open(theirs)
    asyncio.get_running_loop().create_task(far.channel.serve(far.handle))
    return _Child(index, far.process, channel, reader)


def make_pool(loop: Loop, tmp_path: Path, behaviours: list[str]) -> tuple[ServingPool, list[Process]]:
    config = AgentConfig(server="https://cp.example", data_dir=tmp_path, name="n1", tier="near-edge")
    package: Any = SimpleNamespace(path=tmp_path, manifest=None)  # the far ends read no package

    def open_package(_digest: str) -> tuple[Any, None]:
        return package, None

    pool = ServingPool(config, len(behaviours) + 1, 1, list, open_package, ServingTracker(), None)
    far = [Process(b) for b in behaviours]

    async def start() -> None:
        pool._loop = asyncio.get_running_loop()
        for index, process in enumerate(far, start=1):
            pool._children[index] = await _child(index, process)

    loop.run(start())
    return pool, far


def model(name: str, runtime: object | None = None) -> LoadedModel:
    fields = SimpleNamespace(name=name, version="2", digest=f"sha256:{name}", activated_at=0.0, runtime=runtime)
    return cast(LoadedModel, fields)


def commit(into: list[str], name: str) -> Callable[[], None]:
    """The agent's own swap, as `put` calls it last: here, a note that it ran."""

    def swap() -> None:
        into.append(name)

    return swap


def stop(far: list[Process]) -> None:
    for process in far:
        process.process.kill()
        process.process.wait(10)


def test_a_process_that_dies_in_a_load_fails_that_model_only_and_is_started_again_later(
    loop: Loop, tmp_path: Path
) -> None:
    pool, far = make_pool(loop, tmp_path, ["ok", "die"])
    committed: list[str] = []
    try:
        with pytest.raises(ModelLoadError, match="serving process 2 of the node's 3 could not load it: the serving"):
            pool.put(model("a"), commit(committed, "a"), everywhere=True)
        assert committed == []
        assert far[0].ops == ["load", "discard"]  # loaded, then dropped: the node does not serve it
        assert sorted(pool._children) == [1]  # the dead one is the supervisor's to start again, after its back-off
        assert pool._restart_at[2] > 0

        # The next model of the same pass goes to the processes alive: no failure of it.
        pool.put(model("b"), commit(committed, "b"), everywhere=True)
        assert committed == ["b"]
        assert far[0].ops == ["load", "discard", "load", "activate"]
    finally:
        stop(far)


def test_a_process_that_answers_why_keeps_serving_and_a_rollback_goes_on_without_it(loop: Loop, tmp_path: Path) -> None:
    pool, far = make_pool(loop, tmp_path, ["error"])
    committed: list[str] = []
    try:
        with pytest.raises(ModelLoadError, match="golden check failed"):
            pool.put(model("a"), commit(committed, "a"), everywhere=True)
        assert far[0].process.poll() is None  # alive, serving what it served
        assert sorted(pool._children) == [1]

        # A rollback (or a start) serves the model in the agent whatever the others do; the one that could not
        # load it is started again, with what the agent serves then.
        pool.put(model("b"), commit(committed, "b"))
        assert committed == ["b"]
        assert far[0].process.wait(10) is not None
        assert pool._children == {}
    finally:
        stop(far)


def test_the_agents_copy_of_a_model_that_failed_is_freed_at_once(loop: Loop, tmp_path: Path) -> None:
    """Without the cycle collector: the errors' tracebacks held the loads' frames, and so the model, in cycles."""
    pool, far = make_pool(loop, tmp_path, ["ok", "die"])

    class Runtime:
        pass

    gc.disable()
    try:
        runtime = Runtime()
        alive = weakref.ref(runtime)
        loaded = model("a", runtime)
        del runtime
        failed = False
        try:
            pool.put(loaded, lambda: None, everywhere=True)
        except ModelLoadError:  # as the reconciler takes it (pytest.raises would keep the traceback)
            failed = True
        del loaded
        assert failed
        assert alive() is None
    finally:
        gc.enable()
        stop(far)


def test_a_load_cut_by_the_agents_stop_is_no_failure_of_the_model(loop: Loop, tmp_path: Path) -> None:
    """The agent stops its serving processes while they load (it waited for the load as long as it waits):
    nothing is served, and the load is no failure of the model; a put asked once they are stopping is none either."""
    pool, far = make_pool(loop, tmp_path, ["die"])

    def stopping() -> None:  # what `stop` sets before it closes their channels
        pool._stopping = True

    far[0].on_load = stopping
    committed: list[str] = []
    try:
        with pytest.raises(MirrorStopping, match="stopped during the load"):
            pool.put(model("a"), commit(committed, "a"), everywhere=True)
        with pytest.raises(MirrorStopping, match="are stopping"):
            pool.put(model("b"), commit(committed, "b"), everywhere=True)
        assert committed == []
    finally:
        stop(far)
