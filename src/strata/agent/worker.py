"""One of the agent's extra serving processes (see `strata.agent.processes`): `python -OO -m strata.agent.worker FD`.

FD is this process's end of its channel to the agent. The agent sends `setup` first (its configuration, this
process's index, the port, the serving token), then `load` and `activate` for each model it serves, `serve` (only
then does it take connections: one taken while it loads would be answered 404), `ready`,
`collect` (serving counts and metrics) and `stop`. The process ends when told to stop or when its channel closes
(the agent is gone). SIGTERM and SIGINT are the agent's to act on: a service manager that signals every process of
the service (systemd's default) would otherwise end this one in the middle of a load the agent waits for, and that
load would count as the version's failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from strata.agent.channel import Channel, Message
from strata.agent.config import EVENT_LOOPS, GOLDEN_TIMEOUT_S, AgentConfig
from strata.agent.httpd import AcceptShare, HttpServer
from strata.agent.metrics import InferenceMetrics
from strata.agent.oip_server import InferenceApp
from strata.agent.processes import AGENT_ONLY_METRICS, share, telemetry_config
from strata.agent.repository import LoadedModel, ModelRepository
from strata.agent.runtime import limit_malloc_arenas, load_and_check
from strata.agent.serving import ServingTracker
from strata.agent.telemetry import TelemetryRecorder
from strata.core.aio import run_serving
from strata.core.errors import StrataError
from strata.core.logformat import check_log_level
from strata.core.package import Manifest, Package, verify_package

log = logging.getLogger("strata.agent.worker")


class Worker:
    """A serving process's state: its repository, metrics, telemetry recorder and listener."""

    def __init__(self, channel: Channel, share_fd: int, listeners: list[socket.socket]) -> None:
        self.channel = channel
        self.share_fd = share_fd  # the memory where the node's serving processes say how many connections each holds
        self.listeners = listeners  # the agent's listening sockets, on which this process accepts too
        self.stopped = asyncio.Event()
        self.repository = ModelRepository()
        self.serving = ServingTracker()
        self.metrics: InferenceMetrics | None = None
        self.telemetry: TelemetryRecorder | None = None
        self.server: HttpServer | None = None
        self.share: AcceptShare | None = None
        self.app: InferenceApp | None = None
        self.threads: int | None = None
        self.golden_timeout_s = GOLDEN_TIMEOUT_S
        self.ready = False
        self._prepared: dict[str, LoadedModel] = {}

    async def handle(self, header: Message, blob: bytes) -> tuple[Message, bytes]:
        """Answer one message from the agent.

        Raises:
            StrataError: the request failed (a model that does not load, an unknown request).
        """
        op = header.get("op")
        if op == "setup":
            return await self._setup(header), b""
        if op == "load":
            model = await asyncio.get_running_loop().run_in_executor(None, self._load, header, blob)
            self._prepared[model.digest] = model
            return {}, b""
        if op == "activate":
            prepared = self._prepared.pop(header["digest"], None)
            if prepared is None:
                raise StrataError(f"package {header['digest']} was not loaded here")
            self.repository.put(prepared)
            return {}, b""
        if op == "discard":  # loaded, but another serving process could not load it: the node does not serve it
            self._prepared.pop(header["digest"], None)
            return {}, b""
        if op == "remove":
            self.repository.remove(header["name"])
            return {}, b""
        if op == "serve":
            if self.server is None or self.share is None:
                raise StrataError("serve before setup")
            self.ready = bool(header.get("ready", self.ready))  # an agent older than this code sends none
            await self.server.start(sockets=self.listeners, share=self.share)
            return {}, b""
        if op == "ready":
            self.ready = bool(header["ready"])
            return {}, b""
        if op == "collect":
            return self._collect(bool(header.get("metrics"))), b""
        if op == "stop":
            self.stopped.set()
            return {}, b""
        raise StrataError(f"unknown request {op!r}")

    async def _setup(self, fields: Message) -> Message:
        config = AgentConfig.from_json(fields["config"])
        logging.getLogger().setLevel(check_log_level(config.log_level))
        index, processes = int(fields["index"]), int(fields["processes"])
        self.threads = fields["threads"]
        self.golden_timeout_s = config.golden_timeout_s
        self.ready = bool(fields["ready"])
        self.metrics = InferenceMetrics(serving=self.serving, process=str(index))
        self.telemetry = TelemetryRecorder(telemetry_config(config))
        limits, batching = share(config, processes)
        app = InferenceApp(
            self.repository,
            self.metrics,
            token=fields["token"],
            ready=lambda: self.ready,
            telemetry=self.telemetry,
            batching=batching,
            max_body_bytes=config.max_request_bytes,
            decode_budget_bytes=limits.max_body_bytes_in_flight,
            metrics_view=self._node_metrics,
        )
        self.app = app
        self.server = app.http_server(limits)
        self.share = AcceptShare(self.share_fd, index, processes)  # its slot stays absent until it serves
        return {"pid": os.getpid()}

    def _load(self, fields: Message, blob: bytes) -> LoadedModel:
        """Load and check a package: sealed ones come decrypted in `blob`, ones in the clear are verified again
        in their folder.

        Raises:
            PackageError, VerificationError: the package changed on disk.
            ModelLoadError: it does not load or fails its golden check.
        """
        folder, digest = Path(fields["folder"]), str(fields["digest"])
        files: dict[str, bytes] | None = None
        if "manifest" in fields:
            package = Package(path=folder, manifest=Manifest.from_json(fields["manifest"]))
            files, offset = {}, 0
            for path, length in fields["files"]:
                files[path] = blob[offset : offset + length]
                offset += length
        else:
            package = verify_package(folder, digest)
        runtime = load_and_check(package, self.threads, files=files, check_timeout_s=self.golden_timeout_s)
        return LoadedModel(
            manifest=package.manifest, digest=digest, runtime=runtime, activated_at=fields["activated_at"]
        )

    def _collect(self, metrics: bool) -> Message:
        fields: Message = {"serving": self.serving.take()}
        if metrics and self.metrics is not None and self.app is not None:
            self.app.refresh_gauges()
            fields["metrics"] = self.metrics.registry.snapshot(leave_out=AGENT_ONLY_METRICS)
        return fields

    async def _node_metrics(self) -> str:
        """The node's /metrics page, which the agent assembles from every serving process."""
        fields, _ = await self.channel.request("metrics", timeout=30)
        return str(fields["text"])

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop()  # closes the listeners it accepted on
        for listener in self.listeners:  # ones it never served on: this process may outlive the agent (a load
            listener.close()  # under way ends first), and must not keep the node's port taking connections
        if self.telemetry is not None:
            self.telemetry.close()
        self.channel.close()


