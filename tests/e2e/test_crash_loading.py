"""kill -9 and SIGTERM in the middle of a load: the agent, one of its serving processes, or every process at once
(split from test_crash.py so that test workers share the two)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from e2e_helpers import build_slow_model, hold, needs_two_cores, push_model, serving_worker, stop_held

from strata.agent.channel import Channel
from strata.agent.config import AgentConfig
from strata.agent.httpd import AcceptShare
from strata.core.errors import StrataError
from strata.core.package import Package
from strata.examples.compute import build_compute_model
from strata.localfleet import AgentHandle, LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow


def _serving_v1_with_v2_pushed(
    fleet: LocalFleet, tmp_path: Path, node: str, serve_processes: int = 1, extra_args: tuple[str, ...] = ()
) -> tuple[AgentHandle, Package]:
    """An agent `node` serving version 1 (a one-layer model), with version 2 pushed but not deployed: a model whose
    golden check takes a few seconds on this machine, the window in which these tests act (it must outlast their
    own scheduling on a busy machine)."""
    x = {"X": np.zeros((1, 64), np.float32)}
    small, heavy = tmp_path / "small.onnx", tmp_path / "heavy.onnx"
    build_compute_model(small, layers=1)
    build_slow_model(heavy)
    push_model(fleet, small, "1", tmp_path, sample=x)
    v2 = push_model(fleet, heavy, "2", tmp_path, sample=x)
    handle = fleet.start_agent(node, serve_processes=serve_processes, extra_args=list(extra_args))
    fleet.client.deploy("digits", "1", {})
    fleet.wait_for_versions({node: {"digits": "1"}})
    return handle, v2


@pytest.mark.parametrize(
    "processes",
    [1, pytest.param(2, marks=needs_two_cores)],
    ids=["in-its-own-load", "while-its-other-serving-process-loads"],
)
def test_an_agent_killed_while_loading_a_version_reports_it_failed_and_serves_the_previous_one(
    fleet: LocalFleet, tmp_path: Path, processes: int
) -> None:
    """kill -9 (as the OOM killer or a crash in a runtime would) while the agent loads version 2, a model whose golden
    check takes a second or so, or, serving from two processes, while its other process loads it after the agent's
    own load (their copies together are what overflows memory): the restarted agent serves version 1, records
    version 2 as a failure of its load ("health"), reports it to the control plane at once, and does not load it
    again until its retry time, where it used to load it again at once (and die again, forever, reporting
    nothing)."""
    if processes == 1:
        handle, v2 = _serving_v1_with_v2_pushed(fleet, tmp_path, "edge")
        fleet.client.deploy("digits", "2", {})
        loading = handle.data_dir / "state.json"
        fleet.wait_for(lambda: _loading(loading, v2), 60, "the agent to load version 2", handle.process, 0.002)
        hold(handle.process, lambda: _loading(loading, v2), "loading version 2")
        handle.process.kill()
    else:
        handle, v2, pid = _other_process_loading_v2(fleet, tmp_path)
        handle.process.kill()
        os.kill(pid, signal.SIGCONT)  # it finds the agent gone and ends
    state_path = handle.data_dir / "state.json"
    log_path = handle.process.log_path
    assert "activated digits 2" not in log_path.read_text(), "the kill should land while version 2 loads"

    before = len(log_path.read_text())
    restarted = fleet.start_agent("edge", serve_processes=processes)

    def reported() -> dict[str, object] | None:
        failures = fleet.nodes()["edge"]["failures"]
        return next((f for f in failures if f["version"] == "2"), None)

    failure = fleet.wait_for(reported, 30, "the failure of version 2 to be reported", restarted.process)
    assert failure["kind"] == "health", failure
    assert "died while loading" in str(failure["reason"]), failure
    assert fleet.nodes()["edge"]["models"] == {"digits": "1"}
    answer = httpx.post(
        f"{restarted.serve_url}/v2/models/digits/infer",
        json={"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == "1"
    state = json.loads(state_path.read_text())
    assert "loading" not in state
    assert state["failures"][v2.digest]["attempts"] == 1
    log = log_path.read_text()[before:]
    assert "loading digits 2" not in log, "version 2 was loaded again at once:\n" + log


@needs_two_cores
def test_a_serving_process_killed_while_it_loads_a_version_fails_that_version_and_the_node_keeps_the_previous(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    """Serving from two processes, the agent's other process is killed (as the OOM killer would: the two copies
    together overflow memory) while it loads version 2, after the agent's own load. Version 2 is that load's failure
    ("health"), reported at once; the node, both processes, goes on serving version 1. It used to switch the agent to
    version 2 and start the other process again on it, to die again, with the failure never counted."""
    handle, v2, pid = _other_process_loading_v2(fleet, tmp_path)
    state_path = handle.data_dir / "state.json"
    log_path = handle.process.log_path
    os.kill(pid, signal.SIGKILL)

    def worker() -> int | None:
        return serving_worker(handle.process.pid)

    def reported() -> dict[str, object] | None:
        failures = fleet.nodes()["edge"]["failures"]
        return next((f for f in failures if f["version"] == "2"), None)

    failure = fleet.wait_for(reported, 30, "the failure of version 2 to be reported", handle.process)
    assert failure["kind"] == "health", failure
    assert "serving process 1 of the node's 2 could not load it: the serving process is gone" in str(failure["reason"])
    log = log_path.read_text()
    assert "activated digits 2" not in log
    state = json.loads(state_path.read_text())
    assert state["models"]["digits"]["active"]["version"] == "1"
    assert "loading" not in state
    assert state["failures"][v2.digest]["attempts"] == 1
    assert fleet.nodes()["edge"]["models"] == {"digits": "1"}

    # Both processes serve version 1: the other one, started again, too (new connections land on both).
    fleet.wait_for(lambda: worker() not in (None, pid), 30, "the second process to start again", handle.process)
    fleet.wait_for(lambda: log_path.read_text().count("serving process 1 (pid") == 2, 30, "it to serve", handle.process)
    body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    versions = set()
    for _ in range(40):
        answer = httpx.post(f"{handle.serve_url}/v2/models/digits/infer", json=body, timeout=10)
        assert answer.status_code == 200, answer.text
        versions.add(answer.json()["model_version"])
    assert versions == {"1"}
    per_process = httpx.get(f"{handle.serve_url}/metrics").text
    assert 'strata_serving_process_requests{process="1"}' in per_process


@needs_two_cores
def test_a_service_managers_sigterm_to_every_process_in_the_middle_of_a_load_counts_no_failure(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    """systemd's default (KillMode=control-group) sends SIGTERM to the agent and its serving processes at once. While
    the other process loads version 2, that used to end it in the middle of the load, and the agent recorded version
    2 as a failed load, for the rollout gates to count: a restart. Now the serving processes leave SIGTERM to the
    agent, which lets the load finish and stops them itself."""
    handle, v2, pid = _other_process_loading_v2(fleet, tmp_path)
    state_path = handle.data_dir / "state.json"
    log_path = handle.process.log_path
    os.kill(pid, signal.SIGTERM)
    os.kill(handle.process.pid, signal.SIGTERM)
    waiting = "waiting up to 20 s for the load of digits 2"
    try:
        fleet.wait_for(lambda: waiting in log_path.read_text(), 30, "the agent to wait for the load", handle.process)
    finally:
        os.kill(pid, signal.SIGCONT)  # what systemd sends after its SIGTERM: the process goes on with its load
    assert handle.process.stop(timeout=40) == 0
    log = log_path.read_text()
    assert "activated digits 2" in log
    state = json.loads(state_path.read_text())
    assert v2.digest not in state.get("failures", {}), log
    assert "loading" not in state
    assert state["models"]["digits"]["active"]["version"] == "2"


def _other_process_loading_v2(fleet: LocalFleet, tmp_path: Path) -> tuple[AgentHandle, Package, int]:
    """An agent serving from two processes, version 1 active, told to run version 2 (a golden check of a few seconds
    in each process): returns once the agent loaded version 2, wrote it active and asked its other process to load
    it, with the agent's handle, version 2 as pushed and that process's pid. That process is held (SIGSTOP) from
    before the deployment until the caller kills it or sends SIGCONT."""
    handle, v2 = _serving_v1_with_v2_pushed(fleet, tmp_path, "edge", 2, ("--probation", "0"))
    state_path = handle.data_dir / "state.json"
    log_path = handle.process.log_path
    fleet.wait_for(lambda: "serving process 1 (pid" in log_path.read_text(), 30, "the second process", handle.process)
    pid = fleet.wait_for(lambda: serving_worker(handle.process.pid), 30, "the second serving process", handle.process)

    def other_process_loads_v2() -> bool:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            return bool(json.loads(state_path.read_text())["models"]["digits"]["active"]["version"] == "2")
        return False

    # Held before the deployment, the other process cannot finish its load before the test acts (on a busy machine
    # the test used to poll past its whole load, a second or two: the kill came after "activated"); the agent waits
    # for it (up to ten minutes) once its own load is done.
    os.kill(pid, signal.SIGSTOP)
    try:
        fleet.client.deploy("digits", "2", {})
        fleet.wait_for(other_process_loads_v2, 60, "the agent to ask its other process to load it", handle.process)
    except BaseException:  # not left stopped for the rest of the session, holding the agent's listening socket
        os.kill(pid, signal.SIGKILL)
        raise
    return handle, v2, pid


def _loading(state_path: Path, package: Package) -> bool:
    """The agent's loading record names `package`: its own load of it has begun."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        return bool(json.loads(state_path.read_text()).get("loading", {}).get("digest") == package.digest)
    return False


