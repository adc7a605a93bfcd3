"""The node's Open Inference Protocol over gRPC: KServe v2 `inference.GRPCInferenceService`, beside the REST API.

`strata agent --grpc-port N` serves it; nothing imports this module (nor grpc) otherwise. RPCs: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (raw or typed input contents, raw output
contents), and Triton's ModelConfig, ModelStatistics and RepositoryIndex, so `tritonclient.grpc` works unchanged.
Every RPC is a thin translation onto the same `InferenceApp` the REST listener uses: the same models, queues,
dynamic batches (gRPC and REST requests of one shape share batches), admission control, metrics, telemetry and
serving token. Errors map to gRPC codes: a bad request is INVALID_ARGUMENT, an unknown model NOT_FOUND, a shed
request UNAVAILABLE (with `retry-after` in the trailing metadata), a missing token UNAUTHENTICATED, and a model
failure INTERNAL; ModelReady of a model not served answers `ready: false`, as tritonclient.http's `is_model_ready`
reads REST's 404. A status message is cut to a size every client reads (it quotes names a caller chose).

What a caller can hold: request messages of at most `--request-budget-mb` together (128 MiB by default, the
REST port's budget), plus what waits unread in the HTTP/2 window of each open RPC (64 KiB; about 100 KiB a call
with gRPC's own state), at most `--max-connections` RPCs open at once (RESOURCE_EXHAUSTED past it, from gRPC
itself), of which ModelInfer leaves a few to health and metadata calls (RESOURCE_EXHAUSTED past the rest, at
once: one channel may open them all, and a probe would find no slot). A message is at most
`--grpc-max-message-mb` (4 MiB by default, gRPC's own default; RESOURCE_EXHAUSTED past it, from gRPC itself, in
gRPC's words "larger than max (N vs. LIMIT)", before it is read). gRPC says a
message's size only once it has read it whole, so each RPC is charged the largest message to the budget before
its message is read, and its message's own size once read, until it is answered; an RPC that does not fit waits
for room. ModelInfer may use all of the budget but one message's worth, which health and metadata calls
(ServerLive, ServerReady, ModelReady, metadata: a few bytes each) keep for themselves, so a probe answers while
inferences fill the rest: by default 31 ModelInfer messages are read at once (128 MiB / 4 MiB, less one), and a
small one, once read, holds only its own bytes. Until it is read, an RPC's message waits in its stream's HTTP/2
window; gRPC's BDP probing, which grows that window (to 4-16 MiB on a quiet node) until whole messages wait
unread, uncharged, is off (a message being read gets a window of its size). An RPC's message must arrive within
`--body-timeout` of its start, its wait for the budget included (DEADLINE_EXCEEDED past it, as REST's 408), or a
few callers that open RPCs and never send their message would hold the budget for ever. Every handler reads its
message itself (as bytes, then parses it), so a message that is not the RPC's request is INVALID_ARGUMENT, never
gRPC's own UNKNOWN and a traceback.

Only on the serving port: the tiers reach each other over REST on the mutual-TLS tier port (`strata.route`
speaks REST), so there is no gRPC tier listener.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpc
import grpc.aio

from strata.agent.oip_grpc_codec import (
    decode_infer_request,
    encode_infer_response,
    from_json,
    message_class,
    parse_message,
)
from strata.agent.oip_server import InferenceApp
from strata.agent.repository import LoadedModel
from strata.agent.scheduler import INLINE_DECODE_BYTES, ModelScheduler, Overloaded, Prepared, prepare_decoded
from strata.core.errors import AuthError, BadRequest, ConfigError, NotFound, StrataError
from strata.core.oip import Array
from strata.core.words import clip

log = logging.getLogger(__name__)

SERVICE: Final = "inference.GRPCInferenceService"
EXTENSIONS: Final = ("model_configuration", "statistics")

# gRPC status for each HTTP status a strata error carries
_CODES: Final = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}

Context = Any  # grpc.aio.ServicerContext (grpcio has no type hints)
Behaviour = Callable[[Any, Context], Awaitable[Any]]


def status_code(error: StrataError) -> grpc.StatusCode:
    """The gRPC status code of a strata error (INTERNAL for anything that is not the caller's doing)."""
    return _CODES.get(error.http_status, grpc.StatusCode.INTERNAL)


# Until its handler reads it, a call's message waits in its HTTP/2 stream window: this one (HTTP/2's default), with
# BDP probing off, which would otherwise grow it (to 4-16 MiB on a quiet node) until whole messages wait unread:
# 16 calls waiting with 4 MiB messages cost the agent 66 MB with it, 2 MB without (the caller test measures it).
STREAM_WINDOW_BYTES: Final = 64 * 1024

# The RPC slots (of `max_concurrent_rpcs`) ModelInfer leaves to health and metadata calls, as it leaves them a
# message's worth of the budget; at most half of them.
OTHER_RPC_SLOTS: Final = 4

# What a ModelInferRequest's bytes other than its raw tensors may become once parsed, at most (measured: 2 million
# empty inputs in 4 MiB, 42x; one-byte varints in typed contents, 20x): charged to the decode budget while it parses
PARSE_EXPANSION: Final = 48
SCAN_FIELDS: Final = 4096  # top-level fields read for `parse_cost` (a request has a few per tensor)


def inference_slots(max_concurrent_rpcs: int) -> int:
    """How many ModelInfer RPCs may be open at once: all but `OTHER_RPC_SLOTS`, or half when that is fewer."""
    return max_concurrent_rpcs - min(OTHER_RPC_SLOTS, max_concurrent_rpcs // 2)


class MessageBudget:
    """The request-message bytes a listener's RPCs may hold at once: each is charged before its message is read
    (gRPC says no message's size before reading it whole) and releases what it was charged when answered.
    Inference may use all but `reserve_bytes`, which health and metadata calls keep for themselves. Waiters are
    woken on each release and check again; one that may use the reserve never waits behind one that may not.
    Event-loop state only (no locks): charge and release from the loop.
    """

    def __init__(self, total_bytes: int, reserve_bytes: int) -> None:
        if not 0 <= reserve_bytes < total_bytes:
            raise ValueError(f"a reserve of {reserve_bytes} bytes does not leave room in {total_bytes}")
        self.total_bytes = total_bytes
        self.reserve_bytes = reserve_bytes
        self._used = 0
        self._released = asyncio.Event()

    @property
    def used_bytes(self) -> int:
        """Bytes charged now."""
        return self._used

    def fits(self, size: int, *, reserved: bool) -> bool:
        """Whether `size` bytes more fit now, in the whole budget (`reserved`) or all of it but the reserve."""
        room = self.total_bytes - (0 if reserved else self.reserve_bytes)
        return self._used + size <= room

    async def charge(self, size: int, *, reserved: bool) -> None:
        """Charge `size` bytes once they fit (see `fits`). Cancelled while waiting, it has charged nothing."""
        while not self.fits(size, reserved=reserved):
            await self._released.wait()
        self._used += size

    def release(self, size: int) -> None:
        """Give back `size` charged bytes and wake the waiters."""
        if size <= 0:
            return
        self._used -= size
        released, self._released = self._released, asyncio.Event()
        released.set()


class GrpcInferenceServer:
    """`GRPCInferenceService` over an `InferenceApp`, on a grpc.aio server in the running event loop, with the
    limits of REST's listener (`strata.agent.httpd.ServerLimits`): at most `max_connections` connections, each
    given `handshake_timeout_s` to begin HTTP/2 and closed after `idle_timeout_s` with no RPC; every RPC's message
    at most `max_message_bytes`, arriving within `message_timeout_s`, and read only once `max_message_bytes` are
    charged to a budget of `message_budget_bytes` (ModelInfer leaves one message's worth of it to the other RPCs);
    at most `max_concurrent_rpcs` at once, ModelInfer all of them but `OTHER_RPC_SLOTS` (`inference_slots`).

    Usage: `await server.start(address)` (`host:port`, `[v6]:port`), read `server.port`, `await server.stop()`.

    Raises:
        ValueError: the budget does not hold two messages.
    """

    def __init__(
        self,
        app: InferenceApp,
        *,
        max_message_bytes: int,
        message_budget_bytes: int,
        max_concurrent_rpcs: int = 1024,
        max_connections: int = 1024,
        handshake_timeout_s: float = 10.0,
        idle_timeout_s: float = 5.0,
        message_timeout_s: float = 60.0,
    ) -> None:
        self._app = app
        if message_budget_bytes < 2 * max_message_bytes:
            raise ValueError("the message budget must hold two messages: one for inference, one kept for the rest")
        self._max_message_bytes = max_message_bytes
        self._budget = MessageBudget(message_budget_bytes, max_message_bytes)
        self._max_concurrent_rpcs = max_concurrent_rpcs
        self._inference_slots = inference_slots(max_concurrent_rpcs)
        self._inferences = 0  # ModelInfer RPCs open now (event-loop state, as the budget)
        self._max_connections = max_connections
        self._handshake_timeout_s = handshake_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._message_timeout_s = message_timeout_s
        self._server: grpc.aio.Server | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port bound (the one the OS chose for port 0).

        Raises:
            RuntimeError: the server is not started.
        """
        if self._port is None:
            raise RuntimeError("the gRPC server is not started")
        return self._port

    def _handlers(self) -> grpc.GenericRpcHandler:
        """One handler per RPC. Each is request-streaming on this side (a unary call is the same on the wire), so
        that it reads its message itself: within a deadline, and as bytes it parses, so that a message that is
        not the request is the caller's mistake. ModelInfer takes and returns bytes, so that decoding a large
        request and encoding its answer happen off the event loop (its answer is encoded on the batch's worker)."""

        def unary(name: str, behaviour: Behaviour, *, raw: bool = False, open_: bool = False) -> grpc.RpcMethodHandler:
            response = message_class(f"{name}Response")
            return grpc.stream_unary_rpc_method_handler(
                functools.partial(self._call, behaviour, name, open_, raw),
                request_deserializer=None,
                response_serializer=None if raw else response.SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ServerLive": unary("ServerLive", self._server_live, open_=True),
                "ServerReady": unary("ServerReady", self._server_ready),
                "ModelReady": unary("ModelReady", self._model_ready),
                "ServerMetadata": unary("ServerMetadata", self._server_metadata),
                "ModelMetadata": unary("ModelMetadata", self._model_metadata),
                "ModelInfer": unary("ModelInfer", self._model_infer, raw=True),
                "ModelConfig": unary("ModelConfig", self._model_config),
                "ModelStatistics": unary("ModelStatistics", self._model_statistics),
                "RepositoryIndex": unary("RepositoryIndex", self._repository_index),
            },
        )

    async def start(self, address: str) -> None:
        """Bind `address` and start serving; returns once listening.

        Raises:
            ConfigError: the address cannot be bound.
            RuntimeError: the server is already started.
        """
        if self._server is not None:
            raise RuntimeError("the gRPC server is already started")
        options = [
            ("grpc.max_receive_message_length", self._max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
            # what REST's listener bounds too: connections open at once, the time a new one has to say HTTP/2,
            # and how long one with no RPC in flight stays (a client reconnects at its next call, unseen)
            ("grpc.max_allowed_incoming_connections", self._max_connections),
            ("grpc.server_handshake_timeout_ms", _ms(self._handshake_timeout_s)),
            ("grpc.max_connection_idle_ms", _ms(self._idle_timeout_s)),
            # gRPC sets SO_REUSEPORT by default: a second agent on the same port would share it instead of failing
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(
            handlers=[self._handlers()],
            options=options,
            maximum_concurrent_rpcs=self._max_concurrent_rpcs,
        )
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen for gRPC on {address}: {exc}") from exc
        if port == 0:  # older grpcio reports a failed bind this way
            raise ConfigError(f"cannot listen for gRPC on {address}")
        await server.start()
        self._server, self._port = server, port

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting RPCs, let those in flight finish for up to `grace` seconds. Safe when not started."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)

    async def _call(
        self, behaviour: Behaviour, name: str, open_: bool, raw: bool, _requests: Any, context: Context
    ) -> Any:
        """Run one RPC: the serving token first (unless `open_`; from the call's headers, so that a caller without
        it never makes the node read or charge its message), then its message (the bytes when `raw`, else
        parsed as `<name>Request`, charged to the budget until answered), then strata errors as gRPC statuses.

        Raises:
            grpc.aio.AbortError: always when it fails (`context.abort`), with the status and message.
        """
        inference = False  # whether this call holds one of the inference slots
        held = _Held()
        try:
            if self._app.needs_token and not open_:
                metadata = dict(context.invocation_metadata() or ())
                authorization = metadata.get("authorization", "")
                self._app.authenticate(authorization if isinstance(authorization, str) else "")
            if name == "ModelInfer":
                if self._inferences >= self._inference_slots:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the node has {self._inferences} inference RPCs open, all it takes at once"
                        f" (--max-connections, less {self._max_concurrent_rpcs - self._inference_slots} kept for"
                        " health and metadata calls); retry later",
                    )
                self._inferences += 1
                inference = True
            if open_:  # its answer says nothing of its message: read none, so a caller without the token (which
                return await behaviour(None, context)  # it needs none) cannot hold budget or a slot with a stall
            data = await self._receive(name, context, held)
            self._budget.release(held.bytes - len(data))
            held.bytes = len(data)
            return await behaviour(data if raw else parse_message(f"{name}Request", data), context)
        except StrataError as exc:
            failure = _failure(name, exc)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error serving gRPC %s", name)
            failure = (grpc.StatusCode.INTERNAL, "internal error", ())
        finally:
            self._budget.release(held.bytes)
            if inference:
                self._inferences -= 1
        # Aborted out here, not in the except block: there the abort's exception would hold the error, whose
        # traceback holds the frames that read and parsed the message, in a cycle only a full garbage collection
        # frees (4 KiB of gzip parsed to 170 MB stayed, call after call: a few calls took a node to gigabytes)
        await context.abort(*failure)
        raise AssertionError("context.abort returned")  # it always raises

    async def _receive(self, name: str, context: Context, held: _Held) -> bytes:
        """The RPC's one message, read once the largest message is charged to the budget (`held` says what is),
        all within the message timeout of the call's start.

        Raises:
            BadRequest: the caller closed its side without a message.
            grpc.aio.AbortError: the budget had no room or the message did not arrive in time (DEADLINE_EXCEEDED).
        """
        try:
            async with asyncio.timeout(self._message_timeout_s):
                await self._budget.charge(self._max_message_bytes, reserved=name != "ModelInfer")
                held.bytes = self._max_message_bytes
                data = await context.read()
        except TimeoutError:
            if not held.bytes:
                log.info("gRPC %s: no room in the request budget within %g s", name, self._message_timeout_s)
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the node held its whole request budget (--request-budget-mb) for {self._message_timeout_s:g} s"
                    " before this call's message could be read; retry later",
                )
            log.info("gRPC %s: no request message within %g s; call cancelled", name, self._message_timeout_s)
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request message took longer than {self._message_timeout_s:g} s to arrive",
            )
        if data is grpc.aio.EOF:
            raise BadRequest(f"the call ended without its inference.{name}Request message")
        if not isinstance(data, bytes):
            raise AssertionError(f"a gRPC handler without a deserializer read a {type(data).__name__}")
        return data

    # --- health and metadata ----------------------------------------------------------------------------

    async def _server_live(self, _request: Any, _context: Context) -> Any:
        return message_class("ServerLiveResponse")(live=True)

    async def _server_ready(self, _request: Any, _context: Context) -> Any:
        return message_class("ServerReadyResponse")(ready=self._app.is_ready())

    async def _model_ready(self, request: Any, _context: Context) -> Any:
        try:
            self._app.model(request.name, request.version or None)
        except NotFound:
            return message_class("ModelReadyResponse")(ready=False)
        return message_class("ModelReadyResponse")(ready=True)

    async def _server_metadata(self, _request: Any, _context: Context) -> Any:
        return from_json("ServerMetadataResponse", self._app.server_metadata(EXTENSIONS))

    async def _model_metadata(self, request: Any, _context: Context) -> Any:
        model = self._app.model(request.name, request.version or None)
        return from_json("ModelMetadataResponse", self._app.model_metadata(model))

    async def _model_config(self, request: Any, _context: Context) -> Any:
        model = self._app.model(request.name, request.version or None)
        return from_json("ModelConfigResponse", {"config": self._app.model_config(model)})

    async def _model_statistics(self, request: Any, _context: Context) -> Any:
        stats = self._app.model_statistics(request.name or None, request.version or None)
        return from_json("ModelStatisticsResponse", stats)

    async def _repository_index(self, request: Any, _context: Context) -> Any:
        return from_json("RepositoryIndexResponse", {"models": self._app.repository_index(request.ready)})

    # --- inference --------------------------------------------------------------------------------------

    async def _model_infer(self, data: bytes, _context: Context) -> bytes:
        """Parse (off the loop when large), find the model, and serve it through `InferenceApp.infer`; the
        answer is the serialized `ModelInferResponse` its batch's worker encoded.

        Raises:
            BadRequest: the bytes are not a ModelInferRequest, or it does not fit the model.
            NotFound: the model (or version) is not served here.
        """
        inline = len(data) <= INLINE_DECODE_BYTES
        parse = functools.partial(_parse_infer_request, data)
        with self._app.parsing(parse_cost(data)):
            message = parse() if inline else await self._app.off_loop(parse)
        model = self._app.model(message.model_name, message.model_version or None)

        def decode(scheduler: ModelScheduler) -> Prepared:
            return prepare_decoded(model, decode_infer_request(message), scheduler.config.batching, _encode_answer)

        result = await self._app.infer(model, decode, size=len(data), inline=inline)
        return result.body


class _Held:
    """What one RPC has charged to the message budget (zero until its turn comes)."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _parse_infer_request(data: bytes) -> Any:
    return parse_message("ModelInferRequest", data)


def _failure(name: str, exc: StrataError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status, message and trailing metadata a strata error ends an RPC with."""
    code = status_code(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("gRPC %s failed: %s", name, exc)
    trailing: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, Overloaded):
        trailing = (("retry-after", str(exc.retry_after_s)),)
    elif isinstance(exc, AuthError):
        trailing = (("www-authenticate", 'Bearer realm="strata"'),)
    return code, clip(exc.message), trailing


def parse_cost(data: bytes) -> int:
    """What parsing `data` as a ModelInferRequest may allocate, charged to the decode budget while it runs:
    its `raw_input_contents` (field 7) become bytes objects of their own size; any other byte may become
    PARSE_EXPANSION (a small message, an element of a repeated field: 2 million empty inputs in 4 MiB parsed to
    170 MB). Read from the message's top-level fields, the first SCAN_FIELDS of them (past those, or where the
    wire format is broken, every byte counts as expanding; the parse refuses a broken one)."""
    raw = position = 0
    try:
        for _ in range(SCAN_FIELDS):
            if position >= len(data):
                break
            key, position = _varint(data, position)
            wire = key & 7
            if wire == 2:
                length, position = _varint(data, position)
                if key >> 3 == 7:
                    raw += length
                position += length
            elif wire == 0:
                _, position = _varint(data, position)
            elif wire in (1, 5):
                position += 8 if wire == 1 else 4
            else:
                raise ValueError(f"wire type {wire}")
    except (IndexError, ValueError):
        raw = 0
    if position > len(data):  # a length past the end: the raw tensors it claims are not there
        raw = 0
    return raw + (len(data) - raw) * PARSE_EXPANSION


def _varint(data: bytes, position: int) -> tuple[int, int]:
    """The protobuf varint at `position` and the position after it.

    Raises:
        IndexError: the data ends inside it.
        ValueError: it is longer than ten bytes.
    """
    value = shift = 0
    for _ in range(10):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise ValueError("varint longer than ten bytes")


def _encode_answer(model: LoadedModel, item: Prepared, outputs: dict[str, Array]) -> tuple[bytes, int | None]:
    """A request's answer as a serialized ModelInferResponse (run on the batch's worker)."""
    chosen = ((name, outputs[name]) for name, _ in item.outputs)
    return encode_infer_response(model.name, model.version, item.request_id, chosen), None
