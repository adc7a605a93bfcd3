"""The node's inference server end to end: the real HTTP server on loopback, real models, real HTTP clients.

The server runs on its own event loop in a thread, as in the agent. Models are a real digits classifier
(trained once per session) and a small ONNX lookup model built here (two inputs; onnxruntime rejects indices
out of its table). Predictions are compared with an in-process onnxruntime run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from strata.agent.httpd import HttpServer, Request, Response, ServerLimits
from strata.agent.metrics import InferenceMetrics
from strata.agent.oip_server import InferenceApp
from strata.agent.repository import LoadedModel, ModelRepository
from strata.agent.runtime import Runtime, load_and_check
from strata.core.oip import decode_response, encode_request
from strata.core.package import Package, TensorSpec
from strata.examples.digits import load_data, train_digits
from strata.package_build import build_package

pytestmark = pytest.mark.slow

T = TypeVar("T")
Array = npt.NDArray[Any]


# --- models --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits_package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    work = tmp_path_factory.mktemp("digits")
    train_digits(work / "digits.onnx", max_iter=100)
    return build_package(
        work / "digits.onnx", work / "package", name="digits", version="1", sample={"X": load_data().test_x[:4]}
    )


@pytest.fixture(scope="session")
def lookup_package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    """`vectors = table[ids] * scale` with a 10x4 table: two inputs, and out-of-range ids fail in onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper

    work = tmp_path_factory.mktemp("lookup")
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
            helper.make_node("Mul", ["rows", "scale"], ["vectors"]),
        ],
        "lookup",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["n", 4])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (work / "lookup.onnx").write_bytes(model.SerializeToString())
    sample = {"ids": np.array([0, 9, 3], dtype=np.int64), "scale": np.array([0.5], dtype=np.float32)}
    return build_package(work / "lookup.onnx", work / "package", name="lookup", version="3", sample=sample)


@pytest.fixture(scope="session")
def digits_runtime(digits_package: Package) -> Runtime:
    return load_and_check(digits_package)


@pytest.fixture(scope="session")
def lookup_runtime(lookup_package: Package) -> Runtime:
    return load_and_check(lookup_package)


@pytest.fixture(scope="session")
def digits_reference(digits_package: Package) -> Callable[[Array], dict[str, Array]]:
    """The digits model run directly by onnxruntime, in process: what the server must answer."""
    import onnxruntime as ort

    session = ort.InferenceSession(digits_package.model_path.read_bytes(), providers=["CPUExecutionProvider"])

    def run(x: Array) -> dict[str, Array]:
        label, probabilities = session.run(["label", "probabilities"], {"X": x})
        return {"label": label, "probabilities": probabilities}

    return run


def loaded(package: Package, runtime: Runtime, **manifest_changes: Any) -> LoadedModel:
    manifest = dataclasses.replace(package.manifest, **manifest_changes)
    return LoadedModel(manifest=manifest, digest=package.digest, runtime=runtime, activated_at=time.time())


class GatedRuntime:
    """The real digits runtime, held at a gate inside `run` until the test opens it (a long inference)."""

    def __init__(self, inner: Runtime) -> None:
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self._inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()

    def run(self, feeds: Mapping[str, Array], output_names: Sequence[str] | None = None) -> dict[str, Array]:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self._inner.run(feeds, output_names)


# --- the server ------------------------------------------------------------------------------------------


