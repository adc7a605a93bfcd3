"""Helpers for the end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from strata.agent.processes import usable_cores
from strata.agent.store import ArtifactStore
from strata.agent.vault import Vault
from strata.core.oip import encode_request
from strata.core.package import Package, pack_tar
from strata.localfleet import LocalFleet, ManagedProcess
from strata.package_build import build_package

# Hardware, not a gap: the agent refuses more serving processes than the cores it may run on (they would fight over
# them: processes.plan_serving), so two processes cannot start on one core; CI's machines have two.
needs_two_cores = pytest.mark.skipif(
    usable_cores() < 2,
    reason="two serving processes need two usable cores (the agent refuses more processes than cores); one here",
)


def push_model(
    fleet: LocalFleet,
    model: Path,
    version: str,
    workdir: Path,
    profile: str = "cpu-generic",
    sample: dict[str, Any] | None = None,
    sign_key: Path | None = None,
    metrics: dict[str, Any] | None = None,
) -> Package:
    """Build a package for `model` (with drift references when `sample` is given, and the optimizer's `metrics`
    when given) and upload it, signed with the release key `sign_key` when given."""
    package = build_package(
        model,
        workdir / f"pkg-{version}-{profile}",
        name="digits",
        version=version,
        profile=profile,
        sample=sample,
        metrics=metrics,
    )
    signature = None
    if sign_key is not None:
        from strata.trust.release import sign_release

        signature = sign_release(package.path, sign_key, time.time(), 30 * 86400).to_base64()
    tar = workdir / f"digits-{version}-{profile}.tar"
    pack_tar(package, tar)
    fleet.client.push_package(tar, signature=signature)
    return package


def infer_request(port: int, x: np.ndarray[Any, Any]) -> bytes:
    """A prebuilt HTTP/1.1 Open Inference Protocol request for the digits model (binary tensors)."""
    body, length = encode_request({"X": x.astype(np.float32)}, outputs=["label"])
    head = (
        f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {length}\r\n\r\n"
    )
    return head.encode() + body


async def _connection(port: int, request: bytes, quota: list[int], counts: dict[str, int]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        counts["failed"] += 1
        return
    try:
        while quota[0] > 0:
            quota[0] -= 1
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError):
                counts["failed"] += 1
                return
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            counts["ok" if head.startswith(b"HTTP/1.1 200") else "failed"] += 1
    finally:
        writer.close()


def serving_worker(agent_pid: int) -> int | None:
    """The pid of the agent's serving process (`strata.agent.worker`), None while it has none."""
    for pid in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        with contextlib.suppress(FileNotFoundError):
            if b"strata.agent.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
    return None


def hammer(port: int, request: bytes, count: int, concurrency: int = 16) -> dict[str, int]:
    """Send `count` requests over `concurrency` keep-alive connections; count 200s and everything else."""
    counts = {"ok": 0, "failed": 0}
    quota = [count]

    async def run() -> None:
        await asyncio.gather(*(_connection(port, request, quota, counts) for _ in range(concurrency)))

    asyncio.run(run())
    return counts


def assert_consistent(fleet: LocalFleet, name: str) -> None:
    """Every package the agent kept verifies (decrypted with the node's key, as the agent reads them), and every
    slot points at one of them."""
    data_dir = fleet.agents[name].data_dir
    packages = data_dir / "packages"
    vault = Vault(data_dir / "trust")
    try:
        store = ArtifactStore(data_dir, vault)
        for folder in packages.iterdir():
            if not folder.name.startswith("."):
                _, files = store.open("sha256:" + folder.name)
                assert files is not None  # sealed at rest: decrypted and hash-checked in memory
    finally:
        vault.close()
    state = json.loads((data_dir / "state.json").read_text()) if (data_dir / "state.json").exists() else {}
    for slots in state.get("models", {}).values():
        assert (packages / slots["active"]["digest"].split(":")[1]).is_dir()


def processes_mentioning(text: str) -> list[int]:
    """The processes whose command line or environment names `text` (the demo's folder: its server is started in
    it, and its agents, which exec into `python -OO -m strata.agent`, carry their data folder in
    STRATA_AGENT_CONFIG)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                seen = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            except OSError:  # the process ended while we looked, or is not ours to read
                continue
            if text in seen.decode(errors="replace"):
                found.append(int(entry.name))
    return found


def build_slow_model(path: Path, seconds: float = 2.5, max_layers: int = 96) -> None:
    """A digits-shaped compute model whose one-row run (its golden check) takes about `seconds` on one thread of
    this machine, at most `max_layers` layers (about 65 KB of weights and 10 ms a row each here): its layers are
    scaled from a timed probe. A fixed size took 0.2 s on a CPU with AMX where it took a second elsewhere, and a test
    acting inside a load (a kill, a stop) lost its window under a busy test run."""
    from strata.examples.compute import build_compute_model

    probe = path.with_name(path.stem + "-probe.onnx")
    build_compute_model(probe, layers=4, replicas=49152)
    elapsed = max(one_row_cpu_seconds(probe), 1e-3)
    probe.unlink()
    build_compute_model(path, layers=max(4, min(max_layers, round(4 * seconds / elapsed))), replicas=49152)


def one_row_cpu_seconds(model: Path) -> float:
    """The CPU time of one digits-shaped row through `model` on one thread (after a first run). CPU time, not wall
    time: one intra-op thread runs on this thread, and a probe timed by the clock while other test workers were busy
    came out several times too slow, the model built from it that much too small."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    row = {"X": np.zeros((1, 64), np.float32)}
    session.run(None, row)
    started = time.thread_time()
    session.run(None, row)
    return time.thread_time() - started


def hold(process: ManagedProcess, still: Callable[[], bool], what: str) -> None:
    """Hold `process` (SIGSTOP) where the test found it, checking that it is still there (`still`): a test that acts
    inside a load must not find the load over by the time it acts, as a test paused on a busy machine did."""
    os.kill(process.pid, signal.SIGSTOP)
    stat = Path(f"/proc/{process.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T" and time.monotonic() < deadline:
        time.sleep(0.001)  # the signal is delivered, not yet acted on: `still` must see the process stopped
    assert still(), f"{process.name} was no longer {what} when held"


def stop_held(process: ManagedProcess, timeout: float) -> int | None:
    """SIGTERM, then SIGCONT (what systemd sends) to a process `hold` holds: its exit status."""
    assert process.popen is not None
    os.kill(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGCONT)
    return process.popen.wait(timeout)
