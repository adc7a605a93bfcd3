"""The agent's extra serving processes (see `strata.agent.processes` for what stays one for the node): started,
fed each model, asked for their counts and metrics, restarted when they end. Imported only on nodes that serve
from more than one process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from strata.agent.channel import Channel, Message
from strata.agent.config import AgentConfig
from strata.agent.httpd import AcceptShare
from strata.agent.metrics import RegistrySnapshot
from strata.agent.repository import Commit, LoadedModel, MirrorStopping
from strata.agent.serving import ServingTracker
from strata.core.errors import ModelLoadError, StrataError, Unavailable
from strata.core.package import Package

log = logging.getLogger("strata.agent.pool")

SETUP_TIMEOUT_S: Final = 60.0
LOAD_TIMEOUT_S: Final = 600.0  # a large model's load and golden check in a busy process (see `load_timeout_s`)
COLLECT_TIMEOUT_S: Final = 10.0
COLLECT_INTERVAL_S: Final = 1.0  # serving counts reach probation this late at most
RESTART_DELAY_S: Final = 1.0  # before a serving process that ended starts again; doubled while it keeps failing
RESTART_DELAY_MAX_S: Final = 60.0
STABLE_S: Final = 60.0  # a process that served this long starts again after the first delay when it ends
STOP_GRACE_S: Final = 10.0


def restart_delay(previous: float | None, served_s: float | None) -> float:
    """How long to wait before starting a serving process again: `RESTART_DELAY_S` after one that served
    `STABLE_S` or more (or the first time); double the previous delay, up to `RESTART_DELAY_MAX_S`, after one that
    ended sooner or did not start (`served_s` None), so a process that dies at every start (a model whose load kills
    it, a broken install) is not started again every second for ever."""
    if previous is None or (served_s is not None and served_s >= STABLE_S):
        return RESTART_DELAY_S
    return min(2 * previous, RESTART_DELAY_MAX_S)


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes]
    channel: Channel
    reader: asyncio.Task[None]
    started_at: float = 0.0  # event-loop time when it began to serve


class ServingPool:
    """The agent's extra serving processes (see the module docstring); lives on the agent's event loop.

    Args:
        config: the agent's configuration (sent to each process).
        processes: serving processes in all, the agent's own included.
        threads: onnxruntime intra-op threads per model in each.
        models: the models the agent serves now (a process that starts loads them).
        open_package: a staged package by digest, verified, with its files decrypted when sealed (None in
            the clear): `ArtifactStore.open`. Called on an executor thread.
        serving: the agent's serving tracker, where the processes' counts are added.
        token: the serving token the processes require (None on loopback).
    """

    def __init__(
        self,
        config: AgentConfig,
        processes: int,
        threads: int | None,
        models: Callable[[], list[LoadedModel]],
        open_package: Callable[[str], tuple[Package, dict[str, bytes] | None]],
        serving: ServingTracker,
        token: str | None,
    ) -> None:
        self._config = config
        self._processes = processes
        self._threads = threads
        self._models = models
        self._open_package = open_package
        self._serving = serving
        self._token = token
        self._children: dict[int, _Child] = {}
        self._swap = asyncio.Lock()  # a start's loads and an activation's do not interleave
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port = 0
        self._listeners: list[socket.socket] = []
        # where each serving process (the agent's is 0) says how many connections it holds; handed down to each
        self.accept_share = AcceptShare.create(processes)
        self._ready = False
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._restart_at: dict[int, float] = {}  # by process index: event-loop time it may start again
        self._restart_delay: dict[int, float] = {}
        self.render: Callable[[list[RegistrySnapshot]], Awaitable[str]] | None = None

    @property
    def load_timeout_s(self) -> float:
        """How long a serving process may take to load a model and pass its golden check (itself bounded by the
        agent's --golden-timeout)."""
        return max(LOAD_TIMEOUT_S, 2 * self._config.golden_timeout_s)

    @property
    def pids(self) -> list[int]:
        """The process ids of the serving processes running now (the agent's own not included)."""
        return [child.process.pid for child in self._children.values()]

    def start(self, port: int, listeners: list[socket.socket]) -> None:
        """Start the serving processes, each accepting on the agent's listening sockets for `port` (`listeners`,
        handed down at their start, with the memory where each says how many connections it holds:
        `accept_share`) and loading the served models, in the background (the agent serves meanwhile); call on
        the event loop."""
        self._loop = asyncio.get_running_loop()
        self._port = port
        self._listeners = listeners
        self._supervisor = self._loop.create_task(self._supervise())

    async def _start_child(self, index: int) -> None:
        """Start serving process `index` and load the served models into it; a failure is logged (the
        supervisor tries again)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), self.accept_share.fd, *(listener.fileno() for listener in self._listeners)]
        argv = [sys.executable, "-OO", "-m", "strata.agent.worker", self._config.serving_loop, *map(str, fds)]
        try:
            process = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            log.error("cannot start serving process %d: %s", index, exc)
            return
        finally:
            theirs.close()
        try:
            channel = await Channel.open(ours)
        except BaseException:  # cancelled (the pool stops), or the socket failed: no process left running
            ours.close()
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
            raise
        child = _Child(index, process, channel, asyncio.get_running_loop().create_task(channel.serve(self._answer)))
        setup = {
            "config": self._config.to_json(),
            "index": index,
            "processes": self._processes,
            "threads": self._threads,
            "port": self._port,
            "token": self._token,
            "ready": self._ready,
        }
        try:
            await channel.request("setup", setup, timeout=SETUP_TIMEOUT_S)
            async with self._swap:
                for model in self._models():
                    opened = await self._open(model.digest)
                    await self._load(child, model, opened)
                    await channel.request(
                        "activate", {"name": model.name, "digest": model.digest}, timeout=SETUP_TIMEOUT_S
                    )
                # connections only once it serves what the node serves: one it took while it loaded would be
                # answered 404 (the node says it serves the model; this process does not yet). Its readiness is
                # the node's now: one changed while it loaded was told only to the processes serving then
                ready = self._ready
                await channel.request("serve", {"ready": ready}, timeout=SETUP_TIMEOUT_S)
                child.started_at = asyncio.get_running_loop().time()
                self._children[index] = child
                if self._ready != ready:  # changed while it was told
                    channel.send("ready", {"ready": self._ready})
        except Exception as exc:  # a StrataError, or one reading its package (OSError): the supervisor goes on
            self._kill(child)
            delay = self._back_off(index, None)
            reason = exc if isinstance(exc, StrataError) else f"{type(exc).__name__}: {exc}"
            log.error("serving process %d did not start: %s; trying again in %g s", index, reason, delay)
            return
        except BaseException:  # cancelled (the pool stops): a process not yet serving is not left running
            self._kill(child)
            raise
        log.info("serving process %d (pid %d) serves on port %d", index, process.pid, self._port)

    async def _open(self, digest: str) -> tuple[Package, dict[str, bytes] | None]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._open_package, digest)

    async def _load(self, child: _Child, model: LoadedModel, opened: tuple[Package, dict[str, bytes] | None]) -> None:
        """Have one serving process load and check a model (not serve it yet).

        Raises:
            StrataError: it could not (its message), or it is gone.
        """
        package, files = opened
        fields: Message = {"digest": model.digest, "folder": str(package.path), "activated_at": model.activated_at}
        blob = b""
        if files is not None:
            fields["manifest"] = package.manifest.to_json()
            fields["files"] = [[path, len(data)] for path, data in files.items()]
            blob = b"".join(files.values())
        await child.channel.request("load", fields, blob, timeout=self.load_timeout_s)

    # --- the repository's mirror (called from the agent's loop thread) ------------------------------------

    def put(self, model: LoadedModel, commit: Commit, *, everywhere: bool = False) -> LoadedModel | None:
        """Serve `model` in every serving process, then `commit` (the agent's own swap, whose result this
        returns), on the event loop. Blocks the calling thread (the agent's loop thread, never the event
        loop's) until done. A process that cannot load it is started again (with what the agent serves then);
        with `everywhere`, no process serves it then and nothing is committed.

        Raises:
            ModelLoadError: `everywhere`, and a serving process could not load the model.
            MirrorStopping: `everywhere`, and the serving processes were stopped meanwhile.
        """
        return self._call(self._put(model, commit, everywhere), commit, everywhere)

    def remove(self, name: str, commit: Commit) -> LoadedModel | None:
        """Stop serving model `name` in every serving process, then in the agent (`commit`)."""
        return self._call(self._remove(name, commit), commit)

    def _call(
        self, work: Coroutine[Any, Any, LoadedModel | None], commit: Commit, everywhere: bool = False
    ) -> LoadedModel | None:
        loop = self._loop
        if loop is None or self._stopping or loop.is_closed():
            work.close()
            if everywhere and self._stopping:
                raise MirrorStopping("the serving processes are stopping")
            return commit()
        try:
            future = asyncio.run_coroutine_threadsafe(work, loop)
        except RuntimeError as exc:  # the loop closed in between
            work.close()
            if everywhere:
                raise MirrorStopping(f"the serving processes stopped: {exc}") from exc
            return commit()
        try:
            # A new version waits as long as it takes: every step it waits for is bounded (each load, each message,
            # a starting process's loads ahead of it), and a limit here would count a wait for the others as a
            # failure of the version. Other changes give up after a while and are made here regardless.
            return future.result(timeout=None if everywhere else self.load_timeout_s * 2)
        except TimeoutError:
            future.cancel()  # no later commit over whatever the agent does next
            log.warning("serving processes were not updated in %g s", self.load_timeout_s * 2)
            return commit()
        except concurrent.futures.CancelledError as exc:  # the event loop ended under it (the agent stopped)
            if everywhere:
                raise MirrorStopping("the serving processes stopped") from exc
            return commit()
        except RuntimeError as exc:
            if not (self._stopping or loop.is_closed()):
                raise  # a bug, not the agent stopping: said as it is
            if everywhere:
                raise MirrorStopping(f"the serving processes stopped: {exc}") from exc
            log.warning("serving processes were not updated: %s", exc)
            return commit()
        finally:
            del future  # it holds what it raised, whose traceback holds this frame: no cycle left for the collector

    async def _put(self, model: LoadedModel, commit: Commit, everywhere: bool) -> LoadedModel | None:
        async with self._swap:
            # Those alive now: one that ended is the supervisor's to start again (with what the agent serves then),
            # not a failure of this model.
            children = [c for c in self._children.values() if self._alive(c)]
            if children:
                opened = await self._open(model.digest)
                loaded = await asyncio.gather(*(self._load(c, model, opened) for c in children), return_exceptions=True)
                del opened
                ready, failed = [], []
                for child, outcome in zip(children, loaded, strict=True):
                    if not isinstance(outcome, BaseException):
                        ready.append(child)
                        continue
                    # Its text, not the error: a log record kept (by a test's handler, say) would keep its
                    # traceback, and so the model.
                    reason = str(outcome)
                    failed.append((child.index, reason))
                    log.error(
                        "serving process %d cannot load %s %s: %s", child.index, model.name, model.version, reason
                    )
                    # Gone or hung (its copy took the machine's memory, say): started again later, with what the
                    # agent serves then. One that answered why keeps serving what it served, unless the agent
                    # moves on without it.
                    if isinstance(outcome, Unavailable) or not isinstance(outcome, StrataError) or not everywhere:
                        self._retire(child)
                # The errors' tracebacks hold the loads' frames, and so the agent's copy of the model: a raise from
                # this frame would keep them alive until the cycle collector runs.
                del loaded, outcome
                fields = {"name": model.name, "digest": model.digest}
                if failed and everywhere:
                    discard = {"digest": model.digest}
                    await asyncio.gather(
                        *(c.channel.request("discard", discard, timeout=SETUP_TIMEOUT_S) for c in ready),
                        return_exceptions=True,
                    )
                    if self._stopping:  # stopped under the load: no failure of the model
                        raise MirrorStopping("the serving processes were stopped during the load")
                    index, reason = failed[0]
                    raise ModelLoadError(
                        f"serving process {index} of the node's {self._processes} could not load it: {reason}"
                    )
                await asyncio.gather(
                    *(c.channel.request("activate", fields, timeout=SETUP_TIMEOUT_S) for c in ready),
                    return_exceptions=True,
                )
            return commit()

    @staticmethod
    def _alive(child: _Child) -> bool:
        return not child.channel.closed.is_set() and child.process.poll() is None

    def _retire(self, child: _Child) -> None:
        """End a serving process that ended by itself or failed a load, and have the supervisor start it again
        after its back-off (it is no longer one of those that serve, so nothing else is sent to it)."""
        self._kill(child)
        if self._children.get(child.index) is not child:  # retired already (the supervisor saw it end first)
            return
        del self._children[child.index]
        served_s = asyncio.get_running_loop().time() - child.started_at
        delay = self._back_off(child.index, served_s)
        log.warning(
            "serving process %d ended (exit status %s) after %.0f s; starting it again in %g s",
            child.index,
            child.process.returncode,
            served_s,
            delay,
        )

    async def _remove(self, name: str, commit: Commit) -> LoadedModel | None:
        async with self._swap:
            children = list(self._children.values())
            await asyncio.gather(
                *(c.channel.request("remove", {"name": name}) for c in children), return_exceptions=True
            )
            return commit()

    # --- one view of the node -----------------------------------------------------------------------------

    def set_ready(self, ready: bool) -> None:
        """Tell the serving processes whether the node is ready (their /v2/health/ready answers the same)."""
        if ready != self._ready:
            self._ready = ready
            for child in self._children.values():
                child.channel.send("ready", {"ready": ready})

    async def collect(self, metrics: bool = True) -> list[RegistrySnapshot]:
        """Take every serving process's serving counts into the agent's tracker; with `metrics`, return their
        metrics registries too."""
        children = list(self._children.values())
        answers = await asyncio.gather(
            *(c.channel.request("collect", {"metrics": metrics}, timeout=COLLECT_TIMEOUT_S) for c in children),
            return_exceptions=True,
        )
        snapshots = []
        for child, answer in zip(children, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("serving process %d did not report its counts: %s", child.index, answer)
                continue
            fields, _ = answer
            for model, version, requests, errors, latencies in fields["serving"]:
                self._serving.add(model, version, requests, errors, latencies)
            if metrics:
                snapshots.append(fields["metrics"])
        return snapshots

    async def render_metrics(self) -> str:
        """The node's /metrics page: the agent's registry with every serving process's added."""
        assert self.render is not None, "the agent sets `render` before serving"
        return await self.render(await self.collect())

    async def _answer(self, header: Message, _blob: bytes) -> tuple[Message, bytes]:
        """Requests from a serving process: its /metrics page, which is the node's.

        Raises:
            StrataError: an unknown request.
        """
        if header.get("op") == "metrics":
            return {"text": await self.render_metrics()}, b""
        raise StrataError(f"unknown request {header.get('op')!r}")

    # --- supervision ------------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Every second: take the processes' serving counts; start again a process that ended or never started."""
        await asyncio.gather(*(self._start_child(index) for index in range(1, self._processes)))
        while not self._stopping:
            await asyncio.sleep(COLLECT_INTERVAL_S)
            for index in range(1, self._processes):
                child = self._children.get(index)
                if child is not None and self._alive(child):
                    continue
                if child is not None:
                    self._retire(child)
                now = asyncio.get_running_loop().time()
                if not self._stopping and now >= self._restart_at.get(index, 0.0):
                    await self._start_child(index)
            with contextlib.suppress(StrataError):
                await self.collect(metrics=False)

    def _back_off(self, index: int, served_s: float | None) -> float:
        """Set when process `index` may start again (`restart_delay`); return the delay."""
        delay = restart_delay(self._restart_delay.get(index), served_s)
        self._restart_delay[index] = delay
        self._restart_at[index] = asyncio.get_running_loop().time() + delay
        return delay

    def _kill(self, child: _Child) -> None:
        self.accept_share.mark_absent(child.index)  # new connections are no longer left to it
        child.channel.close()
        if child.process.poll() is None:
            child.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(5)

    async def stop(self) -> None:
        """Stop the serving processes: each answers what it holds (up to its grace), then ends; their last
        serving counts are taken first."""
        if self._stopping:
            return
        with contextlib.suppress(StrataError):
            await self.collect(metrics=False)
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        children = list(self._children.values())
        self._children.clear()
        await asyncio.gather(
            *(c.channel.request("stop", timeout=STOP_GRACE_S) for c in children), return_exceptions=True
        )
        loop = asyncio.get_running_loop()
        for child in children:
            try:
                await loop.run_in_executor(None, child.process.wait, STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("serving process %d did not stop; killing it", child.index)
            self._kill(child)
