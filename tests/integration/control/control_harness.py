"""The in-process control plane that the API tests drive, and helpers to watch what it does to its database."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from strata.control.plane import ControlPlane
from strata.control.settings import ServerSettings

T0 = 1_700_000_000.0


@dataclass
class ManualClock:
    """The server's clock in tests: it moves only when told."""

    now: float = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class NodeCredentials:
    node_id: str
    headers: dict[str, str]


@dataclass
class Harness:
    """One running control plane and the calls most tests make against it."""

    client: TestClient
    plane: ControlPlane
    clock: ManualClock
    admin: dict[str, str] = field(default_factory=dict)

    def enroll(self, name: str, labels: dict[str, str] | None = None, **fields: Any) -> NodeCredentials:
        token = self.client.post("/v1/enrollment-tokens", json={}, headers=self.admin).json()["token"]
        body = {"token": token, "name": name, "tier": "device", "labels": labels or {}, "profile": "cpu-generic"}
        response = self.client.post("/v1/enroll", json={**body, **fields})
        assert response.status_code == 201, response.text
        answer = response.json()
        return NodeCredentials(answer["node_id"], {"Authorization": f"Bearer {answer['credential']}"})

    def upload(self, tar: bytes) -> httpx.Response:
        return self.client.post(
            "/v1/packages", content=tar, headers={**self.admin, "Content-Type": "application/x-tar"}
        )

    def deploy(self, model: str, version: str, selector: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"model": model, "version": version, "selector": selector or {}}
        response = self.client.post("/v1/deployments", json=body, headers=self.admin)
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    def desired(self, node: NodeCredentials, etag: str | None = None, wait: float = 0) -> httpx.Response:
        headers = dict(node.headers)
        if etag is not None:
            headers["If-None-Match"] = etag
        return self.client.get(f"/v1/nodes/{node.node_id}/desired", params={"wait": wait}, headers=headers)


@contextlib.contextmanager
def recorded_statements(engine: Engine) -> Iterator[list[str]]:
    """Every SQL statement `engine` executes inside the block, in order."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def writes(statements: list[str]) -> list[str]:
    """The statements that change data."""
    return [s for s in statements if s.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE")]


# `start_server(settings)`: a control plane over `settings` for the length of a `with` block.
StartServer = Callable[[ServerSettings], contextlib.AbstractContextManager[Harness]]
