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
worker thread, which also encodes each answer; health probes and other models answer while a batch computes.
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
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Final

from strata import __version__
from strata.agent.batching import BatchingConfig
from strata.agent.httpd import Request, Response
from strata.agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from strata.agent.metrics import InferenceMetrics, RegistrySnapshot
from strata.agent.repository import LoadedModel, ModelRepository
from strata.agent.runtime import release_free_memory
from strata.agent.scheduler import INLINE_DECODE_BYTES, InferResult, ModelScheduler, Overloaded, Prepared, prepare
from strata.agent.telemetry import Outcome, TelemetryGauges, TelemetryRecorder
from strata.core.errors import AuthError, BadRequest, NotFound, StrataError, Unavailable
from strata.core.telemetry import DriftReference, drift_references

log = logging.getLogger(__name__)

EXTENSIONS: Final = ("binary_tensor_data",)
HEADER_LENGTH: Final = "inference-header-content-length"
_LIVE_PATH: Final = ("v2", "health", "live")
_TRIM_AFTER_BYTES: Final = 1 << 20  # a request or response this large leaves heap behind worth giving back
_TRIM_DELAY: Final = 0.5  # seconds without inference before that happens
_LENGTH_DIGITS: Final = 18  # an Inference-Header-Content-Length of more digits is larger than any body

Endpoint = Callable[[Request], Awaitable[Response]]


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
        telemetry: where every request's outcome is recorded; the answer waits until it is durable, so a
            request a client saw answered is counted even if the agent dies right after. A shed request's
            outcome is recorded too, but its 503 goes out at once.
        batching: the agent's batching and queueing settings; a package's policy may override them per model
            (see `strata.agent.batching.resolve_config`).
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
        self._drift_refs: dict[str, tuple[DriftReference, ...]] = {}
        self._metrics = metrics
        self._server_name = server_name
        self._server_version = server_version
        self._token = token.encode() if token else None
        self._executor = executor
        self._ready = ready
        self._max_body_bytes = max_body_bytes
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
            # names (`request.peer`): mutual TLS authenticated it. Local callers show the serving token.
            if self._token is not None and parts != _LIVE_PATH and request.peer is None:
                self._authenticate(request)
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
        assert self._token is not None
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
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
            case ("infer",):
                return "POST", lambda request: self._infer(request, name, version)
        return None

    def _model(self, name: str, version: str | None) -> LoadedModel:
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

    async def _server_ready(self, _request: Request) -> Response:
        if self._ready is not None and not self._ready():
            raise Unavailable("the node is not ready: its models are still loading")
        return Response.json(200, {"ready": True})

    async def _server_metadata(self, _request: Request) -> Response:
        return Response.json(
            200, {"name": self._server_name, "version": self._server_version, "extensions": list(EXTENSIONS)}
        )

    async def _model_metadata(self, name: str, version: str | None) -> Response:
        model = self._model(name, version)
        manifest = model.manifest
        platform = "onnxruntime_onnx" if manifest.runtime.startswith("onnxruntime") else manifest.runtime
        return Response.json(
            200,
            {
                "name": model.name,
                "versions": [model.version],
                "platform": platform,
                "inputs": [spec.to_json() for spec in manifest.inputs],
                "outputs": [spec.to_json() for spec in manifest.outputs],
            },
        )

    async def _model_ready(self, name: str, version: str | None) -> Response:
        model = self._model(name, version)
        return Response.json(200, {"name": model.name, "version": model.version, "ready": True})

    async def _render_metrics(self, _request: Request) -> Response:
        text = await (self._metrics_view() if self._metrics_view is not None else self.render_metrics())
        return Response(200, {"content-type": METRICS_CONTENT_TYPE}, text.encode())

    def refresh_gauges(self) -> None:
        """Bring the gauges that describe now up to date: the models served, each one's queue."""
        self._metrics.set_active_models((m.name, m.version, m.manifest.variant) for m in self._repository.all())
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
        started = time.perf_counter_ns()
        model = self._model(name, version)
        scheduler = self._scheduler(model)
        large = len(request.body) >= _TRIM_AFTER_BYTES
        self._in_flight += 1
        try:
            prepared = await self._prepare(model, scheduler, request)
            result = await scheduler.submit(prepared, time.perf_counter_ns())
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
            self._in_flight -= 1
            if large:
                self._schedule_trim()
        request_ns = time.perf_counter_ns() - started
        self._metrics.record_success(
            model.name,
            model.version,
            batch=result.batch,
            request_ns=request_ns,
            queue_ns=result.queue_ns,
            compute_ns=result.compute_ns,
            model_ns=result.model_ns,
        )
        await self._record(model, started, ok=True, status="ok", result=result)
        if result.header_length is None:
            return Response(200, {"content-type": "application/json"}, result.body)
        headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(result.header_length)}
        return Response(200, headers, result.body)

    def _scheduler(self, model: LoadedModel) -> ModelScheduler:
        """The queue of the model object serving now; a swapped-in model gets a new one (the old one drains)."""
        scheduler = self._schedulers.get(model.name)
        if scheduler is None or scheduler.model is not model:
            references = self._references(model) if self._telemetry is not None else ()
            scheduler = ModelScheduler.for_model(model, self._batching, self._metrics, self._executor, references)
            self._schedulers[model.name] = scheduler
        return scheduler

    async def _prepare(self, model: LoadedModel, scheduler: ModelScheduler, request: Request) -> Prepared:
        """Decode and check a request: small ones right here (microseconds), large or compressed ones on the
        executor so the loop keeps answering.

        Raises:
            BadRequest: the request is malformed or does not fit the model.
            Unavailable: the executor is shut down (the agent is stopping).
        """
        header_length = _header_length(request)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        batched = scheduler.config.batching
        if encoding == "identity" and len(request.body) <= INLINE_DECODE_BYTES:
            return _caller_fault(prepare, model, request.body, header_length, batched, layouts=scheduler.layouts)
        args = (model, request.body, header_length, batched, encoding, self._max_body_bytes, scheduler.layouts)
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(_caller_fault, prepare, *args)
            )
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
            drift=result.drift if result else (),
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

    def _references(self, model: LoadedModel) -> tuple[DriftReference, ...]:
        """The drift references of a served model, parsed once per package."""
        references = self._drift_refs.get(model.digest)
        if references is None:
            try:
                references = tuple(drift_references(model.manifest.drift))
            except StrataError as exc:
                log.warning("model %s %s has unusable drift references: %s", model.name, model.version, exc)
                references = ()
            self._drift_refs[model.digest] = references
            if self._telemetry is not None:
                self._telemetry.set_references(model.name, model.version, references)
        return references

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


def _header_length(request: Request) -> int | None:
    """The `Inference-Header-Content-Length` of a request, None when absent.

    Raises:
        BadRequest: the header is not a non-negative integer.
    """
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    raw = raw.strip()
    # ASCII digits only ("²".isdigit() is true, and int() refuses it), and few enough for any body size
    if not (raw.isascii() and raw.isdigit()) or len(raw) > _LENGTH_DIGITS:
        raise BadRequest(f"Inference-Header-Content-Length must be a non-negative integer, got {raw[:40]!r}")
    return int(raw)