class LoopThread:
    """An asyncio event loop running in its own thread, as the agent runs its inference server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclasses.dataclass
class RunningServer:
    server: HttpServer
    metrics: InferenceMetrics
    repository: ModelRepository

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


StartHttp = Callable[..., HttpServer]
ServeModels = Callable[..., RunningServer]


@pytest.fixture(scope="module")
def server_loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def start_http_server(server_loop: LoopThread) -> Iterator[StartHttp]:
    """Start an HttpServer for a handler on a free loopback port; every one is stopped after the module."""
    started: list[HttpServer] = []

    def start(handler: Callable[[Request], Any] | HttpServer, limits: ServerLimits | None = None) -> HttpServer:
        server = handler if isinstance(handler, HttpServer) else HttpServer(handler, limits)
        server_loop.run(server.start("127.0.0.1", 0))
        started.append(server)
        return server

    yield start
    for server in started:
        server_loop.run(server.stop(grace=1.0))


@pytest.fixture(scope="module")
def serve_models(start_http_server: StartHttp) -> ServeModels:
    """Serve some LoadedModels with a fresh InferenceApp; keyword arguments go to the app."""

    def serve(*models: LoadedModel, limits: ServerLimits | None = None, **app_options: Any) -> RunningServer:
        repository = ModelRepository()
        for model in models:
            repository.put(model)
        metrics = InferenceMetrics()
        app = InferenceApp(repository, metrics, **app_options)
        return RunningServer(start_http_server(app.http_server(limits)), metrics, repository)  # as the agent

    return serve


@pytest.fixture(scope="module")
def oip_server(
    serve_models: ServeModels,
    digits_package: Package,
    digits_runtime: Runtime,
    lookup_package: Package,
    lookup_runtime: Runtime,
) -> RunningServer:
    return serve_models(loaded(digits_package, digits_runtime), loaded(lookup_package, lookup_runtime))


@pytest.fixture(scope="module")
def oip_client(oip_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=oip_server.url, timeout=30) as client:
        yield client


def digits_x(rows: int, offset: int = 0) -> Array:
    return load_data().test_x[offset : offset + rows]


def json_request(x: Array, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "X", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}], **extra}


def binary_post(client: httpx.Client, path: str, inputs: Mapping[str, Array], **options: Any) -> httpx.Response:
    body, header_length = encode_request(inputs, **options)
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    return client.post(path, content=body, headers=headers)


def decoded(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Array]]:
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    return decode_response(response.content, None if length is None else int(length))


def assert_error(response: httpx.Response, status: int, needle: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"]
    assert needle in body["error"], body["error"]


def assert_predictions(outputs: Mapping[str, Array], expected: Mapping[str, Array]) -> None:
    assert outputs["label"].tolist() == expected["label"].tolist()
    np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-5, atol=1e-7)


# --- health, metadata, inference -------------------------------------------------------------------------


def test_health_and_metadata(oip_client: httpx.Client) -> None:
    assert oip_client.get("/v2/health/live").status_code == 200
    assert oip_client.get("/v2/health/ready").json() == {"ready": True}
    assert oip_client.get("/v2").json() == {"name": "strata", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    metadata = oip_client.get("/v2/models/digits").json()
    assert metadata == {
        "name": "digits",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        ],
    }
    assert oip_client.get("/v2/models/digits/versions/1").json() == metadata
    assert oip_client.get("/v2/models/lookup/ready").json() == {"name": "lookup", "version": "3", "ready": True}
    assert oip_client.get("/v2/models/lookup/versions/3/ready").status_code == 200


def test_json_inference_matches_onnxruntime(
    oip_client: httpx.Client, digits_reference: Callable[[Array], dict[str, Array]]
) -> None:
    x = digits_x(16)
    response = oip_client.post("/v2/models/digits/infer", json=json_request(x, id="req-7"))

    assert response.headers["content-type"] == "application/json"
    header, outputs = decoded(response)
    assert (header["model_name"], header["model_version"], header["id"]) == ("digits", "1", "req-7")
    assert_predictions(outputs, digits_reference(x))


def test_binary_inference_matches_onnxruntime(
    oip_client: httpx.Client, digits_reference: Callable[[Array], dict[str, Array]]
) -> None:
    x = digits_x(32, offset=16)
    response = binary_post(oip_client, "/v2/models/digits/versions/1/infer", {"X": x})

    assert response.headers["content-type"] == "application/octet-stream"
    header, outputs = decoded(response)
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [32 * 8, 32 * 10 * 4]
    assert_predictions(outputs, digits_reference(x))


def test_an_empty_outputs_list_asks_for_every_output(
    oip_client: httpx.Client, digits_reference: Callable[[Array], dict[str, Array]]
) -> None:
    """`"outputs": []` was a 500 counted against the model (three of them failed a new version's probation and
    rolled it back): it asks for every output, as over gRPC."""
    x = digits_x(4)
    for _ in range(3):
        response = oip_client.post("/v2/models/digits/infer", json=json_request(x, outputs=[]))
        assert response.status_code == 200, response.text
        header, outputs = decoded(response)
        assert [o["name"] for o in header["outputs"]] == ["label", "probabilities"]
        assert_predictions(outputs, digits_reference(x))


def test_one_output_chosen_as_json_from_binary_inputs(oip_client: httpx.Client) -> None:
    response = binary_post(
        oip_client, "/v2/models/digits/infer", {"X": digits_x(3)}, outputs=["label"], binary_output=False
    )
    header, outputs = decoded(response)
    assert [o["name"] for o in header["outputs"]] == ["label"]
    assert "data" in header["outputs"][0]
    assert outputs["label"].shape == (3,)


def test_large_binary_batch(oip_client: httpx.Client, digits_reference: Callable[[Array], dict[str, Array]]) -> None:
    x = np.random.default_rng(1).random((20_000, 64), dtype=np.float32)  # a 5 MB body, read in many pieces
    _, outputs = decoded(binary_post(oip_client, "/v2/models/digits/infer", {"X": x}))
    assert_predictions(outputs, digits_reference(x))


def test_lookup_model_with_two_inputs(oip_client: httpx.Client) -> None:
    inputs = {"ids": np.array([2, 0], dtype=np.int64), "scale": np.array([2.0], dtype=np.float32)}
    _, outputs = decoded(binary_post(oip_client, "/v2/models/lookup/infer", inputs))
    assert outputs["vectors"].tolist() == [[16.0, 18.0, 20.0, 22.0], [0.0, 2.0, 4.0, 6.0]]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_tritonclient_works_unchanged(
    oip_server: RunningServer,
    digits_reference: Callable[[Array], dict[str, Array]],
    binary: bool,
    compression: str | None,
) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{oip_server.port}")
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("digits")
        assert client.get_model_metadata("digits")["inputs"][0]["shape"] == [-1, 64]
        x = digits_x(8, offset=100)
        infer_input = triton.InferInput("X", list(x.shape), "FP32")
        infer_input.set_data_from_numpy(x, binary_data=binary)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("label", "probabilities")]
        result = client.infer("digits", [infer_input], outputs=outputs, request_compression_algorithm=compression)
        answer = {name: result.as_numpy(name) for name in ("label", "probabilities")}
        assert_predictions(answer, digits_reference(x))
        assert result.get_response()["model_version"] == "1"
    finally:
        client.close()


# --- every bad request is a 4xx with {"error"} -----------------------------------------------------------


DIGITS = "/v2/models/digits/infer"
LOOKUP = "/v2/models/lookup/infer"
LENGTH = "Inference-Header-Content-Length"
BINARY_BODY, BINARY_HEADER_LENGTH = encode_request({"X": np.zeros((1, 64), dtype=np.float32)})
WITH_LENGTH = {LENGTH: str(BINARY_HEADER_LENGTH)}


def digits_body(**changes: Any) -> bytes:
    """A one-row JSON request for digits with `changes` to its tensor (or `outputs`)."""
    outputs = changes.pop("outputs", None)
    request: dict[str, Any] = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    request["inputs"][0].update(changes)
    if outputs is not None:
        request["outputs"] = outputs
    return json.dumps(request).encode()


def lookup_body(ids: list[int], *, scale: bool = True) -> bytes:
    inputs = [{"name": "ids", "datatype": "INT64", "shape": [len(ids)], "data": ids}]
    if scale:
        inputs.append({"name": "scale", "datatype": "FP32", "shape": [1], "data": [1.0]})
    return json.dumps({"inputs": inputs}).encode()


def bad(
    case: str,
    method: str,
    path: str,
    status: int,
    needle: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Any:
    return pytest.param(method, path, body, headers or {}, status, needle, id=case)


BAD_REQUESTS = [
    bad("unknown-model", "POST", "/v2/models/nope/infer", 404, "model 'nope' is not served", digits_body()),
    bad("unknown-model-metadata", "GET", "/v2/models/nope", 404, "model 'nope' is not served"),
    bad("unknown-model-ready", "GET", "/v2/models/nope/ready", 404, "not served"),
    bad(
        "unknown-version",
        "POST",
        "/v2/models/digits/versions/2/infer",
        404,
        "model digits version 2 is not available (active: 1)",
        digits_body(),
    ),
    bad("unknown-version-ready", "GET", "/v2/models/digits/versions/9/ready", 404, "(active: 1)"),
    bad("unknown-input", "POST", DIGITS, 400, "model digits has no input 'pixels'", digits_body(name="pixels")),
    bad("wrong-datatype", "POST", DIGITS, 400, "'X' is FP64; model digits expects FP32", digits_body(datatype="FP64")),
    bad("wrong-rank", "POST", DIGITS, 400, "has shape [64]; model digits expects [-1, 64]", digits_body(shape=[64])),
    bad("wrong-fixed-dim", "POST", DIGITS, 400, "has shape [2, 32]; model digits expects", digits_body(shape=[2, 32])),
    bad("wrong-data-size", "POST", DIGITS, 400, "has 64 elements; shape [2, 64] needs 128", digits_body(shape=[2, 64])),
    bad("non-numeric-data", "POST", DIGITS, 400, "not FP32 numbers", digits_body(data=["a"] * 64)),
    bad("ragged-data", "POST", DIGITS, 400, "ragged", digits_body(data=[[0.0] * 64, [0.0]])),
    bad("wrong-binary-size", "POST", DIGITS, 400, "runs past the 252 bytes", BINARY_BODY[:-4], WITH_LENGTH),
    bad(
        "unclaimed-binary",
        "POST",
        DIGITS,
        400,
        "4 bytes of binary data are not claimed",
        BINARY_BODY + b"1234",
        WITH_LENGTH,
    ),
    bad("binary-without-header-length", "POST", DIGITS, 400, "need an Inference-Header-Content-Length", BINARY_BODY),
    bad("malformed-json", "POST", DIGITS, 400, "not valid JSON", b'{"inputs": ['),
    bad("json-not-object", "POST", DIGITS, 400, "must be a JSON object", b"[1, 2]"),
    bad("empty-body", "POST", DIGITS, 400, "request body is empty"),
    bad("header-length-not-number", "POST", DIGITS, 400, "integer, got 'abc'", BINARY_BODY, {LENGTH: "abc"}),
    bad("header-length-negative", "POST", DIGITS, 400, "must be a non-negative integer", BINARY_BODY, {LENGTH: "-5"}),
    bad("header-length-too-long", "POST", DIGITS, 400, "Content-Length is 99999", BINARY_BODY, {LENGTH: "99999"}),
    bad("header-length-too-short", "POST", DIGITS, 400, "not valid JSON", BINARY_BODY, {LENGTH: "10"}),
    bad("unknown-output", "POST", DIGITS, 400, "has no output 'logits'", digits_body(outputs=[{"name": "logits"}])),
    bad("missing-input", "POST", LOOKUP, 400, "model lookup needs inputs ['scale']", lookup_body([1], scale=False)),
    bad("int-out-of-range", "POST", LOOKUP, 400, "out of range for INT64", lookup_body([2**63])),
    bad("runtime-rejects-values", "POST", LOOKUP, 400, "the model rejected the input", lookup_body([1, 99])),
    bad(
        "unsupported-encoding", "POST", DIGITS, 400, "'br' is not supported", digits_body(), {"Content-Encoding": "br"}
    ),
    bad("corrupt-gzip", "POST", DIGITS, 400, "not valid gzip data", b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}),
    bad("unknown-path", "GET", "/v1/whatever", 404, "no route for GET /v1/whatever"),
    bad("unknown-model-action", "POST", "/v2/models/digits/explain", 404, "no route"),
    bad("get-infer", "GET", DIGITS, 405, "GET is not allowed on /v2/models/digits/infer"),
    bad("post-live", "POST", "/v2/health/live", 405, "POST is not allowed"),
    bad("delete-metrics", "DELETE", "/metrics", 405, "DELETE is not allowed"),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "needle"), BAD_REQUESTS)
def test_bad_requests_get_4xx_with_an_error_body(
    oip_client: httpx.Client, method: str, path: str, body: bytes, headers: dict[str, str], status: int, needle: str
) -> None:
    response = oip_client.request(method, path, content=body, headers=headers)
    assert_error(response, status, needle)
    if status == 405:
        assert response.headers["allow"] in ("GET, HEAD", "POST")


def test_body_over_the_limit_is_413(
    serve_models: ServeModels, digits_package: Package, digits_runtime: Runtime
) -> None:
    served = serve_models(loaded(digits_package, digits_runtime), limits=ServerLimits(max_body_bytes=2000))
    with httpx.Client(base_url=served.url, timeout=10) as client:
        fits = client.post("/v2/models/digits/infer", json=json_request(digits_x(1)))
        assert fits.status_code == 200, fits.text
        big = json_request(digits_x(8))
        assert_error(client.post("/v2/models/digits/infer", json=big), 413, "larger than 2000 bytes")
        chunked = iter([b" " * 1500, b" " * 1500])  # no Content-Length: refused while it streams in
        assert_error(client.post("/v2/models/digits/infer", content=chunked), 413, "larger than 2000 bytes")
    # A declared length over the limit is refused before any of the body is sent.
    status, headers, payload = raw_exchange(
        served.port, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n"
    )[0]
    assert (status, headers["connection"], json.loads(payload)["error"]) == (
        413,
        "close",
        "request body is larger than 2000 bytes",
    )


# --- metrics ---------------------------------------------------------------------------------------------


def metric(text: str, sample: str) -> float:
    """The value of one sample line (`name{labels}`), 0 when absent."""
    match = re.search("^" + re.escape(sample) + r" (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_move_with_requests(oip_server: RunningServer, oip_client: httpx.Client) -> None:
    labels = '{model="digits",version="1"}'
    names = [
        "nv_inference_request_success",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_compute_infer_duration_us",
        "strata_inference_request_duration_seconds_count",
    ]
    failure = 'nv_inference_request_failure{model="digits",version="1",reason="bad_request"}'
    before_text = oip_client.get("/metrics").text
    before = {name: metric(before_text, name + labels) for name in [*names]} | {failure: metric(before_text, failure)}

    assert oip_client.post("/v2/models/digits/infer", json=json_request(digits_x(5))).status_code == 200
    assert binary_post(oip_client, "/v2/models/digits/infer", {"X": digits_x(7)}).status_code == 200
    assert oip_client.post("/v2/models/digits/infer", json=json_request(digits_x(1)) | {"id": 3}).status_code == 400
    assert oip_client.post("/v2/models/made-up/infer", json=json_request(digits_x(1))).status_code == 404

    response = oip_client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.text
    delta = {name: metric(text, name + labels) - before[name] for name in names}
    assert delta["nv_inference_request_success"] == 2
    assert delta["nv_inference_count"] == 12
    assert delta["nv_inference_exec_count"] == 2
    assert delta["strata_inference_request_duration_seconds_count"] == 2
    assert delta["nv_inference_request_duration_us"] >= delta["nv_inference_compute_infer_duration_us"] > 0
    assert metric(text, failure) - before[failure] == 1
    assert metric(text, 'strata_model_active{model="digits",version="1",variant="cpu-generic-fp32"}') == 1
    assert metric(text, 'strata_agent_info{version="0.1.0"}') == 1
    assert "made-up" not in text  # only served models get series: clients cannot grow the label set


def test_outputs_that_break_the_signature_are_a_500(
    serve_models: ServeModels, digits_package: Package, digits_runtime: Runtime
) -> None:
    wrong = (TensorSpec("label", "INT32", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10)))
    served = serve_models(loaded(digits_package, digits_runtime, outputs=wrong))
    response = httpx.post(f"{served.url}/v2/models/digits/infer", json=json_request(digits_x(2)))
    assert_error(response, 500, "returned output 'label' as INT64 [2], but its signature says INT32 [-1]")
    text = served.metrics.render()
    assert metric(text, 'nv_inference_request_failure{model="digits",version="1",reason="internal"}') == 1


def test_a_stopped_executor_is_a_503(
    serve_models: ServeModels, digits_package: Package, digits_runtime: Runtime
) -> None:
    executor = ThreadPoolExecutor(1)
    executor.shutdown()
    served = serve_models(loaded(digits_package, digits_runtime), executor=executor)
    response = httpx.post(f"{served.url}/v2/models/digits/infer", json=json_request(digits_x(1)))
    assert_error(response, 503, "shutting down")
    text = served.metrics.render()
    assert metric(text, 'nv_inference_request_failure{model="digits",version="1",reason="unavailable"}') == 1


# --- auth and readiness ----------------------------------------------------------------------------------


def test_token_guards_every_route_but_liveness(
    serve_models: ServeModels, digits_package: Package, digits_runtime: Runtime
) -> None:
    served = serve_models(loaded(digits_package, digits_runtime), token="s3cret")
    good = {"Authorization": "Bearer s3cret"}
    with httpx.Client(base_url=served.url, timeout=10) as client:
        assert client.get("/v2/health/live").status_code == 200
        for path in ("/v2/health/ready", "/v2", "/v2/models/digits", "/metrics", "/v2/nowhere"):
            refused = client.get(path)
            assert_error(refused, 401, "Authorization: Bearer")
            assert refused.headers["www-authenticate"].startswith("Bearer")
        for wrong in ({"Authorization": "Bearer nope"}, {"Authorization": "Basic s3cret"}, {"Authorization": "s3cret"}):
            assert_error(client.get("/v2/health/ready", headers=wrong), 401, "Bearer")
        assert_error(client.post("/v2/models/digits/infer", json=json_request(digits_x(1))), 401, "Bearer")
        assert client.get("/v2/health/ready", headers=good).status_code == 200
        assert client.get("/metrics", headers={"Authorization": "bearer s3cret"}).status_code == 200
        _, outputs = decoded(client.post("/v2/models/digits/infer", json=json_request(digits_x(2)), headers=good))
        assert outputs["label"].shape == (2,)
        assert_error(client.get("/v2/nowhere", headers=good), 404, "no route")


def test_a_caller_without_the_token_is_refused_on_its_head_and_holds_no_budget(
    serve_models: ServeModels, digits_package: Package, digits_runtime: Runtime
) -> None:
    """Checked in the handler, the token came after the body was charged and read: two connections declaring
    64 MiB bodies without a token (160 bytes sent) held the whole request budget, every caller with the token got
    503 until the read timeout cut them, and each was told `100 Continue`. Now the head is enough to refuse them."""
    limits = ServerLimits(max_body_bytes=64 << 20, max_body_bytes_in_flight=100 << 20)
    served = serve_models(loaded(digits_package, digits_runtime), limits=limits, token="s3cret")
    holders = []
    for _ in range(2):
        holder = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        holder.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 67108864\r\n\r\n"
        )
        answer = holder.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        assert b"100 Continue" not in answer
        assert b"Bearer" in answer
        holders.append(holder)
    with httpx.Client(base_url=served.url, timeout=10) as client:
        good = {"Authorization": "Bearer s3cret"}
        answered = client.post("/v2/models/digits/infer", json=json_request(digits_x(2)), headers=good)
        assert answered.status_code == 200, answered.text
        assert client.get("/v2/health/live").status_code == 200  # liveness needs no token, on its head too
    for holder in holders:
        assert holder.recv(65536) == b""  # closed after the refusal: the body is never read
        holder.close()


def test_a_json_body_is_held_to_what_the_node_can_decode(
    serve_models: ServeModels, digits_package: Package, digits_runtime: Runtime
) -> None:
    """JSON numbers become Python objects before they become arrays (about 16 bytes for each byte of "0,"): two
    60 MiB JSON bodies inside the 128 MiB request budget took the node to 2 GB. A JSON body may be a sixteenth of
    the decode budget; the same tensor as binary data is taken."""
    served = serve_models(loaded(digits_package, digits_runtime), decode_budget_bytes=4 << 20)
    rows = 2200  # 2200 x 64 zeros: about 290 KB of JSON, over 4 MiB / 16
    x = np.zeros((rows, 64), np.float32)
    with httpx.Client(base_url=served.url, timeout=30) as client:
        text = json.dumps(json_request(x)).encode()
        refused = client.post("/v2/models/digits/infer", content=text)
        assert refused.status_code == 413, refused.text
        assert "send large tensors as binary data" in refused.json()["error"]
        # the same JSON declared a binary request's header (tensor data may sit in it): parsed as JSON all the same
        as_header = client.post(
            "/v2/models/digits/infer", content=text, headers={"Inference-Header-Content-Length": str(len(text))}
        )
        assert as_header.status_code == 413, as_header.text
        _, outputs = decoded(binary_post(client, "/v2/models/digits/infer", {"X": x}))
        assert outputs["label"].shape == (rows,)
        small = client.post("/v2/models/digits/infer", json=json_request(x[:100]))
        assert small.status_code == 200, small.text


def test_decoding_is_charged_to_a_budget_until_the_answer(
    server_loop: LoopThread, digits_package: Package, digits_runtime: Runtime
) -> None:
    """A compressed body was charged at its compressed size and inflated to up to 64 MiB, held until its batch
    ran: twenty 63 KiB deflate bodies took the node to 954 MiB. What decoding may hold is charged first; a request
    that does not fit beside those charged is shed, and one alone always fits."""
    from concurrent.futures import ThreadPoolExecutor

    from strata.agent.scheduler import Overloaded

    repository = ModelRepository()
    model = loaded(digits_package, digits_runtime)
    repository.put(model)
    executor = ThreadPoolExecutor(2)
    app = InferenceApp(repository, InferenceMetrics(), executor=executor, decode_budget_bytes=8 << 20)
    entered, release = threading.Event(), threading.Event()

    def slow_decode(scheduler: Any) -> Any:
        entered.set()
        release.wait(10)
        raise ValueError("not a request")  # a caller's fault once it is let go: the charge must come back

    async def scenario() -> list[str]:
        first = asyncio.ensure_future(app.infer(model, slow_decode, size=5000, inline=False, cost=6 << 20))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        said = []
        try:
            await app.infer(model, slow_decode, size=5000, inline=False, cost=6 << 20)
        except Overloaded as exc:
            said.append(f"shed: {exc}")
        release.set()
        with contextlib.suppress(Exception):
            await first
        entered.clear()
        release.clear()
        second = asyncio.ensure_future(app.infer(model, slow_decode, size=5000, inline=False, cost=6 << 20))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        said.append("the charge came back: the next one is decoded")
        release.set()
        with contextlib.suppress(Exception):
            await second
        return said

    try:
        said = server_loop.run(scenario())
    finally:
        executor.shutdown(wait=True)
    assert said[0].startswith("shed: the node is decoding as many"), said
    assert said[1] == "the charge came back: the next one is decoded"


def test_tritonclient_with_a_token(serve_models: ServeModels, digits_package: Package, digits_runtime: Runtime) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    served = serve_models(loaded(digits_package, digits_runtime), token="t0ken")
    client = triton.InferenceServerClient(url=f"127.0.0.1:{served.port}")
    try:
        infer_input = triton.InferInput("X", [1, 64], "FP32")
        infer_input.set_data_from_numpy(digits_x(1), binary_data=True)
        with pytest.raises(InferenceServerException, match="Bearer"):
            client.infer("digits", [infer_input])
        result = client.infer("digits", [infer_input], headers={"Authorization": "Bearer t0ken"})
        assert result.as_numpy("label") is not None
    finally:
        client.close()


def test_not_ready_until_the_agent_says_so(
    serve_models: ServeModels, digits_package: Package, digits_runtime: Runtime
) -> None:
    ready = threading.Event()
    served = serve_models(loaded(digits_package, digits_runtime), ready=ready.is_set)
    assert_error(httpx.get(f"{served.url}/v2/health/ready"), 503, "not ready")
    assert httpx.get(f"{served.url}/v2/health/live").status_code == 200
    ready.set()
    assert httpx.get(f"{served.url}/v2/health/ready").status_code == 200


# --- the event loop never waits for inference ------------------------------------------------------------


def test_a_long_inference_does_not_block_other_requests(
    serve_models: ServeModels, digits_package: Package, digits_runtime: Runtime
) -> None:
    gated = GatedRuntime(digits_runtime)
    served = serve_models(loaded(digits_package, digits_runtime), loaded(digits_package, gated, name="slow"))
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=served.url, timeout=10) as client:
        slow = pool.submit(
            httpx.post, f"{served.url}/v2/models/slow/infer", json=json_request(digits_x(64)), timeout=30
        )
        assert gated.entered.wait(10)
        try:
            assert client.get("/v2/health/live").status_code == 200
            assert client.get("/metrics").status_code == 200
            _, outputs = decoded(client.post("/v2/models/digits/infer", json=json_request(digits_x(3))))
            assert outputs["label"].shape == (3,)
            assert not slow.done()
        finally:
            gated.gate.set()
        _, outputs = decoded(slow.result(30))
        assert outputs["label"].shape == (64,)


# --- the HTTP layer --------------------------------------------------------------------------------------


def read_response(stream: IO[bytes]) -> tuple[int, dict[str, str], bytes]:
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, stream.read(int(headers.get("content-length", "0")))


def raw_exchange(port: int, data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes, close our side, and read every response until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as stream:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        responses = []
        while stream.peek(1):
            responses.append(read_response(stream))
    return responses


BIG_ANSWER = bytes(16 << 20)


async def big_answer(request: Request) -> Response:
    return Response(200, {"content-type": "application/octet-stream"}, BIG_ANSWER)


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_answers_a_caller_does_not_read_are_charged_to_the_budget(
    start_http_server: StartHttp, connection: str
) -> None:
    """An answer waiting for a caller that does not read it was held outside every budget, with the request and
    the answer object beside the transport's copy: callers asking for large answers and never reading them grew
    the node by about 128 MiB each. What waits unread is charged now, so new bodies are refused (503) instead;
    the last answer of a connection that closes after it too."""
    limits = ServerLimits(max_body_bytes_in_flight=16 << 20, body_timeout=4.0)
    server = start_http_server(big_answer, limits)
    readers_that_do_not = []
    for _ in range(3):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little of the answer
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: %s\r\n\r\n" % connection.encode())
        readers_that_do_not.append(sock)
    body = b"x" * (1 << 20)
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
        deadline = time.monotonic() + 10
        while (answer := client.post("/big", content=body)).status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answer.status_code == 503, "the unread answers were not charged"
        assert "too many request bodies" in answer.text
        for sock in readers_that_do_not:
            sock.close()
        deadline = time.monotonic() + 15  # cut off (closed here, or past body_timeout): their charge goes back
        while (answer := client.post("/big", content=body)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert answer.status_code == 200


async def echo(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    if request.path == "/slow":
        await asyncio.sleep(float(request.query["seconds"]))
    summary = {
        "method": request.method,
        "path": request.path,
        "query": dict(request.query),
        "length": len(request.body),
        "body_head": request.body[:16].decode("latin-1"),
        "agent": request.headers.get("user-agent"),
        "client_is_loopback": request.client is not None and request.client[0] == "127.0.0.1",
    }
    return Response.json(200, summary)


@pytest.fixture(scope="module")
def echo_server(start_http_server: StartHttp) -> HttpServer:
    # keep-alive 2 s: the tests that make several requests on one connection must not lose it to a loaded
    # machine's pause between them (0.5 s could); only the idle-close test waits it out
    return start_http_server(echo, ServerLimits(max_body_bytes=1 << 20, max_header_bytes=8192, keep_alive_timeout=2.0))


def test_keep_alive_serves_several_requests_on_one_connection(echo_server: HttpServer) -> None:
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=10) as sock, sock.makefile("rb") as stream:
        for index in range(3):
            sock.sendall(f"GET /n/{index}?a=1&b=%20x HTTP/1.1\r\nHost: t\r\nUser-Agent: raw\r\n\r\n".encode())
            status, headers, body = read_response(stream)
            assert status == 200
            assert "connection" not in headers
            summary = json.loads(body)
            assert (summary["path"], summary["query"], summary["agent"]) == (
                f"/n/{index}",
                {"a": "1", "b": " x"},
                "raw",
            )
            assert summary["client_is_loopback"] is True


def test_pipelined_requests_are_answered_in_order(echo_server: HttpServer) -> None:
    requests = b"".join(f"GET /p/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for i in range(3))
    responses = raw_exchange(echo_server.port, requests)
    assert [json.loads(body)["path"] for _, _, body in responses] == ["/p/0", "/p/1", "/p/2"]


def test_chunked_request_body(echo_server: HttpServer) -> None:
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    head = b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    ((status, _, payload),) = raw_exchange(echo_server.port, head + body)
    assert status == 200
    assert (json.loads(payload)["length"], json.loads(payload)["body_head"]) == (11, "hello world")


def test_expect_100_continue(echo_server: HttpServer) -> None:
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=10) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert read_response(stream)[0] == 100
        sock.sendall(b"data")
        status, _, body = read_response(stream)
        assert (status, json.loads(body)["length"]) == (200, 4)


def test_head_gets_the_headers_without_a_body(oip_client: httpx.Client) -> None:
    response = oip_client.head("/v2/health/live")
    assert response.status_code == 200
    assert int(response.headers["content-length"]) > 0
    assert response.content == b""


@pytest.mark.parametrize(
    ("data", "status", "needle"),
    [
        (b"THIS IS NOT HTTP\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n", 400, "malformed HTTP request"),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "malformed HTTP request"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "request headers are too large"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20000, 431, "request headers are too large"),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2000000\r\n\r\n", 413, "larger than 1048576 bytes"),
    ],
    ids=["garbage", "bad-content-length", "bad-chunk", "big-header-whole", "big-header-partial", "big-body"],
)
def test_malformed_http_is_refused_and_closed(echo_server: HttpServer, data: bytes, status: int, needle: str) -> None:
    responses = raw_exchange(echo_server.port, data)
    assert len(responses) == 1
    got_status, headers, body = responses[0]
    assert (got_status, headers["connection"]) == (status, "close")
    assert needle in json.loads(body)["error"]


def test_a_handler_exception_is_a_logged_500(echo_server: HttpServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="strata.agent.httpd"):
        response = httpx.get(f"http://127.0.0.1:{echo_server.port}/boom")
    assert_error(response, 500, "internal error")
    assert response.json() == {"error": "internal error"}
    (record,) = [r for r in caplog.records if "unhandled error serving GET /boom" in r.getMessage()]
    assert record.exc_info is not None
    assert "handler bug" in str(record.exc_info[1])


def test_idle_keep_alive_connections_are_closed(echo_server: HttpServer) -> None:
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=10) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"GET /once HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(stream)[0] == 200
        started = time.monotonic()
        assert stream.read() == b""  # the server closes after its 2 s keep-alive timeout
        assert 1.5 < time.monotonic() - started < 10


def test_the_keep_alive_timeout_runs_from_the_last_answer(start_http_server: StartHttp) -> None:
    """The connection's one timer is re-armed by each answer, not set anew: a request made while the first
    answer's timer is still pending keeps the connection open past that timer, and the close follows the
    last answer by the timeout.

    A keep-alive timeout of 2 s and pauses of 1.2 s: the two pauses together pass the first answer's timer, and
    each leaves 0.8 s for a loaded machine to send the next request before the timer it sits within (1 s and 0.6 s
    left 0.4 s, and a test worker paused for half a second on a busy machine lost the connection). A pause can only
    run long, so the third request always comes past the first timer."""
    timeout, pause = 2.0, 1.2
    server = start_http_server(
        echo, ServerLimits(max_body_bytes=1 << 20, max_header_bytes=8192, keep_alive_timeout=timeout)
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(stream)[0] == 200
        first_answered = time.monotonic()
        time.sleep(pause)  # within the keep-alive timeout
        sock.sendall(b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(stream)[0] == 200
        time.sleep(pause)  # past the first answer's timer: the connection must still serve
        assert time.monotonic() - first_answered > timeout
        sock.sendall(b"GET /third HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(stream)[0] == 200
        started = time.monotonic()
        assert stream.read() == b""
        # not at the second answer's timer (at most timeout - pause from now), at the third's
        assert pause < time.monotonic() - started < 10


def test_port_zero_binds_a_free_port_and_a_taken_one_is_a_config_error(
    server_loop: LoopThread, echo_server: HttpServer
) -> None:
    from strata.core.errors import ConfigError

    assert echo_server.port > 0
    other = HttpServer(echo)
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{echo_server.port}"):
        server_loop.run(other.start("127.0.0.1", echo_server.port))


def noting_entry(entered: threading.Event) -> Callable[[Request], Awaitable[Response]]:
    """`echo` that sets `entered` once a request is inside the handler (a sleep could outrun a loaded machine)."""

    async def handler(request: Request) -> Response:
        entered.set()
        return await echo(request)

    return handler


def test_stop_lets_requests_in_flight_finish_and_closes_idle_connections(server_loop: LoopThread) -> None:
    entered = threading.Event()
    server = HttpServer(noting_entry(entered))
    server_loop.run(server.start("127.0.0.1", 0))
    port = server.port
    with (
        ThreadPoolExecutor(1) as pool,
        socket.create_connection(("127.0.0.1", port), timeout=10) as idle,
        idle.makefile("rb") as idle_stream,
    ):
        idle.sendall(b"GET /warm HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(idle_stream)[0] == 200
        entered.clear()  # the warm-up request was in the handler too
        in_flight = pool.submit(httpx.get, f"http://127.0.0.1:{port}/slow?seconds=0.5", timeout=10)
        assert entered.wait(10)  # the slow request is inside the handler now
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=5), server_loop.loop)

        assert idle_stream.read() == b""  # the idle connection is closed at once
        response = in_flight.result(10)
        assert response.status_code == 200
        assert response.headers["connection"] == "close"
        stopping.result(10)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_stop_cancels_what_outlives_the_grace_period(server_loop: LoopThread) -> None:
    entered = threading.Event()
    server = HttpServer(noting_entry(entered))
    server_loop.run(server.start("127.0.0.1", 0))
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.get, f"http://127.0.0.1:{server.port}/slow?seconds=30", timeout=10)
        assert entered.wait(10)
        started = time.monotonic()
        server_loop.run(server.stop(grace=0.3))
        assert time.monotonic() - started < 3
        with pytest.raises(httpx.RemoteProtocolError):
            in_flight.result(10)


def test_grpc_needs_the_serving_token_as_rest_does(
    server_loop: LoopThread, digits_package: Package, digits_runtime: Runtime
) -> None:
    """Over gRPC the token travels as `authorization` metadata; ServerLive needs none, as /v2/health/live."""
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    from strata.agent.oip_grpc import GrpcInferenceServer

    repository = ModelRepository()
    repository.put(loaded(digits_package, digits_runtime))
    app = InferenceApp(repository, InferenceMetrics(), token="t0ken")
    server = GrpcInferenceServer(app, max_message_bytes=1 << 20, message_budget_bytes=8 << 20, max_concurrent_rpcs=8)

    async def start() -> None:
        await server.start("127.0.0.1:0")

    server_loop.run(start())
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live()
        infer_input = triton.InferInput("X", [1, 64], "FP32")
        infer_input.set_data_from_numpy(digits_x(1))
        with pytest.raises(InferenceServerException, match="Bearer") as caught:
            client.infer("digits", [infer_input])
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException, match="Bearer"):
            client.get_model_metadata("digits", headers={"authorization": "Bearer wrong"})
        result = client.infer("digits", [infer_input], headers={"authorization": "Bearer t0ken"})
        assert result.as_numpy("label") is not None
    finally:
        client.close()
        server_loop.run(server.stop(0))


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_grpc_refuses_a_call_without_the_token_before_reading_its_message(
    server_loop: LoopThread, digits_package: Package, digits_runtime: Runtime
) -> None:
    """A unary handler gets the whole message before it runs: checked there, 12 callers without a token sending
    40 MiB each made the node hold about 480 MiB. The token is checked from the call's headers, first."""
    from strata.agent.oip_grpc import GrpcInferenceServer

    repository = ModelRepository()
    repository.put(loaded(digits_package, digits_runtime))
    app = InferenceApp(repository, InferenceMetrics(), token="t0ken")
    server = GrpcInferenceServer(app, max_message_bytes=64 << 20, message_budget_bytes=1 << 30, max_concurrent_rpcs=16)
    server_loop.run(server.start("127.0.0.1:0"))
    callers = f"""
import concurrent.futures, grpc
channel = grpc.insecure_channel("127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", -1)])
call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
payload = bytes(40 << 20)
def one(_):
    try:
        call(payload, timeout=60)
        return "OK"
    except grpc.RpcError as error:
        return error.code().name
with concurrent.futures.ThreadPoolExecutor(12) as pool:
    print(sorted(set(pool.map(one, range(12)))))
"""
    try:
        before = _peak_rss_mb()
        done = subprocess.run([sys.executable, "-c", callers], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "['UNAUTHENTICATED']", done.stdout + done.stderr
        assert _peak_rss_mb() - before < 160
    finally:
        server_loop.run(server.stop(0))


def test_another_node_reads_no_node_only_view_on_the_tier_port(
    server_loop: LoopThread, digits_package: Package, digits_runtime: Runtime
) -> None:
    """A node's tier port is for other nodes falling back to it for inference: any fleet node (another site's
    device) read its /metrics, every model's statistics and its repository there. Those are its operator's."""
    repository = ModelRepository()
    repository.put(loaded(digits_package, digits_runtime))
    app = InferenceApp(repository, InferenceMetrics(), token="s3cret")

    def call(method: str, path: str, body: bytes = b"") -> Response:
        request = Request(method=method, path=path, query={}, headers={}, body=body, client=None, peer="a" * 32)
        return server_loop.run(app.handle(request))

    for path in ("/metrics", "/v2/models/stats", "/v2/models/digits/stats", "/v2/models/digits/versions/1/stats"):
        refused = call("GET", path)
        assert refused.status == 403, (path, refused.body)
        assert b"not for other nodes" in refused.body
    assert call("POST", "/v2/repository/index").status == 403
    for path in ("/v2/health/ready", "/v2/models/digits"):
        assert call("GET", path).status == 200, path
    answer = call("POST", "/v2/models/digits/infer", json.dumps(json_request(digits_x(2))).encode())
    assert answer.status == 200, answer.body
