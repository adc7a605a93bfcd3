"""The agent's HTTP server at its process's open files limit: accept fails with EMFILE, and the listener waits a
second and takes connections again once descriptors are free, without spinning and with one warning.

It runs in a child process whose soft limit is lowered to what it holds plus a few, so that the test's own process
keeps its descriptors.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from strata.agent.httpd import HttpServer, Request, Response

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


def test_servers_sharing_a_listener_give_new_connections_to_the_one_holding_fewest() -> None:
    """The agent and its serving processes accept on one listening socket: woken together by a new connection,
    the one holding fewest connections takes it. Two servers here, in one loop on two descriptors of one socket
    (as two processes hold it): the first holds 6 keep-alive connections when the second starts, and the next 6
    go to the second (taking turns, or SO_REUSEPORT's hash of the client's port, would give it about half)."""

    async def handler(request: Request) -> Response:
        return Response(200, {}, b"ok")

    async def connect(port: int, writers: list[asyncio.StreamWriter]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"ok"), 10)  # answered: one of the two took it
        writers.append(writer)

    async def main() -> tuple[int, int]:
        first, second = HttpServer(handler), HttpServer(handler)
        await first.start("127.0.0.1", 0, shared=True)
        writers: list[asyncio.StreamWriter] = []
        for _ in range(6):
            await connect(first.port, writers)
        await second.start(sockets=[listener.dup() for listener in first.listeners])
        for _ in range(6):
            await connect(first.port, writers)
        counts = first.connections, second.connections
        for writer in writers:
            writer.close()
        await first.stop()
        await second.stop()
        return counts

    assert asyncio.run(main()) == (6, 6)
