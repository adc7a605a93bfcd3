"""The agent's HTTP server at its process's open files limit: accept fails with EMFILE, and the listener waits a
second and takes connections again once descriptors are free, without spinning and with one warning.

It runs in a child process whose soft limit is lowered to what it holds plus a few, so that the test's own process
keeps its descriptors.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from strata.agent.httpd import AcceptShare

CHILD = r"""
import asyncio, json, logging, os, resource, socket, time
from strata.agent.httpd import HttpServer, Response

warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("strata.agent.httpd").addHandler(Catch())

async def handler(request):
    return Response(200, {}, b"ok")

async def get(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer.split(b"\r\n", 1)[0].decode()

async def main():
    server = HttpServer(handler)
    await server.start("127.0.0.1", 0)
    port = server.port
    assert await get(port) == "HTTP/1.1 200 OK"
    # room for the clients' sockets and no more: the server's accept finds no descriptor left
    clients = []
    held = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (held + 4, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    for _ in range(8):
        try:
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    cpu = time.process_time()
    await asyncio.sleep(2.5)  # the listener waits out EMFILE
    spent = time.process_time() - cpu
    for sock in clients:
        sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (held + 64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    deadline = time.monotonic() + 5
    status = None
    while status is None and time.monotonic() < deadline:
        try:
            status = await get(port)
        except OSError:
            await asyncio.sleep(0.2)
    await server.stop()
    print(json.dumps({"status": status, "cpu_s": spent, "warnings": warnings, "clients": len(clients)}))

asyncio.run(main())
"""


def test_a_listener_out_of_descriptors_waits_and_serves_again_without_spinning() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["clients"] >= 4  # connections the kernel queued, which the server could not all take
    emfile = [w for w in result["warnings"] if "Too many open files" in w]
    assert len(emfile) == 1, result["warnings"]  # once a minute, not once per attempt
    assert result["cpu_s"] < 0.5, result  # it waited; it did not spin on accept
    assert result["status"] == "HTTP/1.1 200 OK"  # and took connections again once descriptors were free


SHARED_CHILD = r"""
import asyncio, socket, sys
from strata.agent import httpd
from strata.agent.httpd import AcceptShare, HttpServer, Response

# what is tested is whose the connection is, not how fast the other process comes round: on a loaded machine (the
# suite's other workers) a process may not run for the few milliseconds the agent waits
httpd._CROWDED_PAUSE_S = 0.5

async def handler(request):
    return Response(200, {}, b"ok")

async def main():
    server = HttpServer(handler)
    share = AcceptShare(int(sys.argv[3]), int(sys.argv[4]), 2)
    await server.start(sockets=[socket.socket(fileno=int(sys.argv[2]))], share=share)
    print("up", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(server.connections, flush=True)
    await server.stop()

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_processes_sharing_a_listener_leave_new_connections_to_the_one_holding_fewer(loop: str) -> None:
    """The agent and its serving processes accept on one listening socket and say in shared memory how many
    connections each holds (`AcceptShare`): one holding at least two more leaves a new connection to the other.
    Two real processes here, on either event loop: the first holds 10 keep-alive connections when the second
    starts, and of the next 10 the second takes at least 8 (a queue each, SO_REUSEPORT, or taking turns on one
    queue would give it about half)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    share = AcceptShare.create(2)
    held: list[socket.socket] = []
    children: list[subprocess.Popen[str]] = []

    def start(index: int) -> None:
        fds = (listener.fileno(), share.fd)
        argv = [sys.executable, "-c", SHARED_CHILD, loop, str(fds[0]), str(fds[1]), str(index)]
        child = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "up"

    def connect() -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert b"ok" in sock.recv(1000)  # answered: one of the two took it
        held.append(sock)

    try:
        start(0)
        for _ in range(10):
            connect()
        start(1)
        for _ in range(10):
            connect()
        counts = []
        for child in children:
            assert child.stdin is not None
            assert child.stdout is not None
            child.stdin.close()
            counts.append(int(child.stdout.readline()))
    finally:
        for sock in held:
            sock.close()
        for child in children:
            child.kill()
            child.wait(10)
        listener.close()
        os.close(share.fd)
    assert counts[0] + counts[1] == 20
    assert counts[1] >= 8, counts


@pytest.mark.parametrize("memfd", [True, False])
def test_the_accept_share_counts_what_each_process_says_and_leaves_out_the_absent(
    memfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where there is no memfd (not Linux), an unlinked temporary file holds the counts; a second mapping of the
    same descriptor (a serving process's) sees what the first publishes, and an absent process counts for none."""
    if not memfd:
        monkeypatch.delattr(os, "memfd_create")
    agent = AcceptShare.create(3)
    try:
        worker = AcceptShare(agent.fd, 1, 3)
        assert not agent.crowded(100)  # nobody else serves yet
        worker.publish(3)
        assert agent.crowded(5)
        assert not agent.crowded(4)
        assert worker.crowded(3) is False
        agent.publish(0)
        assert worker.crowded(3)
        agent.mark_absent(1)  # the worker died
        worker_view = AcceptShare(agent.fd, 2, 3)
        assert not worker_view.crowded(1)  # only the agent's 0 counts: 1 is not two more
        assert worker_view.crowded(2)
    finally:
        os.close(agent.fd)
