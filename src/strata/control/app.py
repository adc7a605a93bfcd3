"""`create_app(settings)`: the FastAPI application of the control plane, with its lifespan.

Starting migrates the database, writes the admin token if there is none, and starts the presence flusher (this
process's own memory: every replica runs one), the keeper of the rollout lease, the rollout driver (which
steps only while this replica holds the lease) and the retention sweep of telemetry and events (on the same
replica); stopping ends long polls, gives the lease up, flushes presence and closes the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator

import anyio.to_thread
from fastapi import FastAPI

from strata import __version__
from strata.control.api import install
from strata.control.errors import StoreError
from strata.control.metrics import metrics_registry
from strata.control.plane import ControlPlane
from strata.control.settings import ServerSettings
from strata.control.telemetry import EXPIRED_NOUNS
from strata.control.ui import install_console
from strata.core.errors import StrataError
from strata.core.words import duration, plural

log = logging.getLogger(__name__)


async def _flush_presence_forever(plane: ControlPlane) -> None:
    while True:
        await asyncio.sleep(plane.settings.presence_flush_s)
        try:
            await anyio.to_thread.run_sync(plane.flush_presence)
        except StoreError as exc:
            log.warning("presence flush failed, will retry: %s", exc)


async def _keep_rollout_lease_forever(plane: ControlPlane) -> None:
    """Take the rollout driver's lease when free, renew it while held (`strata.control.lease`)."""
    lease = plane.rollout_lease
    while True:
        await anyio.to_thread.run_sync(lease.keep)
        await asyncio.sleep(min(1.0, lease.timer.renew_s / 3))


async def _drive_rollouts_forever(plane: ControlPlane) -> None:
    """Step every active rollout on a timer, and soon after status reports (which nudge), while this replica holds
    the rollout lease."""
    settings = plane.settings
    while True:
        if await plane.nudge.wait(settings.rollout_interval_s):
            await asyncio.sleep(settings.rollout_debounce_s)  # let a burst of reports land first
        if not plane.rollout_lease.held():
            continue
        try:
            await anyio.to_thread.run_sync(plane.rollouts.tick)
        except StoreError as exc:
            log.warning("rollout step failed, will retry: %s", exc)
        except StrataError as exc:
            log.error("rollout step failed: %s", exc)
        except Exception:  # a bug: logged with its traceback; ending this task would stop every rollout for good
            log.exception("rollout step failed, will retry")


async def _sweep_forever(plane: ControlPlane, stop: threading.Event) -> None:
    """Delete telemetry and fleet events older than their retentions, soon after start and then every
    `telemetry_sweep_s`, while this replica holds the rollout lease (one replica sweeps at a time; a sweep is
    idempotent besides). `stop` ends a sweep under way after its current chunk (a worker thread is not cancelled:
    shutdown would wait for it)."""
    settings = plane.settings

    def telemetry() -> str:  # what it deleted, "" for nothing
        deleted = plane.telemetry.sweep(settings.telemetry_retention_s, stop=stop)
        return ", ".join(plural(deleted[k], noun) for k, noun in EXPIRED_NOUNS.items()) if any(deleted.values()) else ""

    def events() -> str:
        deleted = plane.events.sweep(settings.event_retention_s, stop=stop)
        return plural(deleted, "event") if deleted else ""

    sweeps = (
        ("telemetry retention", settings.telemetry_retention_s, telemetry),
        ("event retention", settings.event_retention_s, events),
    )
    await asyncio.sleep(min(60.0, settings.telemetry_sweep_s))  # the lease is taken by then
    while True:
        if plane.rollout_lease.held():
            for name, retention, sweep in sweeps:  # each on its own: one failing does not stop the other
                try:
                    deleted = await anyio.to_thread.run_sync(sweep)
                except StoreError as exc:
                    log.warning("%s sweep failed, will retry: %s", name, exc)
                except Exception:  # a Conflict with an ingest, or a bug: logged, and the sweeps go on
                    log.exception("%s sweep failed, will retry", name)
                else:
                    if deleted:
                        log.info("%s %s: deleted %s", name, duration(retention), deleted)
        await asyncio.sleep(settings.telemetry_sweep_s)


def create_app(settings: ServerSettings) -> FastAPI:
    """The control plane API over `settings`; serve it with any ASGI server (lifespan events required).

    Raises:
        ConfigError: the database URL cannot be used.
    """
    plane = ControlPlane.build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(plane.start)
        plane.nudge.attach(asyncio.get_running_loop())
        exporter = plane.start_exporters()
        stop_sweep = threading.Event()
        tasks = [
            asyncio.create_task(_flush_presence_forever(plane)),
            asyncio.create_task(_keep_rollout_lease_forever(plane)),
            asyncio.create_task(_drive_rollouts_forever(plane)),
            asyncio.create_task(_sweep_forever(plane, stop_sweep)),
        ]
        try:
            yield
        finally:
            stop_sweep.set()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if exporter is not None:
                await anyio.to_thread.run_sync(exporter.close)
            await anyio.to_thread.run_sync(plane.stop)

    app = FastAPI(
        title="strata control plane",
        version=__version__,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.plane = plane
    app.state.waiting_polls = {}  # node id -> its long polls waiting now (`api.nodes.get_desired`)
    app.state.telemetry_uploads = {}  # node id -> its telemetry uploads under way (`api.telemetry`)
    app.state.metrics_registry = metrics_registry(plane)
    install(app)
    install_console(app)
    return app