async def serve(sock: socket.socket, share_fd: int, listeners: list[socket.socket]) -> int:
    """Serve on `listeners` as the agent says over `sock` until told to stop; the exit code."""
    channel = await Channel.open(sock)
    worker = Worker(channel, share_fd, listeners)
    loop = asyncio.get_running_loop()
    # Ctrl-C reaches the whole process group, and a service manager may signal the whole service: the agent stops
    # this process itself, after the load under way and its last counts
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reader = loop.create_task(channel.serve(worker.handle))
    closed = loop.create_task(channel.closed.wait())
    stopped = loop.create_task(worker.stopped.wait())
    await asyncio.wait((closed, stopped), return_when=asyncio.FIRST_COMPLETED)
    await worker.close()
    for task in (reader, closed, stopped):
        task.cancel()
    return 0


def main() -> None:
    """Entry point: `python -OO -m strata.agent.worker LOOP CHANNEL_FD SHARE_FD LISTENER_FD...`."""
    if len(sys.argv) < 5 or sys.argv[1] not in EVENT_LOOPS or not all(arg.isdigit() for arg in sys.argv[2:]):
        sys.stderr.write(
            "usage: python -m strata.agent.worker uvloop|asyncio CHANNEL_FD SHARE_FD LISTENER_FD... (started by the"
            " agent, not by hand)\n"
        )
        sys.exit(2)
    limit_malloc_arenas()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[serving]: %(message)s", stream=sys.stderr
    )
    listeners = [socket.socket(fileno=int(fd)) for fd in sys.argv[4:]]
    sys.exit(run_serving(serve(socket.socket(fileno=int(sys.argv[2])), int(sys.argv[3]), listeners), sys.argv[1]))


if __name__ == "__main__":
    main()
