"""Each served model's request queue and dynamic batcher: the driver around `strata.agent.batch_plan`.

A request is decoded and checked (`prepare`), admitted or shed at once (`ModelScheduler.submit`), queued, and
run in a batch with the queued requests of the same shapes (`run_batch`, on a worker thread): inputs are
concatenated along the first axis, the runtime runs once, outputs are split back by rows and each request's
response is encoded on the worker. The event loop only moves requests between the queue and the workers, so
it never waits for a slow model. A small model's batch runs on the loop itself (`batching.runs_inline`: its
calls measured under 200 µs of CPU, and not waiting on anything): handing it to a worker and back would cost
the loop more than running it, and the GIL would change hands twice per batch.

Why a batch that fails is rerun one request at a time: onnxruntime rejects a whole call when one row is bad
(an index out of an embedding's range, say); the bad request must get its 400 and the others their answers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import time
import zlib
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import numpy as np

from strata.agent.batch_plan import (
    BatchingConfig,
    QueueLoad,
    WaitUntil,
    admit,
    batchable_signature,
    cost_follows_rows,
    ewma,
    plan_batch,
    resolve_config,
    runs_inline,
)
from strata.agent.metrics import InferenceMetrics
from strata.agent.repository import LoadedModel
from strata.agent.runtime import Runtime
from strata.agent.telemetry import DriftCounts, DriftTap
from strata.core.datatypes import oip_from_numpy
from strata.core.errors import BadRequest, ConfigError, InferenceError, Unavailable
from strata.core.oip import Array, InferRequest, check_inputs, check_outputs, decode_request, encode_response
from strata.core.telemetry import DRIFT_MAX_ELEMENTS, bin_counts_summed

log = logging.getLogger(__name__)

INLINE_DECODE_BYTES: Final = 64 << 10  # smaller identity-encoded bodies are decoded on the event loop
_LITTLE: Final = sys.byteorder == "little"


class Overloaded(Unavailable):
    """The model's queue cannot take this request now; the client should retry after `retry_after_s`."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class InferResult:
    """One request's answer and the facts its metrics and telemetry need."""

    body: bytes
    header_length: int | None
    batch: int  # rows this request contributed
    queue_ns: int  # from joining the queue to its batch starting on a worker
    compute_ns: int  # the runtime call of its batch
    # What the model itself cost this request, for probation and rollout gates: its rows' share of the batch's
    # runtime call, in CPU time of the calling thread on the CPU runtime (a busy node's waits for a core are left
    # out), in wall time on accelerators.
    model_ns: int
    summarize: Callable[[], str] | None = None  # its telemetry summary, made only if the event is kept


# Takes the answered requests of a batch, (future not done, when the server began on it, answer), counts them and
# resolves each future with its answer, at once or when their telemetry is committed
Answered = tuple[asyncio.Future[InferResult], int, InferResult]
Served = Callable[[list[Answered]], None]


@dataclass(eq=False, slots=True)
class Prepared:
    """A decoded request that fits its model, as it waits in the queue."""

    feeds: dict[str, Array]
    outputs: tuple[tuple[str, bool], ...]  # (name, as binary) of the outputs it asked for
    request_id: str | None
    rows: int
    key: Hashable | None  # requests with equal keys can share a runtime call; None runs alone
    enqueued_ns: int = 0
    started_ns: int = 0  # when the server began on it (before decoding): its latency is from here
    future: asyncio.Future[InferResult] | None = None
    # how its answer is encoded on the worker; None: the REST body (JSON, or Triton's binary extension)
    encode: Encoder | None = None


# (model, request, its outputs by name) -> (body, header length or None)
Encoder = Callable[[LoadedModel, "Prepared", dict[str, Array]], tuple[bytes, int | None]]


@dataclass(frozen=True)
class BatchRun:
    """What one worker job did: each request's result or error, in order, and its runtime calls."""

    results: list[InferResult | Exception]
    rows: int
    executions: int
    busy_ns: int  # the whole job on the worker thread
    model_ns: int = 0  # what the model itself cost (its requests' `model_ns` together)
    compute_ns: int = 0  # the wall time of its runtime call (the longest, when it ran requests one at a time)


