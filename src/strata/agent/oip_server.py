"""The node's inference API: Open Inference Protocol (KServe v2 REST) with Triton's binary tensor extension.

`InferenceApp.handle` is an `httpd.Handler`; `strata agent --serve-port` serves it with `httpd.HttpServer`.
Routes: `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2`, `GET /v2/models/{name}[/versions/{v}]`,
`GET .../ready`, `POST .../infer` and `GET /metrics`. Every error is `{"error": message}` with a 4xx status
when the caller can fix it; a bad request never turns into a 500.

Why not FastAPI: the agent must stay under 70 MB resident with a small model active, and python + numpy +
onnxruntime + one session + asyncio already take ~63 MB; FastAPI would add ~11 MB (uvicorn + starlette ~7.6
MB, and pydantic). Routing is a `match` on path segments, the codec is the pure `strata.core.oip`.

Inference never blocks the event loop, and each model is batched (`strata.agent.scheduler`): a request is
decoded (on the loop when small, on the executor when large), admitted to its model's bounded queue or shed at
once with 503 and Retry-After, and run with the queued requests of the same shapes in one runtime call on a
worker thread, which also encodes each answer; health probes and other models answer while a batch computes
(a small model's batch, cheaper to run than to hand over, runs on the loop: see `strata.agent.scheduler`).
Every request still gets its own metrics and telemetry outcome: its rows, its own queue wait, and an answer
that waits for its outcome to be durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, Final, TypeVar

import numpy as np

from strata import __version__
from strata.agent.batch_plan import BatchingConfig
from strata.agent.httpd import HttpServer, Request, Response, ServerLimits
from strata.agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from strata.agent.metrics import InferenceMetrics, RegistrySnapshot
from strata.agent.repository import LoadedModel, ModelRepository
from strata.agent.runtime import release_free_memory
from strata.agent.scheduler import (
    INLINE_DECODE_BYTES,
    Answered,
    InferResult,
    ModelScheduler,
    Overloaded,
    Prepared,
    prepare,
)
from strata.agent.telemetry import DriftTap, Outcome, TelemetryGauges, TelemetryRecorder
from strata.core.errors import AuthError, BadRequest, Forbidden, NotFound, StrataError, Unavailable
from strata.core.package import TensorSpec
from strata.core.telemetry import drift_references

log = logging.getLogger(__name__)

EXTENSIONS: Final = ("binary_tensor_data",)
HEADER_LENGTH: Final = "inference-header-content-length"
_LIVE_PATH: Final = ("v2", "health", "live")


def _node_only(parts: tuple[str, ...]) -> bool:
    """Whether a path is one of the node's own views (its metrics, every model's statistics, its repository),
    which other nodes calling its tier port do not read."""
    match parts:
        case ("metrics",) | ("v2", "models", "stats") | ("v2", "repository", *_):
            return True
        case ("v2", "models", _, "stats") | ("v2", "models", _, "versions", _, "stats"):
            return True
    return False


_TRIM_AFTER_BYTES: Final = 1 << 20  # a request or response this large leaves heap behind worth giving back
_TRIM_DELAY: Final = 0.5  # seconds without inference before that happens
_LENGTH_DIGITS: Final = 18  # an Inference-Header-Content-Length of more digits is larger than any body

Endpoint = Callable[[Request], Awaitable[Response]]
_T = TypeVar("_T")


class BodyTooLarge(BadRequest):
    """A request body larger than this node decodes in that form (the caller's to change: 413)."""

    code = "payload_too_large"
    http_status = 413


# What decoding a request body may hold beyond the body, per byte: JSON numbers and BYTES elements become Python
# objects (a float: 24 bytes and an 8-byte list slot, for as little as the 2 bytes of "0,") before they are packed
# into arrays; zlib inflates a byte to at most about a thousand.
JSON_EXPANSION: Final = 16
DEFLATE_RATIO: Final = 1032
_DECODE_RETRY_S: Final = 1
_OBJECT_BYTES: Final = 64  # a short Python bytes object and its array slot


def decode_cost(size: int, encoding: str, header_length: int | None, most: int) -> int:
    """What decoding a body of `size` bytes may hold beyond it while it is decoded (an upper bound): its inflated
    bytes when compressed (at most `most`), and `JSON_EXPANSION` times its JSON (the whole body, or the header of
    binary tensors); binary tensors of an identity body are read in place."""
    inflated = size if encoding == "identity" else min(most, size * DEFLATE_RATIO)
    json = inflated if header_length is None else min(header_length, inflated)
    return json * JSON_EXPANSION + (0 if encoding == "identity" else inflated)


def held_bytes(prepared: Prepared, body: bytes | None) -> int:
    """What a decoded request holds beyond its body until it is answered: its tensors, but those read in place out
    of `body` (charged already, as the body); a BYTES element at `_OBJECT_BYTES`."""
    view = np.frombuffer(body, np.uint8) if body else None
    held = 0
    for array in prepared.feeds.values():
        if view is not None and array.dtype != object and np.may_share_memory(array, view):
            continue
        held += array.size * _OBJECT_BYTES if array.dtype == object else array.nbytes
    return held


class InferenceApp:
    """Open Inference Protocol over a `ModelRepository`, with metrics and optional bearer-token auth.

    Args:
        repository: the models this node serves; each request takes one reference and keeps it, so a swap
            never changes the model under a request in flight.
        metrics: where request outcomes and durations are counted; `/metrics` renders its registry.
        token: when given, every route but `/v2/health/live` needs `Authorization: Bearer <token>` (the agent
            sets one when it serves on a non-loopback address), except requests from the mutual-TLS tier
            listener, which carry the calling node's verified id.
        executor: where batches run (and large requests are decoded); None means the loop's default pool.
        ready: whether the node is ready (every desired model loaded); None means always ready.
        max_body_bytes: the largest request body after decompression (gzip and deflate are accepted).
        decode_budget_bytes: what decoding may hold at once beyond the bodies the HTTP server charged (the node's
            request budget): a compressed body's inflated bytes, a JSON body's Python objects (see `decode_cost`);
            past it requests are shed (503), and a JSON body may be at most a sixteenth of it.
        telemetry: where every request's outcome is recorded; the answer waits until it is durable, so a
            request a client saw answered is counted even if the agent dies right after. A shed request's
            outcome is recorded too, but its 503 goes out at once.
        batching: the agent's batching and queueing settings; a package's policy may override them per model
            (see `strata.agent.batch_plan.resolve_config`).
        telemetry_gauges: the buffer's gauges in `metrics.registry`, refreshed when /metrics is scraped.
        metrics_view: what `/metrics` answers, when not this process's own `render_metrics` (on a node that
            serves from several processes: the node's one view, from all of them).
    """

    def __init__(
        self,
        repository: ModelRepository,
        metrics: InferenceMetrics,
        *,
        server_name: str = "strata",
        server_version: str = __version__,
        token: str | None = None,
        executor: Executor | None = None,
        ready: Callable[[], bool] | None = None,
        max_body_bytes: int = 64 << 20,
        decode_budget_bytes: int = 128 << 20,
        telemetry: TelemetryRecorder | None = None,
        telemetry_gauges: TelemetryGauges | None = None,
        batching: BatchingConfig | None = None,
        metrics_view: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self._metrics_view = metrics_view
        self._repository = repository
        self._batching = batching or BatchingConfig()
        self._schedulers: dict[str, ModelScheduler] = {}
        self._telemetry = telemetry
        self._telemetry_gauges = telemetry_gauges
        self._metrics = metrics
        self._server_name = server_name
        self._server_version = server_version
        self._token = token.encode() if token else None
        self._executor = executor
        self._ready = ready
        self._max_body_bytes = max_body_bytes
        self._decode_budget = decode_budget_bytes
        # What the requests being decoded, or decoded and waiting for their batch, may hold beyond their bodies
        # (see `decode_cost`); the HTTP server's budget counts only the bodies as they arrived.
        self._decoding = 0
        self._in_flight = 0
        self._trim_timer: asyncio.TimerHandle | None = None

    async def handle(self, request: Request) -> Response:
        """Answer one HTTP request; every strata error becomes its status and `{"error": message}`.

        Raises:
            Exception: only bugs (anything that is not a StrataError), which the HTTP server answers with 500.
        """
        parts = tuple(request.path.strip("/").split("/"))
        try:
            # A request that came in over the tier listener carries the node id its verified fleet certificate
            # names (`request.peer`): mutual TLS authenticated it. Local callers show the serving token (checked on
            # the head already by `HttpServer`; again here for callers of `handle` that are not it).
            refused = self.head_refusal(request)
            if refused is not None:
                raise AuthError(refused)
            if request.peer is not None and _node_only(parts):
                # another node falls back to this one for inference; what this node served, and to whom, is the
                # node's operator's to read (its serving token), not every fleet node's
                raise Forbidden(f"{request.path} is for this node's operator, not for other nodes")
            route = self._route(parts)
            if route is None:
                raise NotFound(f"no route for {request.method} {request.path}")
            method, endpoint = route
            if request.method != method and not (method == "GET" and request.method == "HEAD"):
                allow = "GET, HEAD" if method == "GET" else method
                return Response.error(405, f"{request.method} is not allowed on {request.path}", {"allow": allow})
            return await endpoint(request)
        except StrataError as exc:
            if exc.http_status >= 500 and not isinstance(exc, Unavailable):  # 503s are expected: loading, shedding
                log.error("%s %s failed: %s", request.method, request.path, exc)
            headers = None
            if isinstance(exc, AuthError):
                headers = {"www-authenticate": 'Bearer realm="strata"'}
            elif isinstance(exc, Overloaded):
                headers = {"retry-after": str(exc.retry_after_s)}
            return Response.error(exc.http_status, exc.message, headers)

    def _authenticate(self, request: Request) -> None:
        self.authenticate(request.headers.get("authorization", ""))

    def http_server(self, limits: ServerLimits | None = None) -> HttpServer:
        """The HTTP server for this app on the serving port: with a serving token, a request without it is refused
        on its head, before its body is charged to the budget or read (`head_refusal`)."""
        return HttpServer(
            self.handle,
            limits,
            release_memory=release_free_memory,
            head_refusal=self.head_refusal if self._token is not None else None,
        )

    def head_refusal(self, request: Request) -> str | None:
        """Why a request is refused without the serving token, or None: asked by the HTTP server on the request's
        head (before its body is charged or read) and by `handle`."""
        if self._token is None or request.peer is not None:
            return None
        if tuple(request.path.strip("/").split("/")) == _LIVE_PATH:
            return None
        try:
            self._authenticate(request)
        except AuthError as exc:
            return exc.message
        return None

    @property
    def needs_token(self) -> bool:
        """Whether callers of the serving port must show the serving token."""
        return self._token is not None

    def authenticate(self, authorization: str) -> None:
        """Check an `Authorization` value (an HTTP header, gRPC metadata) against the serving token.

        Raises:
            AuthError: it is not `Bearer <the token>`.
        """
        assert self._token is not None
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), self._token):
            raise AuthError("this endpoint needs 'Authorization: Bearer <token>' with the node's serving token")

    def _route(self, parts: tuple[str, ...]) -> tuple[str, Endpoint] | None:
        """(method, endpoint) for a path, or None when no route matches."""
        match parts:
            case ("v2", "health", "live"):
                return "GET", self._live
            case ("v2", "health", "ready"):
                return "GET", self._server_ready
            case ("v2",):
                return "GET", self._server_metadata
            case ("metrics",):
                return "GET", self._render_metrics
            case ("v2", "models", "stats"):
                return "GET", lambda _request: self._json(self.model_statistics(None, None))
            case ("v2", "repository", "index"):
                return "POST", self._repository_index
            case ("v2", "models", name, "versions", version, *action):
                return self._model_route(name, version, tuple(action))
            case ("v2", "models", name, *action):
                return self._model_route(name, None, tuple(action))
        return None

    def _model_route(self, name: str, version: str | None, action: tuple[str, ...]) -> tuple[str, Endpoint] | None:
        match action:
            case ():
                return "GET", lambda _request: self._model_metadata(name, version)
            case ("ready",):
                return "GET", lambda _request: self._model_ready(name, version)
            case ("config",):
                return "GET", lambda _request: self._json(self.model_config(self.model(name, version)))
            case ("stats",):
                return "GET", lambda _request: self._json(self.model_statistics(name, version))
            case ("infer",):
                return "POST", lambda request: self._infer(request, name, version)
        return None

    def model(self, name: str, version: str | None) -> LoadedModel:
        """The model that serves `name` (and `version`, when given).

        Raises:
            NotFound: no such model here, or its active version is another one.
        """
        model = self._repository.get(name)
        if model is None:
            served = [m.name for m in self._repository.all()]
            raise NotFound(f"model {name!r} is not served on this node (it serves {served})")
        if version is not None and version != model.version:
            raise NotFound(f"model {name} version {version} is not available (active: {model.version})")
        return model

    # --- health and metadata ----------------------------------------------------------------------------

    async def _live(self, _request: Request) -> Response:
        return Response.json(200, {"live": True})

    def is_ready(self) -> bool:
        """Whether the node is ready (every model it should serve is loaded)."""
        return self._ready is None or self._ready()

    async def _server_ready(self, _request: Request) -> Response:
        if not self.is_ready():
            raise Unavailable("the node is not ready: its models are still loading")
        return Response.json(200, {"ready": True})

    def server_metadata(self, extensions: tuple[str, ...] = EXTENSIONS) -> dict[str, Any]:
        """The Open Inference Protocol's server metadata."""
        return {"name": self._server_name, "version": self._server_version, "extensions": list(extensions)}

    async def _server_metadata(self, _request: Request) -> Response:
        return Response.json(200, self.server_metadata())

    @staticmethod
    def model_metadata(model: LoadedModel) -> dict[str, Any]:
        """The Open Inference Protocol's model metadata (with -1 for dynamic dimensions)."""
        manifest = model.manifest
        return {
            "name": model.name,
            "versions": [model.version],
            "platform": triton_platform(manifest.runtime),
            "inputs": [spec.to_json() for spec in manifest.inputs],
            "outputs": [spec.to_json() for spec in manifest.outputs],
        }

    async def _model_metadata(self, name: str, version: str | None) -> Response:
        return Response.json(200, self.model_metadata(self.model(name, version)))

    @staticmethod
    async def _json(payload: Any) -> Response:
        return Response.json(200, payload)

    # --- Triton's model configuration, statistics and repository index extensions ---------------------

    def model_config(self, model: LoadedModel) -> dict[str, Any]:
        """The model as Triton's model configuration (JSON form of `inference.ModelConfig`) describes it: how this
        node batches it (`max_batch_size` 0 and full dims when it does not batch; else dims without the batch
        axis), its queue and its instances."""
        return triton_model_config(model, self._scheduler(model).config)

    def model_statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        """Triton's statistics of one model (every served model when `name` is None), from the same counters as
        `/metrics` (cumulative since the agent started; failures have no duration here).

        Raises:
            NotFound: `name` is given and not served (in `version`, when given).
        """
        models = [self.model(name, version)] if name else sorted(self._repository.all(), key=lambda m: m.name)
        return {"model_stats": [self._metrics.triton_statistics(m.name, m.version) for m in models]}

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: the models this node serves now, all READY (`ready_only` changes nothing:
        a model that is not loaded is not served here)."""
        del ready_only
        return [
            {"name": m.name, "version": m.version, "state": "READY", "reason": ""}
            for m in sorted(self._repository.all(), key=lambda m: m.name)
        ]

    async def _repository_index(self, request: Request) -> Response:
        return Response.json(200, self.repository_index())

    async def _model_ready(self, name: str, version: str | None) -> Response:
        model = self.model(name, version)
        return Response.json(200, {"name": model.name, "version": model.version, "ready": True})

    async def _render_metrics(self, _request: Request) -> Response:
        text = await (self._metrics_view() if self._metrics_view is not None else self.render_metrics())
        return Response(200, {"content-type": METRICS_CONTENT_TYPE}, text.encode())

    def refresh_gauges(self) -> None:
        """Bring the gauges that describe now up to date: the models served, each one's queue; drop the series of
        versions retired a while ago."""
        served = self._repository.all()
        self._metrics.set_active_models((m.name, m.version, m.manifest.variant) for m in served)
        self._metrics.forget_retired((m.name, m.version) for m in served)
        for name in [n for n, s in self._schedulers.items() if self._repository.get(n) is not s.model and not s.queued]:
            del self._schedulers[name]  # a model no longer served, its queue drained
        self._metrics.pending_requests.replace(
            {(s.model.name, s.model.version): s.queued for s in self._schedulers.values()}
        )

    async def render_metrics(self, others: Sequence[RegistrySnapshot] = ()) -> str:
        """This process's metrics page, with the series of the node's other serving processes (`others`) added."""
        self.refresh_gauges()
        if self._telemetry is not None and self._telemetry_gauges is not None:
            stats = await asyncio.get_running_loop().run_in_executor(self._executor, self._telemetry.stats)
            self._telemetry_gauges.update(stats, self._telemetry.drift_psi())
        return self._metrics.render(others)

    # --- inference --------------------------------------------------------------------------------------

    async def _infer(self, request: Request, name: str, version: str | None) -> Response:
        model = self.model(name, version)
        body = request.body
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        raw_length = request.headers.get(HEADER_LENGTH)

        header_length = _header_length(raw_length)
        # The JSON to parse: the whole body, or the header before binary tensors (which may carry tensor data too)
        json_limit = min(self._max_body_bytes, self._decode_budget // JSON_EXPANSION)
        json_part = len(body) if header_length is None else min(header_length, len(body))
        if (encoding == "identity" and json_part > json_limit) or (header_length or 0) > json_limit:
            raise BodyTooLarge(
                f"a request's JSON may be at most {json_limit} bytes on this node (a JSON tensor costs about "
                f"{JSON_EXPANSION} times its text to decode); send large tensors as binary data (the binary tensor "
                "extension: Inference-Header-Content-Length)"
            )
        most = json_limit if header_length is None else self._max_body_bytes  # what the body may inflate to

        def decode(scheduler: ModelScheduler) -> Prepared:
            batched, layouts = scheduler.config.batching, scheduler.layouts
            return prepare(model, body, header_length, batched, encoding, most, layouts)

        inline = encoding == "identity" and len(body) <= INLINE_DECODE_BYTES
        cost = decode_cost(len(body), encoding, header_length, most)
        result = await self.infer(model, decode, size=len(body), inline=inline, cost=cost, body=body)
        if result.header_length is None:
            return Response(200, {"content-type": "application/json"}, result.body)
        headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(result.header_length)}
        return Response(200, headers, result.body)

    async def infer(
        self,
        model: LoadedModel,
        decode: Callable[[ModelScheduler], Prepared],
        *,
        size: int,
        inline: bool,
        cost: int = 0,
        body: bytes | None = None,
    ) -> InferResult:
        """Serve one inference request of any protocol: decode it (`decode`, given the model's queue; on the loop
        when `inline`, else on the executor), admit it to the model's queue or shed it, wait for its batch, and
        count it in the metrics and telemetry. `size` is the request's size in bytes; `cost` what decoding it may
        hold beyond that (`decode_cost`), charged to the decode budget first (shed, 503, when it does not fit beside
        the requests already charged) and, once decoded, replaced by what the request really holds until it is
        answered (`held_bytes`, its tensors but those read in place out of `body`).

        Raises:
            BadRequest: the request is malformed or does not fit the model (whatever `decode` raised that is not
                a strata error counts as that too).
            Overloaded: the model's queue sheds it.
            Unavailable: the agent is stopping.
            InferenceError: the model failed.
        """
        started = time.perf_counter_ns()
        scheduler = self._scheduler(model)
        large = size >= _TRIM_AFTER_BYTES
        self._in_flight += 1
        charged = 0
        try:
            if cost:
                self._charge_decoding(cost)
                charged = cost
            prepared = await self._decode(decode, scheduler, inline)
            if charged:  # the estimate gives way to what the decoded request holds while it waits for its batch
                held = held_bytes(prepared, body)
                self._decoding += held - charged
                charged = held
            prepared.started_ns = started
            result = await scheduler.submit(prepared, time.perf_counter_ns())  # counted and recorded: `_served`
            large = large or len(result.body) >= _TRIM_AFTER_BYTES
        except Overloaded:
            # shed at once: the answer does not wait for the telemetry commit, or shedding would cost a commit
            self._metrics.record_failure(model.name, model.version, "rejected")
            self._record_nowait(model, started, "rejected")
            raise
        except Exception as exc:
            reason = _failure_reason(exc)
            self._metrics.record_failure(model.name, model.version, reason)
            await self._record(model, started, ok=False, status=reason)
            raise
        finally:
            self._decoding -= charged
            self._in_flight -= 1
            if large or charged >= _TRIM_AFTER_BYTES:
                self._schedule_trim()
        return result

    def _served(self, model: LoadedModel, answered: list[Answered]) -> None:
        """A batch's answered requests (on the loop): counted in the metrics, and their outcomes recorded together;
        each request's future gets its answer once its outcome is committed (at once without telemetry). One
        wake-up per request: its answer comes out of `submit` already durable."""
        now = time.perf_counter_ns()
        self._metrics.record_successes(
            model.name,
            model.version,
            [(r.batch, now - started, r.queue_ns, r.compute_ns, r.model_ns) for _, started, r in answered],
        )
        if self._telemetry is None:
            for future, _, result in answered:
                future.set_result(result)
            return
        self._telemetry.record_answers(
            model.name,
            model.version,
            model.manifest.variant,
            time.time(),
            [
                (future, r, (now - started) // 1000, r.queue_ns // 1000, r.batch, r.summarize)
                for future, started, r in answered
            ],
        )

    def _scheduler(self, model: LoadedModel) -> ModelScheduler:
        """The queue of the model object serving now; a swapped-in model gets a new one (the old one drains)."""
        scheduler = self._schedulers.get(model.name)
        if scheduler is None or scheduler.model is not model:
            drift = self._drift_tap(model)
            served = functools.partial(self._served, model)
            scheduler = ModelScheduler.for_model(model, self._batching, self._metrics, self._executor, drift, served)
            self._schedulers[model.name] = scheduler
        return scheduler

    async def _decode(
        self, decode: Callable[[ModelScheduler], Prepared], scheduler: ModelScheduler, inline: bool
    ) -> Prepared:
        """Decode and check a request: small ones right here (microseconds), large or compressed ones on the
        executor so the loop keeps answering.

        Raises:
            BadRequest: the request is malformed or does not fit the model.
            Unavailable: the executor is shut down (the agent is stopping).
        """
        if inline:
            return _caller_fault(decode, scheduler)
        return await self.off_loop(functools.partial(_caller_fault, decode, scheduler))

    @contextlib.contextmanager
    def parsing(self, cost: int) -> Iterator[None]:
        """Hold `cost` of the decode budget while a request is parsed before `infer` can charge it (gRPC's protobuf
        parse, which must find the model's name first), shedding it as `infer` does when it does not fit beside
        what is charged already; a large one is followed by a trim, as `infer` does.

        Raises:
            Overloaded: no room in the decode budget.
        """
        self._charge_decoding(cost)
        try:
            yield
        finally:
            self._decoding -= cost
            if cost >= _TRIM_AFTER_BYTES:
                self._schedule_trim()

    def _charge_decoding(self, cost: int) -> None:
        """Charge `cost` to the decode budget: always when nothing is charged (a request larger than the budget
        is decoded alone, not refused for ever), else only when it fits beside what is.

        Raises:
            Overloaded: it does not fit (shed, with a retry-after).
        """
        if self._decoding and self._decoding + cost > self._decode_budget:
            raise Overloaded(
                "the node is decoding as many large or compressed requests as its memory budget holds", _DECODE_RETRY_S
            )
        self._decoding += cost

    async def off_loop(self, work: Callable[[], _T]) -> _T:
        """Run `work` on the executor (where batches run).

        Raises:
            Unavailable: the executor is shut down (the agent is stopping).
        """
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, work)
        except RuntimeError as exc:
            raise Unavailable("the node is shutting down and takes no more inference requests") from exc
        return await future

    def _outcome(
        self, model: LoadedModel, started_ns: int, ok: bool, status: str, result: InferResult | None
    ) -> Outcome:
        return Outcome(
            ts=time.time(),
            model=model.name,
            version=model.version,
            variant=model.manifest.variant,
            latency_us=(time.perf_counter_ns() - started_ns) // 1000,
            queue_us=result.queue_ns // 1000 if result else 0,
            batch=result.batch if result else 0,
            ok=ok,
            status=status,
            summarize=result.summarize if result else None,
        )

    async def _record(
        self, model: LoadedModel, started_ns: int, *, ok: bool, status: str, result: InferResult | None = None
    ) -> None:
        """Hand the outcome to telemetry and wait until it is durable (see the class docstring)."""
        if self._telemetry is None:
            return
        await self._telemetry.record(self._outcome(model, started_ns, ok, status, result))

    def _record_nowait(self, model: LoadedModel, started_ns: int, status: str) -> None:
        """Hand a failed request's outcome to telemetry without waiting for the commit."""
        if self._telemetry is not None:
            self._telemetry.record_nowait(self._outcome(model, started_ns, False, status, None))

    def _drift_tap(self, model: LoadedModel) -> DriftTap | None:
        """Where the batches of a model just swapped in count their drift: its references, parsed once per
        activation (not kept by package: a node that runs for months serves many), and the telemetry recorder."""
        if self._telemetry is None:
            return None
        try:
            references = tuple(drift_references(model.manifest.drift))
        except StrataError as exc:
            log.warning("model %s %s has unusable drift references: %s", model.name, model.version, exc)
            references = ()
        return self._telemetry.drift_tap(model.name, model.version, references)

    def _schedule_trim(self) -> None:
        """Once no inference has run for a moment, give the heap a large request left behind back to the OS.

        glibc keeps freed memory at its peak; without this one large batch would keep the agent over its
        memory budget for good. The delay lets the response go out and its buffers be freed first.
        """
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        self._trim_timer = asyncio.get_running_loop().call_later(_TRIM_DELAY, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        self._trim_timer = None
        if self._in_flight:
            self._schedule_trim()
            return
        with contextlib.suppress(RuntimeError):  # the executor is shut down: the process is ending anyway
            asyncio.get_running_loop().run_in_executor(self._executor, release_free_memory)


def triton_platform(runtime: str) -> str:
    """Triton's platform name for a package's runtime."""
    return "onnxruntime_onnx" if runtime.startswith("onnxruntime") else runtime


def triton_model_config(model: LoadedModel, config: BatchingConfig) -> dict[str, Any]:
    """Triton's model configuration (JSON form of `inference.ModelConfig`) for a model batched with `config`."""
    manifest = model.manifest
    batching = config.batching
    skip = 1 if batching else 0  # with max_batch_size > 0, Triton's dims leave out the batch axis

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        datatype = "TYPE_STRING" if spec.datatype == "BYTES" else f"TYPE_{spec.datatype}"
        return {"name": spec.name, "data_type": datatype, "dims": list(spec.shape[skip:])}

    out: dict[str, Any] = {
        "name": model.name,
        "platform": triton_platform(manifest.runtime),
        "backend": "onnxruntime" if manifest.runtime.startswith("onnxruntime") else manifest.runtime,
        "max_batch_size": config.max_batch_size if batching else 0,
        "input": [tensor(spec) for spec in manifest.inputs],
        "output": [tensor(spec) for spec in manifest.outputs],
        "instance_group": [
            {
                "name": model.name,
                "kind": "KIND_GPU" if "cuda" in manifest.runtime else "KIND_CPU",
                "count": config.instances,
            }
        ],
        "default_model_filename": manifest.model_file,
    }
    if batching:
        out["dynamic_batching"] = {
            "preferred_batch_size": list(config.preferred_batch_sizes),
            "max_queue_delay_microseconds": config.max_queue_delay_us,
            "default_queue_policy": {"max_queue_size": config.max_queue_size},
        }
    return out


def _caller_fault(decode: Callable[..., Prepared], *args: Any, **kwargs: Any) -> Prepared:
    """Run `decode` over a caller's request; whatever it raises that is not a strata error is the caller's
    fault too (400), never an internal error: what the caller sends decides every path through the decoder,
    and a 500 would count against the model in probation and the rollout gates. Logged, since it means the
    decoder missed a check.

    Raises:
        BadRequest: the request is malformed (including anything unexpected the decoder raised).
        StrataError: as `decode` raised it (503 when shutting down, say).
    """
    try:
        return decode(*args, **kwargs)
    except StrataError:
        raise
    except Exception as exc:  # by design: see the docstring
        log.warning("an inference request failed to decode with an unexpected error", exc_info=True)
        raise BadRequest(f"the request could not be decoded: {type(exc).__name__}: {str(exc)[:200]}") from None


def _failure_reason(exc: Exception) -> str:
    """The `reason` label of a failed request: whose fault it was."""
    if isinstance(exc, BadRequest):
        return "bad_request"
    if isinstance(exc, Unavailable):
        return "unavailable"
    return "internal"


def _header_length(raw: str | None) -> int | None:
    """The value of a request's `Inference-Header-Content-Length` header, None when absent.

    Raises:
        BadRequest: the header is not a non-negative integer.
    """
    if raw is None:
        return None
    raw = raw.strip()
    # ASCII digits only ("²".isdigit() is true, and int() refuses it), and few enough for any body size
    if not (raw.isascii() and raw.isdigit()) or len(raw) > _LENGTH_DIGITS:
        raise BadRequest(f"Inference-Header-Content-Length must be a non-negative integer, got {raw[:40]!r}")
    return int(raw)