def test_an_agent_stopped_while_loading_a_version_finishes_the_load_and_counts_no_failure(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    """SIGTERM (a restart, an upgrade of the agent) while the agent loads version 2: it lets the load finish before
    it stops, so the next start does not read the loading record left behind as a load the agent died in, a failure
    of version 2 that the rollout gates would count against it."""
    handle, v2 = _serving_v1_with_v2_pushed(fleet, tmp_path, "stopped")
    state_path = handle.data_dir / "state.json"
    fleet.client.deploy("digits", "2", {})
    fleet.wait_for(lambda: _loading(state_path, v2), 60, "the agent to load version 2", handle.process, 0.002)
    hold(handle.process, lambda: _loading(state_path, v2), "loading version 2")
    assert stop_held(handle.process, timeout=30) == 0
    log = handle.process.log_path.read_text()
    assert "waiting up to 20 s for the load of digits 2" in log
    assert "activated digits 2" in log
    assert "loading" not in json.loads(state_path.read_text())

    restarted = fleet.start_agent("stopped")
    fleet.wait_for(lambda: fleet.agent_live("stopped"), 30, "the agent to serve", restarted.process)
    assert not [f for f in fleet.nodes()["stopped"]["failures"] if f["version"] == "2"]
    assert not json.loads(state_path.read_text()).get("failures")
    fleet.wait_for_versions({"stopped": {"digits": "2"}})


def test_a_serving_process_lets_go_of_the_port_once_the_agent_is_gone_though_it_loads(tmp_path: Path) -> None:
    """Review: a serving process takes connections only once told to serve, and until then kept its copy of the
    node's listening socket in a list it never closed. The agent gone (killed) while the process loaded, the process
    lived on for the rest of its load with the port in LISTEN: callers' connections were queued and never answered
    (not refused, so a client could not fail over), and the agent started again could not bind its port. Driven
    here over its channel as the agent drives it: set up, told to load a model whose golden check takes seconds, and
    the channel closed a moment later; the port must be free while the process still loads."""
    slow = tmp_path / "slow.onnx"
    build_slow_model(slow, seconds=4.0, max_layers=512)  # a load of seconds
    package = build_package(
        slow, tmp_path / "pkg", name="digits", version="1", sample={"X": np.zeros((1, 64), np.float32)}
    )
    worker, ours, listener, share, port = _serving_process()
    setup = _setup(tmp_path, port, ready=True)

    async def agent_goes_mid_load() -> None:
        channel, reader = await _set_up(ours, setup)
        load = {"digest": package.digest, "folder": str(package.path), "activated_at": time.time()}
        loading = asyncio.get_running_loop().create_task(channel.request("load", load, timeout=600))
        await asyncio.sleep(0.2)
        channel.close()  # the agent is gone: its end of the channel closes with it, and so does its listener
        await asyncio.gather(loading, reader, return_exceptions=True)

    try:
        asyncio.run(agent_goes_mid_load())
        listener.close()
        os.close(share)

        def port_free() -> bool:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    return False
                return True

        deadline = time.monotonic() + 1.0  # at once, not at the end of the load
        while not port_free() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert port_free(), "the serving process holds the node's port while it loads"
        assert worker.poll() is None, "the serving process ended (its load done) before the test could see it"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert worker.wait(120) == 0  # it ends once its load does
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_serving_process_serves_as_ready_as_the_node_is_when_it_starts_serving(tmp_path: Path) -> None:
    """Review: a serving process was told the node's readiness at its setup and then only on a change; a change
    while it loaded (another process loading a new version, with three or more) reached only the processes serving
    then, and this one answered /v2/health/ready with the old answer until the next change. The readiness now comes
    with `serve`."""
    worker, ours, listener, share, port = _serving_process()
    setup = _setup(tmp_path, port, ready=False)

    async def ready_by_the_time_it_serves() -> int:
        channel, reader = await _set_up(ours, setup)
        await channel.request("serve", {"ready": True}, timeout=60)
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=30)
        await channel.request("stop", timeout=60)
        channel.close()
        await asyncio.gather(reader, return_exceptions=True)
        return answer.status_code

    try:
        assert asyncio.run(ready_by_the_time_it_serves()) == 200
        assert worker.wait(60) == 0
    finally:
        listener.close()
        os.close(share)
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def _serving_process() -> tuple[subprocess.Popen[bytes], socket.socket, socket.socket, int, int]:
    """A serving process started as the agent starts one (its channel, the accept share, a listener): the process,
    the agent's end of its channel, the listener, the share's descriptor and the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    share = AcceptShare.create(2)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [theirs.fileno(), share.fd, listener.fileno()]
    argv = [sys.executable, "-OO", "-m", "strata.agent.worker", "asyncio", *map(str, fds)]
    worker = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL)
    theirs.close()
    return worker, ours, listener, share.fd, listener.getsockname()[1]


def _setup(tmp_path: Path, port: int, ready: bool) -> dict[str, Any]:
    """The `setup` message the agent sends its serving process 1 of 2."""
    config = AgentConfig(server="https://127.0.0.1:1", data_dir=tmp_path / "data", name="edge", tier="device")
    return {
        "config": config.to_json(),
        "index": 1,
        "processes": 2,
        "threads": 1,
        "port": port,
        "token": None,
        "ready": ready,
    }


async def _set_up(ours: socket.socket, setup: dict[str, Any]) -> tuple[Channel, asyncio.Task[None]]:
    """The agent's end of the channel, reading what the process sends, once the process has answered `setup`."""
    channel = await Channel.open(ours)
    reader = asyncio.get_running_loop().create_task(channel.serve(_unasked))
    await channel.request("setup", setup, timeout=60)
    return channel, reader