def decompress(body: bytes, encoding: str, limit: int = 64 << 20) -> bytes:
    """The body without its Content-Encoding (identity, gzip or deflate), at most `limit` bytes.

    Raises:
        BadRequest: an unknown encoding, corrupt or truncated data, bytes after the compressed stream, or more
            than `limit` bytes once inflated.
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
    if inflater.unused_data:  # bytes after the stream: a proxy or a log would see a different body than we do
        raise BadRequest(f"request body has {len(inflater.unused_data)} bytes after its {encoding} data")
    return inflated


def rows_independent(runtime: Runtime) -> bool:
    """Whether a runtime computes each row of a batch on its own (runtimes may say so; default yes)."""
    return bool(getattr(runtime, "rows_independent", True))


@dataclass(frozen=True, slots=True)
class _Layout:
    """A binary request's JSON header, decoded and checked against the model once: where its tensors lie."""

    inputs: tuple[tuple[str, np.dtype[Any], tuple[int, ...], int], ...]  # name, dtype, shape, bytes; body order
    size: int  # bytes of binary data after the header
    outputs: tuple[tuple[str, bool], ...]
    request_id: str | None
    rows: int
    key: Hashable | None


_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class _Recent(Generic[_K, _V]):
    """A model's few recent entries of one kind, by key; when full it starts over rather than track their age
    (a client cycling through many shapes). Thread-safe (dict operations)."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._entries: dict[_K, _V] = {}

    def get(self, key: _K) -> _V | None:
        return self._entries.get(key)

    def put(self, key: _K, value: _V) -> None:
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[key] = value


class Layouts(_Recent[bytes, _Layout]):
    """The request headers one model has seen lately, by their bytes. A client sends the same header for every
    request of one shape (only the tensor bytes differ), so a header seen before needs no JSON parsing and no
    signature check: its tensors are read straight out of the body."""


class ResponseHeaders(_Recent[Hashable, bytes]):
    """The JSON headers of one model's all-binary answers, by their outputs' names, types and shapes: the
    same few for every answer (only the tensor bytes differ), encoded once."""


def prepare(
    model: LoadedModel,
    body: bytes,
    header_length: int | None,
    batched: bool,
    encoding: str = "identity",
    max_bytes: int = 64 << 20,
    layouts: Layouts | None = None,
) -> Prepared:
    """Decode a request body (after its Content-Encoding) and check it against the model's signature; `batched`
    says whether the model's requests may share runtime calls, and so whether the request gets a batch key.
    With `layouts`, a binary request whose header was seen before is read without parsing it again.

    Raises:
        BadRequest: the body is malformed or does not fit the model.
    """
    body = decompress(body, encoding, max_bytes)
    header = body[:header_length] if layouts is not None and header_length is not None else None
    if header is not None and layouts is not None:
        layout = layouts.get(header)
        if layout is not None and len(body) - len(header) == layout.size:
            offset = len(header)
            feeds = {}
            for name, dtype, shape, size in layout.inputs:
                feeds[name] = np.frombuffer(body, dtype, size // dtype.itemsize, offset).reshape(shape)
                offset += size
            return Prepared(feeds, layout.outputs, layout.request_id, layout.rows, layout.key)
    decoded = decode_request(body, header_length)
    prepared = prepare_decoded(model, decoded, batched)
    feeds, wanted, rows, key = prepared.feeds, prepared.outputs, prepared.rows, prepared.key
    if header is not None and layouts is not None:
        tensors = [(t.name, t.array) for t in decoded.inputs]
        binary = len(body) - len(header)
        # only requests whose every tensor is in the binary region, in fixed-size types, have a layout
        if all(array.dtype.kind not in "OSU" for _, array in tensors) and sum(a.nbytes for _, a in tensors) == binary:
            inputs = tuple((name, array.dtype, tuple(array.shape), array.nbytes) for name, array in tensors)
            layouts.put(bytes(header), _Layout(inputs, binary, wanted, decoded.id, rows, key))
    return prepared


def prepare_decoded(
    model: LoadedModel, decoded: InferRequest, batched: bool, encode: Encoder | None = None
) -> Prepared:
    """Check a decoded request (from REST or gRPC) against the model's signature; `batched` says whether it gets
    a batch key (requests of equal keys, whatever their protocol, may share a runtime call), `encode` how its
    answer is written.

    Raises:
        BadRequest: the request does not fit the model.
    """
    manifest = model.manifest
    feeds = check_inputs(decoded, manifest.inputs, model.name)
    wanted = tuple(check_outputs(decoded, manifest.outputs, model.name))
    rows = _batch_size(model, feeds)
    key: Hashable | None = None
    if batched and all(array.ndim >= 1 and array.shape[0] == rows for array in feeds.values()):
        shapes = tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(feeds.items()))
        key = (shapes, tuple(name for name, _ in wanted))
    return Prepared(feeds=feeds, outputs=wanted, request_id=decoded.id, rows=rows, key=key, encode=encode)


def run_batch(
    model: LoadedModel,
    items: list[Prepared],
    drift: DriftTap | None = None,
    headers: ResponseHeaders | None = None,
) -> BatchRun:
    """Run queued requests of one key in one runtime call (one request: as is) and encode each answer. With
    `headers` (the model's), all-binary answers reuse the JSON header an earlier answer of their shape had.

    Errors are returned per request, never raised: a bad row reruns the batch one request at a time. The drift
    values of the rows answered go to `drift`.
    """
    headers = ResponseHeaders() if headers is None else headers
    started = time.perf_counter_ns()
    queue_ns = [started - item.enqueued_ns for item in items]
    executions = 1
    try:
        results = _run_together(model, items, drift, queue_ns, headers)
    except BadRequest as exc:
        if len(items) == 1:
            results = [exc]
        else:
            results = []
            for item, waited in zip(items, queue_ns, strict=True):
                executions += 1
                try:
                    results.extend(_run_together(model, [item], drift, [waited], headers))
                except InferenceError as single:
                    results.append(single)
    except InferenceError as exc:
        results = [exc] * len(items)
    rows = sum(item.rows for item in items)
    done = [result for result in results if isinstance(result, InferResult)]
    model_ns = sum(result.model_ns for result in done)
    compute_ns = max((result.compute_ns for result in done), default=0)
    return BatchRun(results, rows, executions, time.perf_counter_ns() - started, model_ns, compute_ns)


def _encode(
    model: LoadedModel, item: Prepared, outputs: dict[str, Array], headers: ResponseHeaders | None
) -> tuple[bytes, int | None]:
    """A request's response body. All-binary answers of one shape share their JSON header (it holds only
    names, types, shapes and sizes), so it is encoded once per model and shape and the tensors' bytes are
    joined after it."""
    arrays = [(name, outputs[name]) for name, _ in item.outputs]
    cacheable = headers is not None and item.request_id is None
    if cacheable:
        for (_, binary), (_, array) in zip(item.outputs, arrays, strict=True):
            if not binary or array.dtype.kind in "OSU":
                cacheable = False
                break
    if not cacheable or headers is None:
        return encode_response(
            model.name, model.version, item.request_id, ((n, outputs[n], b) for n, b in item.outputs)
        )
    key = tuple([(name, array.dtype, array.shape) for name, array in arrays])
    header = headers.get(key)
    if header is None:
        body, header_length = encode_response(model.name, model.version, None, ((n, a, True) for n, a in arrays))
        assert header_length is not None
        headers.put(key, body[:header_length])
        return body, header_length
    parts: list[Any] = [header]
    for _, array in arrays:
        if array.flags.c_contiguous and (array.dtype.byteorder == "<" or (array.dtype.isnative and _LITTLE)):
            parts.append(array.data)  # the row slice of a batch's output, as it lies: no copy
        else:
            parts.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8))
    return b"".join(parts), len(header)


def _run_together(
    model: LoadedModel,
    items: list[Prepared],
    drift: DriftTap | None,
    queue_ns: list[int],
    headers: ResponseHeaders,
) -> list[InferResult | Exception]:
    """One runtime call for `items`, split back into their answers; their drift to `drift` once every answer is
    encoded.

    Raises:
        BadRequest: the runtime rejected the input.
        InferenceError: the outputs break the model's signature, or do not split back by rows.
    """
    names = [name for name, _ in items[0].outputs]
    if len(items) == 1:
        feeds = items[0].feeds
    else:
        feeds = {name: np.concatenate([item.feeds[name] for item in items]) for name in items[0].feeds}
    compute_start = time.perf_counter_ns()
    cpu_start = time.thread_time_ns()
    results = model.runtime.run(feeds, names)
    compute_ns = time.perf_counter_ns() - compute_start
    cost_ns = time.thread_time_ns() - cpu_start if model.manifest.runtime == "onnxruntime" else compute_ns
    check_results(model, results)
    total = sum(item.rows for item in items)
    if len(items) > 1 and any(array.ndim == 0 or array.shape[0] != total for array in results.values()):
        raise InferenceError(f"model {model.name} returned outputs that do not have one row per input row")
    out: list[InferResult | Exception] = []
    if len(items) == 1:
        mines = [results]
    else:
        mines, offset = [], 0
        for item in items:
            mines.append({name: array[offset : offset + item.rows] for name, array in results.items()})
            offset += item.rows
    for item, mine, waited in zip(items, mines, queue_ns, strict=True):
        if item.encode is None:
            body, header_length = _encode(model, item, mine, headers)
        else:
            body, header_length = item.encode(model, item, mine)
        out.append(
            InferResult(
                body=body,
                header_length=header_length,
                batch=item.rows,
                queue_ns=waited,
                compute_ns=compute_ns,
                model_ns=cost_ns * item.rows // max(total, 1),
                summarize=functools.partial(_summary, model, item.feeds),
            )
        )
    if drift is not None and drift.references:
        _drift(items, feeds, results, mines, drift)
    return out


def _drift(
    items: list[Prepared],
    feeds: dict[str, Array],
    results: dict[str, Array],
    mines: list[dict[str, Array]],
    tap: DriftTap,
) -> None:
    """Hand the batch's drift to `tap`, for the tensors the batch has: what its requests count each alone
    (`bin_counts`, which strides a request's values past DRIFT_MAX_ELEMENTS), summed. Requests of one batch share
    their inputs' names and their outputs (their batch key), so a reference's tensor is in every request of the
    batch or in none. Where no request's part is strided (one request, or few values), the batch's tensor goes to
    the tap whole, to be counted with other batches'; else each request's part is counted now."""
    values: list[tuple[int, Array]] = []
    counted: DriftCounts = []
    for index, ref in enumerate(tap.references):
        whole = (feeds if ref.kind == "input" else results).get(ref.tensor)
        if whole is None:
            continue
        if len(items) == 1 or whole.size <= DRIFT_MAX_ELEMENTS:
            values.append((index, whole))
            continue
        pairs = zip(items, mines, strict=True)
        sizes = [(item.feeds if ref.kind == "input" else mine)[ref.tensor].size for item, mine in pairs]
        counted.append((ref.tensor, bin_counts_summed(ref, whole, sizes)))
    tap.add(values, counted)


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


def check_results(model: LoadedModel, results: dict[str, Array]) -> None:
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


# --- the driver ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Running:
    started_ns: int
    rows: int


class ModelScheduler:
    """One served model's bounded queue and batcher, on the event loop (not thread-safe: loop only).

    `submit` admits or sheds a request at once and returns a future of its answer. Batches run on `executor`
    (None: the loop's default pool), at most `config.instances` at a time; when a batch ends the next is planned
    at once, so requests that arrived meanwhile form the next batch. A batch's answers go to `served` together
    (their metrics and telemetry: it resolves their futures; by default at once), its errors to their futures at
    once.
    """

    def __init__(
        self,
        model: LoadedModel,
        config: BatchingConfig,
        metrics: InferenceMetrics,
        executor: Executor | None = None,
        drift: DriftTap | None = None,
        served: Served | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self._metrics = metrics
        self._executor = executor
        self._drift = drift
        self._served = served or _answer
        self.layouts = Layouts()
        self._headers = ResponseHeaders()
        self._queue: list[Prepared] = []
        self._queued_rows = 0
        self._running: list[_Running] = []
        self._rows_per_s: float | None = None
        # what the model cost per row lately, and in the last batch, in CPU time of its runtime calls: the part of
        # a job that runs without the GIL, so the part that running on the loop takes from the loop (the rest of a
        # job holds the GIL wherever it runs). Only the CPU runtime's batches may run on the loop: an
        # accelerator's call waits for the device, and that wait is not CPU time; and only where rows say what a
        # batch costs (no other dynamic axis, no BYTES), so that a request cannot be much larger than those measured
        self._cpu_runtime = model.manifest.runtime == "onnxruntime" and cost_follows_rows(model.manifest.inputs)
        self._ns_per_row: float | None = None
        self._last_job_ns: int | None = None
        self._last_call_ns: int | None = None  # the wall time of the last batch's runtime call
        self._dispatch_pending = False
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def for_model(
        cls,
        model: LoadedModel,
        defaults: BatchingConfig,
        metrics: InferenceMetrics,
        executor: Executor | None = None,
        drift: DriftTap | None = None,
        served: Served | None = None,
    ) -> ModelScheduler:
        """A scheduler configured for `model` (see `batching.resolve_config`); a malformed batching policy in
        the package is logged and ignored, so the model still serves with the agent's settings."""
        manifest = model.manifest
        batchable = batchable_signature(manifest.inputs, manifest.outputs)
        independent = rows_independent(model.runtime)
        try:
            config = resolve_config(
                defaults, manifest.policy, signature_batchable=batchable, rows_independent=independent
            )
        except ConfigError as exc:
            log.warning("model %s %s: ignoring its batching policy: %s", model.name, model.version, exc)
            config = resolve_config(defaults, {}, signature_batchable=batchable, rows_independent=independent)
        if batchable and not independent and not config.batching:
            log.info(
                "model %s %s quantizes activations per batch, so batching would change answers: not batched",
                model.name,
                model.version,
            )
        return cls(model, config, metrics, executor, drift, served)

    @property
    def queued(self) -> int:
        """Requests waiting for a worker."""
        return len(self._queue)

    def load(self, now_ns: int) -> QueueLoad:
        """What admission sees now."""
        busy_remaining = 0.0
        if len(self._running) >= self.config.instances and self._rows_per_s:
            busy_remaining = min(
                max(0.0, run.rows / self._rows_per_s - (now_ns - run.started_ns) / 1e9) for run in self._running
            )
        return QueueLoad(len(self._queue), self._queued_rows, busy_remaining, self._rows_per_s)

    def submit(self, item: Prepared, now_ns: int) -> asyncio.Future[InferResult]:
        """Queue a prepared request; the future resolves with its answer or its error.

        Raises:
            Overloaded: the queue is full, or the wait it would face is over the configured bound.
        """
        shed = admit(self.load(now_ns), self.config)
        if shed is not None:
            raise Overloaded(f"model {self.model.name} is overloaded: {shed.reason}", shed.retry_after_s)
        loop = asyncio.get_running_loop()
        item.enqueued_ns = now_ns
        item.future = loop.create_future()
        self._queue.append(item)
        self._queued_rows += item.rows
        if len(self._running) < self.config.instances and not self._dispatch_pending:
            # once the requests that arrived in this turn of the loop are queued too: they may share the batch
            self._dispatch_pending = True
            loop.call_soon(self._dispatch)
        return item.future

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.perf_counter_ns()
        while len(self._running) < self.config.instances and self._queue:
            decision = plan_batch(self._queue, now, self.config)
            if decision is None:
                break
            if isinstance(decision, WaitUntil):
                delay = max(0.0, (decision.deadline_ns - now) / 1e9)
                self._timer = asyncio.get_running_loop().call_later(delay, self._dispatch)
                break
            positions = decision.positions
            if positions == tuple(range(len(positions))):
                batch = self._queue[: len(positions)]
                del self._queue[: len(positions)]
            else:
                chosen = set(positions)
                batch = [self._queue[p] for p in positions]
                self._queue = [item for p, item in enumerate(self._queue) if p not in chosen]
            self._queued_rows -= decision.rows
            self._start(batch, now)
            now = time.perf_counter_ns()  # a batch run inline took its time: the next one starts now, not then

    def _start(self, batch: list[Prepared], now_ns: int) -> None:
        run = _Running(now_ns, sum(item.rows for item in batch))
        if self._cpu_runtime and runs_inline(run.rows, self._ns_per_row, self._last_job_ns, self._last_call_ns):
            self._run_inline(batch, run)
            return
        loop = asyncio.get_running_loop()
        try:
            job = loop.run_in_executor(self._executor, run_batch, self.model, batch, self._drift, self._headers)
        except RuntimeError:  # the executor is shut down: the agent is stopping
            error = Unavailable("the node is shutting down and takes no more inference requests")
            for item in batch:
                _settle(item, error)
            return
        self._running.append(run)
        job.add_done_callback(functools.partial(self._finish, batch, run))

    def _run_inline(self, batch: list[Prepared], run: _Running) -> None:
        """Run a small model's batch right here on the loop (see `batching.runs_inline`): no worker hand-off,
        and its requests resume in this turn of the loop."""
        self._running.append(run)  # counted against the instances while it runs, as a worker's job is
        try:
            outcome = run_batch(self.model, batch, self._drift, self._headers)
        except Exception as exc:  # run_batch returns errors per request: this is a bug, as a failed job is
            self._running.remove(run)
            self._failed(batch, exc)
            return
        self._running.remove(run)
        self._done(batch, run, outcome)

    def _finish(self, batch: list[Prepared], run: _Running, job: asyncio.Future[BatchRun]) -> None:
        self._running.remove(run)
        if job.cancelled():
            error: Exception = Unavailable("the node is shutting down")
            for item in batch:
                _settle(item, error)
        elif (failure := job.exception()) is not None:
            self._failed(batch, failure)
        else:
            self._done(batch, run, job.result())
        self._dispatch()

    def _failed(self, batch: list[Prepared], failure: BaseException) -> None:
        log.error("batch of model %s failed unexpectedly", self.model.name, exc_info=failure)
        for item in batch:
            _settle(item, InferenceError(f"internal error running model {self.model.name}"))

    def _done(self, batch: list[Prepared], run: _Running, outcome: BatchRun) -> None:
        answered: list[Answered] = []
        for item, result in zip(batch, outcome.results, strict=True):
            if isinstance(result, Exception):
                _settle(item, result)
            elif item.future is not None and not item.future.done():  # else cancelled: nobody waits for it
                answered.append((item.future, item.started_ns, result))
        if answered:
            try:
                self._served(answered)
            except Exception as exc:  # a bug there must not leave its requests waiting for ever
                log.error("counting a batch of model %s failed", self.model.name, exc_info=exc)
                for future, _, _ in answered:
                    if not future.done():
                        future.set_exception(InferenceError(f"internal error answering model {self.model.name}"))
        self._metrics.record_execution(self.model.name, self.model.version, outcome.executions)
        # the instance was taken from dispatch until now (the job, plus handing it over and back): that,
        # not the job alone, is what a request queued behind it waits for
        occupied_ns = time.perf_counter_ns() - run.started_ns
        if occupied_ns > 0:
            self._rows_per_s = ewma(self._rows_per_s, outcome.rows / (occupied_ns / 1e9))
        if outcome.model_ns:  # 0: every request failed, the model's cost unknown
            self._ns_per_row = ewma(self._ns_per_row, outcome.model_ns / max(outcome.rows, 1))
            self._last_job_ns = outcome.model_ns
            self._last_call_ns = outcome.compute_ns


def _answer(answered: list[Answered]) -> None:
    """Resolve each future with its answer (a scheduler's `served` when nothing else counts them)."""
    for future, _, result in answered:
        future.set_result(result)


def _settle(item: Prepared, result: InferResult | Exception) -> None:
    future = item.future
    if future is None or future.done():  # the request was cancelled (its connection closed, the server stops)
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
