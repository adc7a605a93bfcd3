"""The node's inference API: Open Inference Protocol (KServe v2 REST) with Triton's binary tensor extension.

`InferenceApp.handle` is an `httpd.Handler`; `strata agent --serve-port` serves it with `httpd.HttpServer`.
Routes: `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2`, `GET /v2/models/{name}[/versions/{v}]`,
`GET .../ready`, `POST .../infer` and `GET /metrics`. Every error is `{"error": message}` with a 4xx status
when the caller can fix it; a bad request never turns into a 500.

Why not FastAPI: the agent must stay under 70 MB resident with a small model active, and python + numpy +
onnxruntime + one session + asyncio already take ~63 MB; FastAPI would add ~11 MB (uvicorn + starlette ~7.6
MB, and pydantic). Routing is a `match` on path segments, the codec is the pure `strata.core.oip`.

Inference never blocks the event loop: decoding, the run and encoding all happen in one job on the executor,
so health probes and other models answer while a large batch computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final

from strata import __version__
from strata.agent.httpd import Request, Response
from strata.agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from strata.agent.metrics import InferenceMetrics
from strata.agent.repository import LoadedModel, ModelRepository
from strata.agent.runtime import release_free_memory
from strata.agent.telemetry import Outcome, TelemetryGauges, TelemetryRecorder
from strata.core.datatypes import oip_from_numpy
from strata.core.errors import (
    AuthError,
    BadRequest,
    InferenceError,
    NotFound,
    StrataError,
    Unavailable,
)
from strata.core.oip import Array, check_inputs, check_outputs, decode_request, encode_response
from strata.core.telemetry import DriftReference, bin_counts, drift_references

log = logging.getLogger(__name__)

EXTENSIONS: Final = ("binary_tensor_data",)
HEADER_LENGTH: Final = "inference-header-content-length"
_LIVE_PATH: Final = ("v2", "health", "live")
_TRIM_AFTER_BYTES: Final = 1 << 20  # a request or response this large leaves heap behind worth giving back
_TRIM_DELAY: Final = 0.5  # seconds without inference before that happens

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class _InferResult:
    body: bytes
    header_length: int | None
    batch: int
    queue_ns: int
    compute_ns: int
    model_ns: int
    summary: str = ""
    drift: tuple[tuple[str, tuple[int, ...]], ...] = ()


class InferenceApp:
    """Open Inference Protocol over a `ModelRepository`, with metrics and optional bearer-token auth.

    Args:
        repository: the models this node serves; each request takes one reference and keeps it, so a swap
            never changes the model under a request in flight.
        metrics: where request outcomes and durations are counted; `/metrics` renders its registry.
        token: when given, every route but `/v2/health/live` needs `Authorization: Bearer <token>` (the agent
            sets one when it serves on a non-loopback address).
        executor: where inference runs; None means the event loop's default thread pool.
        ready: whether the node is ready (every desired model loaded); None means always ready.
        max_body_bytes: the largest request body after decompression (gzip and deflate are accepted).
        telemetry: where every request's outcome is recorded; the answer waits until it is durable, so a
            request a client saw answered is counted even if the agent dies right after.
        telemetry_gauges: the buffer's gauges in `metrics.registry`, refreshed when /metrics is scraped.
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
    ) -> None:
        self._repository = repository
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
            if self._token is not None and parts != _LIVE_PATH:
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
            if exc.http_status >= 500 and not isinstance(exc, Unavailable):  # 503s are expected while loading
                log.error("%s %s failed: %s", request.method, request.path, exc)
            headers = {"www-authenticate": 'Bearer realm="strata"'} if isinstance(exc, AuthError) else None
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
        self._metrics.set_active_models((m.name, m.version, m.manifest.variant) for m in self._repository.all())
        if self._telemetry is not None and self._telemetry_gauges is not None:
            stats = await asyncio.get_running_loop().run_in_executor(self._executor, self._telemetry.stats)
            self._telemetry_gauges.update(stats, self._telemetry.drift_psi())
        return Response(200, {"content-type": METRICS_CONTENT_TYPE}, self._metrics.render().encode())

    # --- inference --------------------------------------------------------------------------------------

    async def _infer(self, request: Request, name: str, version: str | None) -> Response:
        started = time.perf_counter_ns()
        model = self._model(name, version)
        large = len(request.body) >= _TRIM_AFTER_BYTES
        self._in_flight += 1
        try:
            result = await self._submit(model, request)
            large = large or len(result.body) >= _TRIM_AFTER_BYTES
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

    async def _record(
        self, model: LoadedModel, started_ns: int, *, ok: bool, status: str, result: _InferResult | None = None
    ) -> None:
        """Hand the outcome to telemetry and wait until it is durable (see the class docstring)."""
        if self._telemetry is None:
            return
        latency_us = (time.perf_counter_ns() - started_ns) // 1000
        await self._telemetry.record(
            Outcome(
                ts=time.time(),
                model=model.name,
                version=model.version,
                variant=model.manifest.variant,
                latency_us=latency_us,
                queue_us=result.queue_ns // 1000 if result else 0,
                batch=result.batch if result else 0,
                ok=ok,
                status=status,
                summary=result.summary if result else "",
                drift=result.drift if result else (),
            )
        )

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

    async def _submit(self, model: LoadedModel, request: Request) -> _InferResult:
        """Run `_run_inference` on the executor.

        Raises:
            BadRequest, InferenceError: as `_run_inference`.
            Unavailable: the executor is shut down (the agent is stopping).
        """
        header_length = _header_length(request)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        references = self._references(model) if self._telemetry is not None else ()
        args = (model, request.body, encoding, header_length, self._max_body_bytes, time.perf_counter_ns(), references)
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, _run_inference, *args)
        except RuntimeError as exc:
            raise Unavailable("the node is shutting down and takes no more inference requests") from exc
        return await future

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
    if not raw.isdigit():
        raise BadRequest(f"Inference-Header-Content-Length must be a non-negative integer, got {raw!r}")
    return int(raw)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body without its Content-Encoding (identity, gzip or deflate), at most `limit` bytes.

    Raises:
        BadRequest: an unknown encoding, corrupt or truncated data, or more than `limit` bytes once inflated.
    """
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported; send identity, gzip or deflate")
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: zlib or gzip header, detected
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {encoding} data: {exc}") from None
    if len(inflated) > limit:
        raise BadRequest(f"request body inflates to more than {limit} bytes")
    if not inflater.eof:
        raise BadRequest(f"request body is truncated {encoding} data")
    return inflated


def _run_inference(
    model: LoadedModel,
    body: bytes,
    encoding: str,
    header_length: int | None,
    max_bytes: int,
    submitted_ns: int,
    references: tuple[DriftReference, ...] = (),
) -> _InferResult:
    """Decode, check, run and encode one request: the whole CPU-bound part, run on the executor.

    Raises:
        BadRequest: the request does not fit the model, or the runtime rejects its values.
        InferenceError: the model returned outputs that break its own signature.
    """
    started = time.perf_counter_ns()
    manifest = model.manifest
    decoded = decode_request(_decompress(body, encoding, max_bytes), header_length)
    feeds = check_inputs(decoded, manifest.inputs, model.name)
    wanted = check_outputs(decoded, manifest.outputs, model.name)
    compute_start = time.perf_counter_ns()
    cpu_start = time.thread_time_ns()
    results = model.runtime.run(feeds, [name for name, _ in wanted])
    compute_ns = time.perf_counter_ns() - compute_start
    cpu_ns = time.thread_time_ns() - cpu_start
    _check_results(model, results)
    response, response_header_length = encode_response(
        model.name, model.version, decoded.id, ((name, results[name], binary) for name, binary in wanted)
    )
    return _InferResult(
        body=response,
        header_length=response_header_length,
        batch=_batch_size(model, feeds),
        queue_ns=started - submitted_ns,
        compute_ns=compute_ns,
        summary=_summary(model, feeds),
        drift=tuple(
            (ref.tensor, tuple(bin_counts(ref, feeds[ref.tensor] if ref.kind == "input" else results[ref.tensor])))
            for ref in references
            if (feeds if ref.kind == "input" else results).get(ref.tensor) is not None
        ),
        # What the model itself costs: on the CPU runtime, the CPU time of the run on this thread (onnxruntime's
        # workers spin, so when the node is idle this equals the wall time, and when the node is busy it leaves
        # out the time the thread waited for a core); on accelerators, the wall time.
        model_ns=cpu_ns if manifest.runtime == "onnxruntime" else compute_ns,
    )


def _summary(model: LoadedModel, feeds: dict[str, Array]) -> str:
    """A compact description of a request's first input for its telemetry event: shape and mean."""
    first = feeds[model.manifest.inputs[0].name]
    summary: dict[str, object] = {"shape": list(first.shape)}
    if first.dtype.kind in "biuf" and first.size:
        summary["mean"] = round(float(first.mean()), 4)
    return json.dumps(summary, separators=(",", ":"))


def _batch_size(model: LoadedModel, feeds: dict[str, Array]) -> int:
    """Inferences in a request: the first input's leading dimension when it is dynamic (the batch), else 1."""
    first = model.manifest.inputs[0]
    if first.shape and first.shape[0] == -1:
        return int(feeds[first.name].shape[0])
    return 1


def _check_results(model: LoadedModel, results: dict[str, Array]) -> None:
    """Refuse outputs whose datatype or shape break the signature the model advertises.

    Raises:
        InferenceError: an output has another datatype or shape than its spec says.
    """
    specs = {spec.name: spec for spec in model.manifest.outputs}
    for name, array in results.items():
        spec = specs[name]
        try:
            datatype = oip_from_numpy(array.dtype)
        except BadRequest:
            datatype = str(array.dtype)
        if datatype != spec.datatype or not spec.accepts_shape(tuple(array.shape)):
            raise InferenceError(
                f"model {model.name} version {model.version} returned output {name!r} as {datatype}"
                f" {list(array.shape)}, but its signature says {spec.datatype} {list(spec.shape)}"
            )
