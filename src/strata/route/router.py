"""`Router`: send Open Inference Protocol requests to the first tier that can answer: local, parent, cloud.

Each target (a node's agent, its parent near-edge node, a cloud endpoint: any OIP server, strata or Triton or
KServe) has a circuit breaker and a health view (`/v2/health/ready`, and `/v2/models/{m}/ready` for the models
asked for lately, probed every `health_interval_s`). A request goes where `strata.route.route_plan.next_attempt`
says, waits there as long as it says, and moves on when the target refuses (429/503), lacks the model (404),
fails (5xx) or does not answer in time. Every answer says which tier served it.

A target's answer is read within bounds before anything of it is handed on: the router asks for it
uncompressed (`Accept-Encoding: identity`), refuses one that comes encoded anyway (it would be inflated by
nobody, or forwarded without its encoding), and reads at most `max_response_bytes` of it, within the attempt's
time; past that the attempt failed (the next tier is tried; 502 when none answers). httpcore bounds a response's
head (100 KiB). A health probe reads at most 64 KiB of an answer, and the whole probe ends within its timeout.

The router does I/O only through one `httpx.AsyncClient` (pass `transport=` to replace it); its decisions are
the pure functions of `strata.route.breaker` and `strata.route.route_plan`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt

from strata.core.errors import BadRequest, ConfigError, NotFound, TransportError, Unavailable
from strata.core.oip import HEADER_LENGTH, decode_response, encode_request
from strata.core.wire import error_text
from strata.route.breaker import Breaker, BreakerConfig
from strata.route.peer import find_peer_identity_error
from strata.route.route_plan import TIERS, TargetView, Verdict, classify, counts_against, next_attempt

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
SERVED_BY: Final = "strata-served-by"  # response header: the tier that answered (local, parent, cloud)
ROUTE: Final = "strata-route"  # response header: each attempt, in order (tier:status)
BUDGET: Final = "strata-budget-ms"  # request header: the caller's latency budget for this request
# the only request headers sent on to a target: never the caller's credentials (authorization, cookie), its
# addresses (forwarded, x-forwarded-*) or hop-by-hop headers; a target's own token is added per target
_FORWARDED_REQUEST_HEADERS: Final = ("content-type", "content-encoding", HEADER_LENGTH, "accept")
_FORWARDED_RESPONSE_HEADERS: Final = ("content-type", HEADER_LENGTH, "retry-after")
# every request to a target asks for its answer unencoded: an encoded one is refused, never inflated
_REQUEST_DEFAULTS: Final = {"accept-encoding": "identity"}
MAX_BUDGET_MS: Final = 600_000.0  # the longest latency budget a request may state (10 minutes)
_LATENCY_WEIGHT: Final = 0.2
_MODELS_REMEMBERED_S: Final = 300.0  # a model answered within this long has its readiness probed...
_MODELS_REMEMBERED: Final = 64  # ...the most recently answered this many of them (any name may be asked for)
_MODELS_MARKED_MISSING: Final = 256  # names a target lacks, remembered until its next probe
_PROBES_AT_ONCE: Final = 2  # per target: the probe client's own connections, so no probe waits for one
_PROBE_BODY_BYTES: Final = 64 * 1024  # a probe reads this much of an answer at most (only its status counts)


class BadAnswer(TransportError):
    """A target's answer the router will not hand on: encoded, or larger than the router's limit."""


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The body of a streamed `response` as sent (never decoded), at most `limit` bytes; reads stop there.

    Raises:
        BadAnswer: the body is encoded (a Content-Encoding other than identity) or longer than `limit`.
        httpx.HTTPError: the connection failed while reading.
    """
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadAnswer(f"the answer is encoded ({encoding[:40]!r}) though asked for without encoding")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadAnswer(f"the answer is {int(declared)} bytes, over the limit of {limit}")
    if (
        response.is_stream_consumed
    ):  # read whole before it was handed over (an in-memory transport): nothing left to read
        if len(response.content) > limit:
            raise BadAnswer(f"the answer is over the limit of {limit} bytes")
        return response.content
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise BadAnswer(f"the answer is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
        max_response_bytes: the largest answer read from a target (larger: the attempt failed).
    """

    timeout_s: float = 10.0
    connect_timeout_s: float = 2.0
    budget_s: float | None = None
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    max_connections: int = 32
    max_response_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        """Raises:
        ConfigError: a setting is out of range.
        """
        for name in ("timeout_s", "connect_timeout_s", "health_interval_s", "health_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"router setting {name} must be positive")
        if self.budget_s is not None and not (0 < self.budget_s <= MAX_BUDGET_MS / 1000):
            raise ConfigError(f"the default latency budget must be from 0 to {MAX_BUDGET_MS:.0f} ms")
        if self.max_response_bytes <= 0:
            raise ConfigError("the largest answer read from a target must be positive")


@dataclass(frozen=True)
class AttemptRecord:
    """One try of one target: its HTTP status (None when it gave none) or the transport error, and how long."""

    tier: str
    target: str
    status: int | None
    seconds: float
    error: str | None = None
    bad_answer: bool = False  # the target answered, with something the router does not hand on

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


@dataclass(frozen=True)
class _Answer:
    """A target's answer, read whole within the router's limits."""

    status_code: int
    headers: httpx.Headers
    content: bytes


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
    probing: asyncio.Task[None] | None = None  # this target's probe round in progress
    probe_started: float = 0.0
    health_pending: bool = False  # the round's readiness probe has not answered yet

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
        self._models_seen: OrderedDict[str, float] = OrderedDict()  # least recently answered first
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
        rounds = [s.probing for s in self._states if s.probing is not None and not s.probing.done()]
        for task in rounds:
            task.cancel()
        await asyncio.gather(*rounds, return_exceptions=True)
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
        client = httpx.AsyncClient(
            transport=self._transport, limits=limits, trust_env=False, verify=verify, headers=_REQUEST_DEFAULTS
        )
        # Requests wait for a slot here rather than in httpcore's pool, whose hand-over costs grow with the
        # number of waiting requests times connections (seconds of CPU under a burst of a thousand).
        probes = httpx.AsyncClient(
            transport=self._transport,
            limits=httpx.Limits(max_connections=_PROBES_AT_ONCE),
            trust_env=False,
            verify=verify,
            headers=_REQUEST_DEFAULTS,
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
        budget = budget_s if budget_s is not None else self.config.budget_s
        deadline = self._clock() + budget if budget is not None else None
        forwarded = {k: v for k, v in (headers or {}).items() if k.lower() in _FORWARDED_REQUEST_HEADERS}
        tried: set[int] = set()
        attempts: list[AttemptRecord] = []
        refusals: list[_Answer] = []
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
    ) -> tuple[_Answer | None, AttemptRecord]:
        config = self.config
        target = state.target
        if target.token:
            headers = {**headers, "authorization": f"Bearer {target.token}"}
        timeout = httpx.Timeout(timeout_s, connect=min(config.connect_timeout_s, timeout_s))
        state.breaker = state.breaker.attempt(self._clock(), config.breaker)
        started = self._clock()
        response: _Answer | None = None
        error = None
        bad_answer = False
        request = state.client.build_request(
            method, target.url.rstrip("/") + path, content=body, headers=headers, timeout=timeout
        )
        try:
            # the whole attempt (a slot, the connection, every read of the answer) ends within its time
            async with asyncio.timeout(timeout_s), state.slots:
                streamed = await state.client.send(request, stream=True)
                try:
                    content = await read_bounded(streamed, config.max_response_bytes)
                finally:
                    await asyncio.shield(streamed.aclose())  # cancelled midway, the connection would be lost
                response = _Answer(streamed.status_code, streamed.headers, content)
        except (httpx.TimeoutException, TimeoutError):
            error = f"no answer within {timeout_s:.3f} s"
        except BadAnswer as exc:
            error, bad_answer = str(exc), True
            log.warning("refused the answer of %s %s at %s: %s", target.tier, target.label, target.url, exc)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            mismatch = find_peer_identity_error(exc)
            if mismatch is not None:
                error = f"peer refused: {mismatch}"
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
            self._remember(model)
        elif (
            verdict is Verdict.MISSING
            and model is not None
            and (model in state.models_ready or len(state.models_ready) < _MODELS_MARKED_MISSING)
        ):
            # until the next probe (which forgets it unless some target answers it): the next request skips it
            state.models_ready[model] = False
        return response, AttemptRecord(target.tier, target.label, status, round(elapsed, 6), error, bad_answer)

    def _remember(self, model: str) -> None:
        """Probe `model` from now on (a target answered it); forget the least recently answered past the limit."""
        self._models_seen[model] = self._clock()
        self._models_seen.move_to_end(model)
        while len(self._models_seen) > _MODELS_REMEMBERED:
            forgotten, _ = self._models_seen.popitem(last=False)
            for state in self._states:
                state.latency_s.pop(forgotten, None)
                state.models_ready.pop(forgotten, None)

    def _no_answer(
        self,
        attempts: tuple[AttemptRecord, ...],
        refusals: list[_Answer],
        deadline: float | None,
        budget: float | None,
    ) -> RoutedResponse:
        route = ", ".join(str(a) for a in attempts) or "no target was tried"
        if refusals and all(r.status_code == 404 for r in refusals):
            last = refusals[-1]
            return RoutedResponse(404, _response_headers(last), last.content, None, attempts)
        if deadline is not None and budget is not None and self._clock() >= deadline:
            status, message = 504, f"no tier answered within the latency budget of {budget * 1000:.0f} ms ({route})"
        elif any(a.bad_answer for a in attempts):
            status, message = 502, f"no tier sent an answer the gateway hands on ({route})"
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
            raise NotFound(f"no tier serves model {model!r}: {error_text(routed.body)}")
        if 400 <= routed.status < 500:
            raise BadRequest(f"{routed.served_by} refused the request ({routed.status}): {error_text(routed.body)}")
        if routed.served_by is None or not 200 <= routed.status < 300:
            raise NoTierAnswered(error_text(routed.body), routed.attempts)
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
        # Each target's probe round runs on its own: a target slow to answer its probes delays no other's, and
        # no probe is ever cancelled midway (httpx's own timeouts end it). A target that has not answered its
        # readiness probe within the probe timeout is unready until it does.
        while True:
            models = self._models_to_probe()
            now = self._clock()
            for state in list(self._states):
                if state.probing is not None and not state.probing.done():
                    if state.health_pending and now - state.probe_started > self.config.health_timeout_s:
                        state.ready = False
                    continue
                state.probe_started = now
                state.probing = asyncio.get_running_loop().create_task(self._probe_one(state, models))
            await asyncio.sleep(self.config.health_interval_s)

    def _models_to_probe(self) -> list[str]:
        now = self._clock()
        # forget models not answered lately (at most `_MODELS_REMEMBERED` are remembered at all)
        for model in [m for m, seen in self._models_seen.items() if now - seen > _MODELS_REMEMBERED_S]:
            del self._models_seen[model]
        return list(self._models_seen)

    async def probe(self) -> None:
        """Probe every target's readiness, and its readiness for each model answered lately; wait for all."""
        models = self._models_to_probe()
        await asyncio.gather(*(self._probe_one(state, models) for state in list(self._states)))

    async def _probe_status(self, state: _TargetState, path: str, until: float) -> int:
        """The status a target answers `GET path` with (reading at most 64 KiB of the answer, until `until`).

        Raises:
            httpx.HTTPError: no answer within the probe timeout (each step: a connection, the request, each read).
        """
        target = state.target
        headers = {"authorization": f"Bearer {target.token}"} if target.token else {}
        request = state.probes.build_request(
            "GET", target.url.rstrip("/") + path, headers=headers, timeout=httpx.Timeout(self.config.health_timeout_s)
        )
        response = await state.probes.send(request, stream=True)
        try:
            size = 0
            raw = response.aiter_raw() if not response.is_stream_consumed else _nothing()
            async for chunk in raw:  # read to the end (the connection is kept), if small and quick
                size += len(chunk)
                if size > _PROBE_BODY_BYTES or self._clock() > until:
                    break
        finally:
            await asyncio.shield(response.aclose())  # a connection half closed would be lost to the pool
        return response.status_code

    async def _probe_one(self, state: _TargetState, models: list[str]) -> None:
        target = state.target
        started = self._clock()
        state.health_pending = True
        try:
            server = await self._probe_status(state, "/v2/health/ready", started + self.config.health_timeout_s)
        except httpx.HTTPError as exc:
            state.health_pending = False
            mismatch = find_peer_identity_error(exc)
            if mismatch is not None and state.ready is not False:
                log.warning("%s %s at %s is refused: %s", target.tier, target.label, target.url, mismatch)
            state.ready = False
            state.models_ready = dict.fromkeys(models, False)
            return
        state.health_pending = False
        state.ready = server == 200
        # The models' probes never make the target unready, and take their turn on the probe connections (so
        # none fails waiting for one), in random order; those whose turn comes after the round's time (one
        # probe interval) keep what was known of them.
        turns = asyncio.Semaphore(_PROBES_AT_ONCE)
        until = started + self.config.health_interval_s
        models = random.sample(models, len(models))

        async def model_ready(model: str) -> bool | None:
            async with turns:
                if self._clock() > until:
                    return None
                try:
                    status = await self._probe_status(state, f"/v2/models/{quote(model, safe='')}/ready", until)
                except httpx.HTTPError:
                    return None
            return status == 200

        answers = await asyncio.gather(*(model_ready(model) for model in models))
        known = state.models_ready
        ready: dict[str, bool] = {}
        for model, answer in zip(models, answers, strict=True):
            value = answer if answer is not None else known.get(model)
            if value is not None:
                ready[model] = value
        state.models_ready = ready


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


def _response_headers(response: _Answer) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower() in _FORWARDED_RESPONSE_HEADERS}


def _json(payload: Any) -> bytes:
    import json

    return json.dumps(payload, separators=(",", ":")).encode()
