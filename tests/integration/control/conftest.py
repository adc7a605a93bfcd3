"""Fixtures for the control plane API: a real app driven in-process by TestClient, over a real database: every
test runs twice, on an SQLite file and on PostgreSQL (a throwaway cluster per test worker; each test gets its own
database, cloned from a migrated template). Where PostgreSQL cannot start, its tests fail with the reason."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from control_harness import Harness, ManualClock, StartServer, TlsTestShim
from fastapi.testclient import TestClient

from strata.control import migrations
from strata.control.app import create_app
from strata.control.db import make_engine
from strata.control.settings import ServerSettings
from strata.core.package import tar_bytes
from strata.package_build import build_package
from strata.testing.postgres import PostgresCluster


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


TEMPLATE = "strata_template"
_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for this test process (each xdist worker has its own), with a template database
    already migrated to the newest schema; it is stopped and deleted when the session ends."""
    with PostgresCluster.start() as cluster:
        cluster.create_database(TEMPLATE)
        engine = make_engine(cluster.url(TEMPLATE))
        try:
            migrations.upgrade(engine)
        finally:
            engine.dispose()  # a template must have no connections when it is cloned
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The database of one test: None (the SQLite file in the data folder) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = f"test_{os.getpid()}_{next(_databases)}"
    url = cluster.create_database(name, template=TEMPLATE)
    yield url
    cluster.drop_database(name)


@pytest.fixture
def settings(tmp_path: Path, clock: ManualClock, db_url: str | None) -> ServerSettings:
    # Presence is flushed by hand in tests unless a test asks for the background flusher.
    return ServerSettings(data_dir=tmp_path / "data", db_url=db_url, clock=clock, presence_flush_s=3600)


@pytest.fixture
def start_server(clock: ManualClock) -> StartServer:
    """Start a control plane over `settings` for the length of a `with` block (lifespan included)."""

    @contextlib.contextmanager
    def start(settings: ServerSettings) -> Iterator[Harness]:
        app = create_app(replace(settings, clock=clock))
        with TestClient(TlsTestShim(app)) as client:
            harness = Harness(client=client, plane=app.state.plane, clock=clock)
            token = settings.admin_token_path.read_text().strip()
            harness.admin = {"Authorization": f"Bearer {token}"}
            yield harness

    return start


@pytest.fixture
def server(settings: ServerSettings, start_server: StartServer) -> Iterator[Harness]:
    with start_server(settings) as harness:
        yield harness


@pytest.fixture(scope="session")
def make_package(digits_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., bytes]:
    """Package tars of the real digits model, built once per distinct set of arguments."""
    built: dict[tuple[Any, ...], bytes] = {}

    def make(
        name: str = "digits",
        version: str = "1",
        profile: str = "cpu-generic",
        metrics: dict[str, Any] | None = None,
        policy: dict[str, Any] | None = None,
    ) -> bytes:
        key = (name, version, profile, repr(sorted((metrics or {}).items())), repr(sorted((policy or {}).items())))
        if key not in built:
            out = tmp_path_factory.mktemp("package") / "pkg"
            package = build_package(
                digits_onnx, out, name=name, version=version, profile=profile, metrics=metrics, policy=policy
            )
            built[key] = tar_bytes(package)
        return built[key]

    return make
