"""The router's driver over httpx's MockTransport: failover order, breakers, health, answers and errors.

Each target is a small function of the request (an Open Inference Protocol server's answers, or a transport
error); the clock is the test's, so breaker cool-downs pass without sleeping. Real processes and real timeouts
are in tests/e2e/test_tiered_serving.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from strata.core.errors import BadRequest, NotFound
from strata.core.oip import encode_response
from strata.route import BreakerConfig, NoTierAnswered, Router, RouterConfig, Target
from strata.route.breaker import BreakerState

Behaviour = Callable[[httpx.Request], httpx.Response]


def answer(request: httpx.Request) -> httpx.Response:
    label = np.array([7], dtype=np.int64)
    body, length = encode_response("digits", "1", None, [("label", label, True)])
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(length)}
    return httpx.Response(200, headers=headers, content=body)


def status(code: int, **headers: str) -> Behaviour:
    return lambda request: httpx.Response(code, headers=headers, json={"error": f"said {code}"})


def unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


class Tiers:
    """Three targets whose behaviour the test sets, with a log of what each was sent, and a clock."""

    def __init__(self, **behaviours: Behaviour) -> None:
        self.behaviours: dict[str, Behaviour] = {"local": answer, "parent": answer, "cloud": answer, **behaviours}
        self.sent: list[tuple[str, str]] = []
        self.now = 1000.0

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.url.host, request.url.path))
        return self.behaviours[request.url.host](request)

    def router(self, **config: Any) -> Router:
        targets = [Target(tier, f"http://{tier}") for tier in ("local", "parent", "cloud")]
        settings = RouterConfig(breaker=BreakerConfig(failure_threshold=2, cooldown_s=5.0), **config)
        return Router(targets, settings, transport=httpx.MockTransport(self.handle), clock=lambda: self.now)

    def infer_paths(self) -> list[str]:
        return [host for host, path in self.sent if path.endswith("/infer")]


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


X = {"X": np.zeros((1, 64), dtype=np.float32)}


def test_a_refusal_goes_on_to_the_next_tier_and_the_answer_says_who_served() -> None:
    tiers = Tiers(local=status(503, **{"retry-after": "2"}))

    async def go() -> Any:
        async with tiers.router() as router:
            return await router.infer("digits", X)

    result = run(go())
    assert result.served_by == "parent"
    assert [str(a) for a in result.attempts] == ["local:503", "parent:200"]
    assert result.outputs["label"].tolist() == [7]
    assert (result.model_name, result.model_version) == ("digits", "1")


def test_failures_open_a_breaker_and_after_the_cool_down_one_probe_closes_it() -> None:
    tiers = Tiers(local=unreachable)

    async def go() -> None:
        router = tiers.router()
        try:
            for _ in range(2):
                assert (await router.infer("digits", X)).served_by == "parent"
            assert router.status()[0]["breaker"] == "open"
            tiers.sent.clear()
            assert (await router.infer("digits", X)).served_by == "parent"
            assert tiers.infer_paths() == ["parent"]  # local is not even tried while open

            tiers.behaviours["local"] = answer  # local is back
            tiers.now += 5.0
            result = await router.infer("digits", X)
            assert result.served_by == "local"  # the half-open probe succeeded
            assert router.status()[0]["breaker"] == BreakerState.CLOSED.value
        finally:
            await router.close()

    run(go())


def test_a_model_missing_at_a_tier_is_skipped_there_for_later_requests() -> None:
    tiers = Tiers(local=lambda r: status(404)(r) if "digits" in r.url.path else answer(r))

    async def go() -> None:
        router = tiers.router()
        try:
            assert (await router.infer("digits", X)).served_by == "parent"
            tiers.sent.clear()
            assert (await router.infer("digits", X)).served_by == "parent"
            assert tiers.infer_paths() == ["parent"]
            assert (await router.infer("other", X)).served_by == "local"  # only that model is missing there
        finally:
            await router.close()

    run(go())


def test_a_mistake_of_the_caller_comes_back_at_once() -> None:
    tiers = Tiers(local=status(400))

    async def go() -> None:
        async with tiers.router() as router:
            with pytest.raises(BadRequest, match="said 400"):
                await router.infer("digits", X)

    run(go())
    assert tiers.infer_paths() == ["local"]


def test_a_model_no_tier_serves_is_not_found() -> None:
    tiers = Tiers(local=status(404), parent=status(404), cloud=status(404))

    async def go() -> None:
        async with tiers.router() as router:
            with pytest.raises(NotFound):
                await router.infer("digits", X)

    run(go())


def test_when_every_tier_refuses_or_fails_the_answer_is_503_with_the_shortest_retry_after() -> None:
    tiers = Tiers(
        local=status(503, **{"retry-after": "3"}), parent=unreachable, cloud=status(429, **{"retry-after": "2"})
    )

    async def go() -> None:
        router = tiers.router()  # no health probes: each tier is tried in order, the unreachable one too
        try:
            routed = await router.send("POST", "/v2/models/digits/infer", model="digits", body=b"{}")
            assert (routed.status, routed.served_by, routed.headers["retry-after"]) == (503, None, "2")
            body = json.loads(routed.body)
            assert [a["status"] for a in body["attempts"]] == [503, None, 429]
            assert "ConnectError" in body["attempts"][1]["error"]
            with pytest.raises(NoTierAnswered) as raised:
                await router.infer("digits", X)
            assert [a.tier for a in raised.value.attempts] == ["local", "parent", "cloud"]
        finally:
            await router.close()

    run(go())


def test_health_probes_take_an_unready_target_out_and_bring_it_back() -> None:
    tiers = Tiers(local=lambda r: status(503)(r) if r.url.path.endswith("ready") else answer(r))

    async def go() -> None:
        router = tiers.router()
        try:
            await router.probe()
            assert router.status()[0]["ready"] is False
            assert (await router.infer("digits", X)).served_by == "parent"
            tiers.behaviours["local"] = answer
            await router.probe()  # probes the server and, now that it was asked for, the model
            assert router.status()[0]["models_ready"] == {"digits": True}
            assert (await router.infer("digits", X)).served_by == "local"
        finally:
            await router.close()

    run(go())


def test_new_targets_keep_the_state_of_those_already_known() -> None:
    tiers = Tiers(local=unreachable)

    async def go() -> None:
        router = tiers.router()
        try:
            for _ in range(2):
                await router.infer("digits", X)
            router.set_targets([Target("local", "http://local"), Target("cloud", "http://cloud")])
            assert [s["breaker"] for s in router.status()] == ["open", "closed"]
            assert (await router.infer("digits", X)).served_by == "cloud"
        finally:
            await router.close()

    run(go())
