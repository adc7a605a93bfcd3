"""A local caller floods a node's inference port with connections while the node's open files limit is small.

Each connection is a file descriptor. An agent at its limit can accept nothing, and it can open nothing either: its
state, a package it downloads, a connection to the control plane. The agent used to keep `--max-connections` (1024)
whatever its limit, and every connection refused at that cap lingered 2 s: a caller that opened connections faster
held every descriptor. Now the agent raises its soft limit to the hard one, keeps its listeners' caps
`FD_RESERVE` descriptors below it, and at most 64 refused connections linger; more are closed at once.
The agent here runs under a hard limit of 300 (`ulimit -n`), the control plane under the machine's.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from strata.core.package import pack_tar
from strata.localfleet import LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow

OPEN_FILES = 300
FLOOD = 450  # connections the caller keeps open, more than the agent's limit


def push(fleet: LocalFleet, model: Path, version: str, workdir: Path) -> None:
    package = build_package(model, workdir / version, name="digits", version=version, profile="cpu-generic")
    pack_tar(package, workdir / f"{version}.tar")
    fleet.client.push_package(workdir / f"{version}.tar")


def flood(port: int, stop: threading.Event) -> None:
    """Keep FLOOD connections open, each with a request head never finished; open a new one for each closed."""
    held: list[socket.socket] = []
    while not stop.is_set():
        while len(held) < FLOOD and not stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: node\r\n")
            except OSError:
                time.sleep(0.02)
                continue
            sock.setblocking(False)
            held.append(sock)
        time.sleep(0.2)
        for sock in list(held):
            try:
                closed = sock.recv(4096) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                held.remove(sock)
                sock.close()
    for sock in held:
        sock.close()


def test_a_caller_flooding_the_inference_port_leaves_the_agent_descriptors_for_its_own_work(
    fleet: LocalFleet, digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    push(fleet, digits_onnx, "1", tmp_path)
    push(fleet, digits_onnx_v2, "2", tmp_path)
    limited = tmp_path / "python"
    limited.write_text(f'#!/bin/sh\nulimit -n {OPEN_FILES}\nexec "{fleet.python}" "$@"\n')
    limited.chmod(0o755)
    fleet.python = str(limited)  # the agents started from now on
    agent = fleet.start_agent("edge")
    fleet.client.deploy("digits", "1", {})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    assert f"the open files limit is {OPEN_FILES}" in agent.process.log_path.read_text()

    stop = threading.Event()
    caller = threading.Thread(target=flood, args=(agent.serve_port, stop), daemon=True)
    caller.start()
    descriptors: list[int] = []

    def count() -> None:
        while not stop.is_set():
            descriptors.append(len(os.listdir(f"/proc/{agent.process.pid}/fd")))
            time.sleep(0.1)

    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    try:
        time.sleep(3)  # the flood at its height
        fleet.client.deploy("digits", "2", {})
        fleet.wait_for_versions({"edge": {"digits": "2"}})
    finally:
        stop.set()
        caller.join(10)
        counter.join(10)
    # the old agent sat at its limit (300 of 300) for the whole flood; this one closed what it could not hold
    assert max(descriptors) < OPEN_FILES - 50, descriptors
    assert "closing new connections on port" in agent.process.log_path.read_text()