async def _unasked(header: dict[str, Any], blob: bytes) -> tuple[dict[str, Any], bytes]:
    raise StrataError(f"not asked for in this test: {header.get('op')}")


@needs_two_cores
def test_an_agent_stopped_while_a_serving_process_starts_ends_that_process(fleet: LocalFleet, tmp_path: Path) -> None:
    """Review: stopped (SIGTERM) while a serving process was starting (a restart after a crash, here), the agent
    exited and left it running, the node's listening socket in it: the pool's stop cancelled the start, which ended
    the process only when it failed. The process is held stopped (SIGSTOP) so that its start is surely under way."""
    model = tmp_path / "model.onnx"
    build_compute_model(model, layers=1)
    push_model(fleet, model, "1", tmp_path, sample={"X": np.zeros((1, 64), np.float32)})
    handle = fleet.start_agent("edge", serve_processes=2)
    fleet.client.deploy("digits", "1", {})
    fleet.wait_for_versions({"edge": {"digits": "1"}}, timeout=120)
    log = handle.process.log_path
    fleet.wait_for(lambda: "serving process 1 (pid" in log.read_text(), 60, "the second process", handle.process)
    first = fleet.wait_for(lambda: serving_worker(handle.process.pid), 30, "its pid", handle.process)
    os.kill(first, signal.SIGKILL)  # the agent starts it again
    again = fleet.wait_for(
        lambda: (pid := serving_worker(handle.process.pid)) not in (None, first) and pid,
        60,
        "the serving process to be started again",
        handle.process,
        0.005,
    )
    os.kill(again, signal.SIGSTOP)  # its start cannot end now: the agent waits for its answers
    try:
        assert handle.process.stop(timeout=30) == 0
        assert f"serving process 1 (pid {again}) serves" not in log.read_text()
        deadline = time.monotonic() + 5
        while _alive(again) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(again), "the agent exited and left the serving process it was starting"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(again, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
