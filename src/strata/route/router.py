"""`Router`: send Open Inference Protocol requests to the first tier that can answer: local, parent, cloud.

Each target (a node's agent, its parent near-edge node, a cloud endpoint: any OIP server, strata or Triton or
KServe) has a circuit breaker and a health view (`/v2/health/ready`, and `/v2/models/{m}/ready` for the models
asked for lately, probed every `health_interval_s`). A request goes where `strata.route.policy.next_attempt`
says, waits there as long as it says, and moves on when the target refuses (429/503), lacks the model (404),
fails (5xx) or does not answer in time. Every answer says which tier served it.

The router does I/O only through one `httpx.AsyncClient` (pass `transport=` to replace it); its decisions are
the pure functions of `strata.route.breaker` and `strata.route.policy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt

from strata.core.errors import BadRequest, ConfigError, NotFound, StrataError, TransportError, Unavailable
from strata.core.oip import HEADER_LENGTH, decode_response, encode_request
from strata.route.breaker import Breaker, BreakerConfig
from strata.route.peer import find_peer_identity_error
from strata.route.policy import TIERS, TargetView, Verdict, classify, counts_against, next_attempt

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
SERVED_BY: Final = "strata-served-by"  # response header: the tier that answered (local, parent, cloud)
ROUTE: Final = "strata-route"  # response header: each attempt, in order (tier:status)
BUDGET: Final = "strata-budget-ms"  # request header: the caller's latency budget for this request
# the only request headers sent on to a target: never the caller's credentials (authorization, cookie), its
# addresses (forwarded, x-forwarded-*) or hop-by-hop headers; a target's own token is added per target
_FORWARDED_REQUEST_HEADERS: Final = ("content-type", "content-encoding", HEADER_LENGTH, "accept")
_FORWARDED_RESPONSE_HEADERS: Final = ("content-type", HEADER_LENGTH, "retry-after")
_LATENCY_WEIGHT: Final = 0.2
_MODELS_REMEMBERED_S: Final = 300.0  # a model asked for within this long has its readiness probed


class NoTierAnswered(Unavailable):
    """Every tier was tried (or the budget ran out) and none answered; `attempts` says what each did."""

    code = "no_tier_answered"

    def __init__(self, message: str, attempts: tuple[AttemptRecord, ...]) -> None:
        super().__init__(message)
        self.attempts = attempts


@dataclass(frozen=True)
class Target:
    """One place a request can go: its tier (local, parent or cloud), base URL, optional bearer token, the TLS
    context its https connections use (a node's fleet context for other nodes; None: the system's CAs), and the
    fleet node it must be (`node_id`, which that context checks; None: not a fleet node, or one given by hand)."""

    tier: str
    url: str
    name: str = ""
    token: str | None = None
    tls: ssl.SSLContext | None = None
    node_id: str | None = None

    def __post_init__(self) -> None:
        """Raises:
        ConfigError: unknown tier, or a URL that is not http(s).
        """
        if self.tier not in TIERS:
            raise ConfigError(f"target tier must be one of {', '.join(TIERS)}, got {self.tier!r}")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"target URL must be http:// or https://, got {self.url!r}")

    @property
    def label(self) -> str:
        return self.name or self.url


@dataclass(frozen=True)
class RouterConfig:
    """Every routing setting in one place (seconds).

    Attributes:
        timeout_s: the longest one attempt waits when no budget says less.
        connect_timeout_s: the longest a connection to a target may take to open.
        budget_s: the latency budget of a request that states none (None: no budget, only `timeout_s`).
        breaker: when a target's breaker opens and for how long.
        health_interval_s, health_timeout_s: how often targets are probed, and how long a probe waits.
        max_connections: open connections per target (each target has its own pool).
    """

    timeout_s: float = 10.0
    connect_timeout_s: float = 2.0
    budget_s: float | None = None
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    max_connections: int = 32

    def __post_init__(self) -> None:
        """Raises:
        ConfigError: a setting is out of range.
        """
        for name in ("timeout_s", "connect_timeout_s", "health_interval_s", "health_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"router setting {name} must be positive")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ConfigError("the default latency budget must be positive")


@dataclass(frozen=True)
class AttemptRecord:
    """One try of one target: its HTTP status (None when it gave none) or the transport error, and how long."""

    tier: str
    target: str
    status: int | None
    seconds: float
    error: str | None = None

    def __str__(self) -> str:
        return f"{self.tier}:{self.status if self.status is not None else 'error'}"


@dataclass(frozen=True)
class RoutedResponse:
    """A target's answer as the router hands it on, or the router's own when no tier answered."""

    status: int
    headers: dict[str, str]
    body: bytes
    served_by: str | None
    attempts: tuple[AttemptRecord, ...]


@dataclass(frozen=True)
class InferAnswer:
    """A decoded inference answer and the tier that gave it."""

    outputs: dict[str, Array]
    served_by: str
    model_name: str
    model_version: str
    attempts: tuple[AttemptRecord, ...]


@dataclass
class _TargetState:
    target: Target
    client: httpx.AsyncClient
    slots: asyncio.Semaphore  # requests in flight to this target, at most its pool's connections
    probes: httpx.AsyncClient  # health probes have their own connections: a busy pool must not fail them
    breaker: Breaker = field(default_factory=Breaker)
    ready: bool | None = None
    models_ready: dict[str, bool] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)

    def view(self, model: str | None) -> TargetView:
        ready = self.models_ready.get(model) if model is not None else None
        if ready is None:
            ready = self.ready
        return TargetView(self.breaker, ready, self.latency_s.get(model or ""))


class Router:
    """Routes requests over `targets` in order; use as an async context manager (starts health probes).

    Args:
        targets: where requests may go, tried in the order given (local, then parents, then cloud).
        config: timeouts, budget, breaker and probe settings.
        transport: replaces httpx's network transport (tests, or a custom TLS setup).
        clock: monotonic seconds; every decision takes its `now` from it.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        config: RouterConfig | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or RouterConfig()
        self._clock = clock
        self._transport = transport
        self._states = [self._new_state(target) for target in targets]
        self._retired: list[httpx.AsyncClient] = []
        self._models_seen: dict[str, float] = {}
        self._probe_task: asyncio.Task[None] | None = None
        self.on_attempt: Callable[[AttemptRecord, Verdict], None] | None = None

    async def __aenter__(self) -> Router:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Start probing the targets' health in the background (inside a running event loop)."""
        if self._probe_task is None:
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_forever())

    async def close(self) -> None:
        """Stop probing and close every connection."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        for client in [*(c for state in self._states for c in (state.client, state.probes)), *self._retired]:
            await client.aclose()
        self._retired = []

    def _new_state(self, target: Target) -> _TargetState:
        # One connection pool per target (a bulkhead): requests waiting on a slow cloud never hold the
        # connections that requests to the local node need.
        limits = httpx.Limits(
            max_connections=self.config.max_connections, max_keepalive_connections=self.config.max_connections
        )
        verify: ssl.SSLContext | bool = target.tls if target.tls is not None else True
        client = httpx.AsyncClient(transport=self._transport, limits=limits, trust_env=False, verify=verify)
        # Requests wait for a slot here rather than in httpcore's pool, whose hand-over costs grow with the
        # number of waiting requests times connections (seconds of CPU under a burst of a thousand).
        probes = httpx.AsyncClient(
            transport=self._transport, limits=httpx.Limits(max_connections=2), trust_env=False, verify=verify
        )
        return _TargetState(target, client, asyncio.Semaphore(self.config.max_connections), probes)

    @property
    def targets(self) -> list[Target]:
        return [state.target for state in self._states]

    def set_targets(self, targets: Sequence[Target]) -> None:
        """Route over new targets (a topology change); a target already known keeps its breaker and health,
        unless its TLS context changed (a renewed certificate), which needs new connections."""
        known = {(state.target.tier, state.target.url): state for state in self._states}
        replaced: list[_TargetState] = []
        states = []
        for target in targets:
            state = known.pop((target.tier, target.url), None)
            if state is not None and state.target.tls is not target.tls:
                replaced.append(state)
                state = None
            if state is None:
                state = self._new_state(target)
            else:
                state.target = target
            states.append(state)
        self._states = states
        # requests in flight may still use a dropped target's pool: it is closed with the router
        self._retired.extend(c for state in [*known.values(), *replaced] for c in (state.client, state.probes))

    def status(self) -> list[dict[str, Any]]:
        """Each target's breaker and health, for metrics and logs."""
        return [
            {
                "tier": s.target.tier,
                "target": s.target.label,
                "breaker": s.breaker.state.value,
                "ready": s.ready,
                "models_ready": dict(s.models_ready),
            }
            for s in self._states
        ]

    @property
    def any_ready(self) -> bool:
        """Whether some target was ready at its last probe (or not probed yet)."""
        return any(state.ready is not False for state in self._states)

    # --- sending -------------------------------------------------------------------------------------------

    async def send(
        self,
        method: str,
        path: str,
        *,
        model: str | None = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        budget_s: float | None = None,
    ) -> RoutedResponse:
        """Send one request down the tiers; the first answer that is not a refusal or a failure is returned.

        When no tier answers: a 404 if every tier that answered lacks the model, else 503 (with the shortest
        Retry-After a tier gave), or 504 when the budget ran out; the body says what each attempt did.
        """
        if model is not None:
            self._models_seen[model] = self._clock()
        budget = budget_s if budget_s is not None else self.config.budget_s
        deadline = self._clock() + budget if budget is not None else None
        forwarded = {k: v for k, v in (headers or {}).items() if k.lower() in _FORWARDED_REQUEST_HEADERS}
        tried: set[int] = set()
        attempts: list[AttemptRecord] = []
        refusals: list[httpx.Response] = []
        states = self._states
        while True:
            now = self._clock()
            views = [state.view(model) for state in states]
            attempt = next_attempt(views, frozenset(tried), now, deadline, self.config.timeout_s, self.config.breaker)
            if attempt is None:
                break
            tried.add(attempt.index)
            state = states[attempt.index]
            response, record = await self._try(state, method, path, body, forwarded, attempt.timeout_s, model)
            attempts.append(record)
            verdict = classify(record.status)
            if self.on_attempt is not None:
                self.on_attempt(record, verdict)
            if verdict in (Verdict.ANSWERED, Verdict.CALLER_ERROR) and response is not None:
                return RoutedResponse(
                    response.status_code, _response_headers(response), response.content, state.target.tier,
                    tuple(attempts),
                )  # fmt: skip
            if response is not None:
                refusals.append(response)
        return self._no_answer(tuple(attempts), refusals, deadline, budget)

    async def _try(
        self,
        state: _TargetState,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        timeout_s: float,
        model: str | None,
    ) -> tuple[httpx.Response | None, AttemptRecord]:
        config = self.config
        target = state.target
        if target.token:
            headers = {**headers, "authorization": f"Bearer {target.token}"}
        timeout = httpx.Timeout(timeout_s, connect=min(config.connect_timeout_s, timeout_s))
        state.breaker = state.breaker.attempt(self._clock(), config.breaker)
        started = self._clock()
        response: httpx.Response | None = None
        error = None
        try:
            # the whole attempt (a slot, the connection, every read of the answer) ends within its time
            async with asyncio.timeout(timeout_s), state.slots:
                response = await state.client.request(
                    method, target.url.rstrip("/") + path, content=body, headers=headers, timeout=timeout
                )
        except (httpx.TimeoutException, TimeoutError):
            error = f"no answer within {timeout_s:.3f} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            mismatch = find_peer_identity_error(exc)
            if mismatch is not None:
                error = f"not the node named: {mismatch}"
                log.warning("not sending to %s %s at %s: %s", target.tier, target.label, target.url, mismatch)
        except BaseException:
            state.breaker = state.breaker.released()
            raise
        elapsed = self._clock() - started
        status = response.status_code if response is not None else None
        verdict = classify(status)
        now = self._clock()
        state.breaker = (
            state.breaker.failed(now, config.breaker) if counts_against(verdict) else state.breaker.succeeded()
        )
        if verdict is Verdict.ANSWERED and model is not None:
            previous = state.latency_s.get(model)
            state.latency_s[model] = elapsed if previous is None else previous + _LATENCY_WEIGHT * (elapsed - previous)
            state.models_ready[model] = True
        elif verdict is Verdict.MISSING and model is not None:
            state.models_ready[model] = False  # until a probe says otherwise: the next request skips it
        return response, AttemptRecord(target.tier, target.label, status, round(elapsed, 6), error)

    def _no_answer(
        self,
        attempts: tuple[AttemptRecord, ...],
        refusals: list[httpx.Response],
        deadline: float | None,
        budget: float | None,
    ) -> RoutedResponse:
        route = ", ".join(str(a) for a in attempts) or "no target was tried"
        if refusals and all(r.status_code == 404 for r in refusals):
            last = refusals[-1]
            return RoutedResponse(404, _response_headers(last), last.content, None, attempts)
        if deadline is not None and budget is not None and self._clock() >= deadline:
            status, message = 504, f"no tier answered within the latency budget of {budget * 1000:.0f} ms ({route})"
        else:
            status, message = 503, f"no tier could answer ({route})"
        headers = {"content-type": "application/json"}
        retry = [int(r.headers["retry-after"]) for r in refusals if r.headers.get("retry-after", "").isdigit()]
        if status == 503:
            headers["retry-after"] = str(min(retry) if retry else 1)
        details = [
            {"tier": a.tier, "target": a.target, "status": a.status, "error": a.error, "seconds": a.seconds}
            for a in attempts
        ]
        body = _json({"error": message, "attempts": details})
        return RoutedResponse(status, headers, body, None, attempts)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Array],
        *,
        budget_ms: float | None = None,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> InferAnswer:
        """Run `model` on `inputs` (arrays by input name) on the first tier that can; binary tensors both ways.

        Raises:
            BadRequest: the request does not fit the model (a tier said 4xx).
            NotFound: no tier serves the model.
            NoTierAnswered: every tier refused or failed, or the budget ran out.
            TransportError: a tier answered 2xx with a body that is not an inference response.
        """
        body, header_length = encode_request(inputs, outputs=outputs)
        headers = {"content-type": "application/octet-stream"}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        path = f"/v2/models/{quote(model, safe='')}"
        if version is not None:
            path += f"/versions/{quote(version, safe='')}"
        routed = await self.send(
            "POST", path + "/infer", model=model, body=body, headers=headers,
            budget_s=budget_ms / 1000 if budget_ms is not None else None,
        )  # fmt: skip
        if routed.status == 404:
            raise NotFound(f"no tier serves model {model!r}: {_error_text(routed.body)}")
        if 400 <= routed.status < 500:
            raise BadRequest(f"{routed.served_by} refused the request ({routed.status}): {_error_text(routed.body)}")
        if routed.served_by is None or not 200 <= routed.status < 300:
            raise NoTierAnswered(_error_text(routed.body), routed.attempts)
        length = routed.headers.get(HEADER_LENGTH)
        try:
            header, arrays = decode_response(routed.body, int(length) if length is not None else None)
        except (BadRequest, ValueError) as exc:
            raise TransportError(f"{routed.served_by} sent a malformed inference response: {exc}") from exc
        return InferAnswer(
            outputs={name: np.asarray(array) for name, array in arrays.items()},
            served_by=routed.served_by,
            model_name=str(header.get("model_name", model)),
            model_version=str(header.get("model_version", "")),
            attempts=routed.attempts,
        )

    # --- health ----------------------------------------------------------------------------------------

    async def _probe_forever(self) -> None:
        while True:
            try:
                await self.probe()
            except StrataError as exc:  # pragma: no cover - probe() maps its own errors
                log.warning("health probe failed: %s", exc)
            await asyncio.sleep(self.config.health_interval_s)

    async def probe(self) -> None:
        """Probe every target's readiness, and its readiness for each model asked for lately."""
        now = self._clock()
        # forget models not asked for lately (a client may ask for any name: this must not grow for ever)
        self._models_seen = {m: seen for m, seen in self._models_seen.items() if now - seen <= _MODELS_REMEMBERED_S}
        models = list(self._models_seen)
        await asyncio.gather(*(self._probe_one(state, models) for state in list(self._states)))

    async def _probe_one(self, state: _TargetState, models: list[str]) -> None:
        target = state.target
        headers = {"authorization": f"Bearer {target.token}"} if target.token else {}
        timeout = httpx.Timeout(self.config.health_timeout_s)
        base = target.url.rstrip("/")
        try:
            server = await state.probes.get(f"{base}/v2/health/ready", headers=headers, timeout=timeout)
            answers = await asyncio.gather(
                *(
                    state.probes.get(f"{base}/v2/models/{quote(m, safe='')}/ready", headers=headers, timeout=timeout)
                    for m in models
                )
            )
        except httpx.HTTPError as exc:
            mismatch = find_peer_identity_error(exc)
            if mismatch is not None and state.ready is not False:
                log.warning("%s %s at %s is not the node named: %s", target.tier, target.label, target.url, mismatch)
            state.ready = False
            state.models_ready = dict.fromkeys(models, False)
            return
        state.ready = server.status_code == 200
        state.models_ready = {model: answer.status_code == 200 for model, answer in zip(models, answers, strict=True)}


def _response_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower() in _FORWARDED_RESPONSE_HEADERS}


def _json(payload: Any) -> bytes:
    import json

    return json.dumps(payload, separators=(",", ":")).encode()


def _error_text(body: bytes) -> str:
    import json

    try:
        parsed = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return str(parsed["error"])
    return body[:200].decode(errors="replace")
