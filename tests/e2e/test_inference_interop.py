"""Triton's own clients, unmodified, against a real agent: tritonclient.http on the REST port and tritonclient.grpc on
the gRPC port (`strata agent --grpc-port`) pass the same checks: health, metadata, Triton's model configuration,
statistics and repository index, inference with JSON and binary (raw) tensors, and every bad request refused as
a 4xx / INVALID_ARGUMENT or NOT_FOUND with a message that says what is wrong."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
from e2e_helpers import push_model

from strata.examples.digits import load_data
from strata.localfleet import LocalFleet, free_port

pytestmark = pytest.mark.slow

X = load_data().test_x[:4].astype(np.float32)


@dataclass
class Protocol:
    """What differs between the two clients: the module, the URL, how an error's status reads."""

    name: str
    module: ModuleType
    url: str
    bad_request: str  # InferenceServerException.status() of a caller's mistake
    not_found: str

    def client(self) -> Any:
        return self.module.InferenceServerClient(url=self.url)

    def as_dict(self, call: Callable[..., Any], *args: Any) -> Any:
        """A metadata call's answer as JSON (tritonclient.grpc renders its messages as JSON with as_json)."""
        return call(*args, as_json=True) if self.name == "grpc" else call(*args)


def ints(values: list[Any]) -> list[int]:
    """JSON int64 values as ints (protobuf's JSON form writes them as strings)."""
    return [int(v) for v in values]


@pytest.fixture
def agent(fleet: LocalFleet, digits_onnx: Path, tmp_path: Path) -> tuple[str, str]:
    """One device agent serving digits v1 over REST and gRPC: (REST host:port, gRPC host:port)."""
    push_model(fleet, digits_onnx, "1", tmp_path)
    grpc_port = free_port()
    handle = fleet.start_agent("edge", extra_args=["--grpc-port", str(grpc_port)])
    fleet.client.deploy("digits", "1", {})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    return f"127.0.0.1:{handle.serve_port}", f"127.0.0.1:{grpc_port}"


def local_labels(model: Path) -> list[int]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [int(v) for v in session.run(["label"], {"X": X})[0]]


def test_tritonclient_http_and_grpc_pass_the_same_checks(agent: tuple[str, str], digits_onnx: Path) -> None:
    import tritonclient.grpc
    import tritonclient.http

    rest, grpc_address = agent
    expected = local_labels(digits_onnx)
    protocols = [
        Protocol("http", tritonclient.http, rest, bad_request="400", not_found="404"),
        Protocol("grpc", tritonclient.grpc, grpc_address, "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"),
    ]
    for protocol in protocols:
        check_protocol(protocol, expected)
    typed_contents_and_truncated_raw_bytes_over_grpc(grpc_address, expected)

    # both protocols were counted by the same metrics: 4 good requests of 4 rows each per client, 1 over typed
    # contents, and the refused ones as bad requests
    metrics = httpx.get(f"http://{rest}/metrics").text
    assert re.search(r'^nv_inference_request_success\{model="digits",version="1"\} 9$', metrics, re.M), metrics
    assert re.search(r'^nv_inference_count\{model="digits",version="1"\} 36$', metrics, re.M)
    refused = r'^nv_inference_request_failure\{model="digits",version="1",reason="bad_request"\} (\d+)$'
    match = re.search(refused, metrics, re.M)
    assert match is not None
    assert int(match.group(1)) == 2 * 4 + 2
    many_calls_in_flight_over_grpc(grpc_address, expected)


def many_calls_in_flight_over_grpc(address: str, expected: list[int]) -> None:
    """tritonclient.grpc's async API with 16 inferences in flight, on an agent with default limits: it ran at most
    --request-budget-mb / --max-request-mb = 128 / 64 = 2 RPCs at once, so most of them were RESOURCE_EXHAUSTED,
    and so were health calls made meanwhile."""
    import queue

    import tritonclient.grpc as triton

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = triton.InferenceServerClient(url=address)
    try:
        infer_input = triton.InferInput("X", list(X.shape), "FP32")
        infer_input.set_data_from_numpy(X)
        for _ in range(16):
            client.async_infer("digits", [infer_input], callback=lambda result, error: answers.put((result, error)))
        live = [client.is_server_live() for _ in range(4)]  # while they are in flight
        results = [answers.get(timeout=30) for _ in range(16)]
    finally:
        client.close()
    assert [str(error) for _, error in results if error is not None] == []
    assert all(result.as_numpy("label").tolist() == expected for result, _ in results)
    assert live == [True] * 4


def check_protocol(protocol: Protocol, expected: list[int]) -> None:
    from tritonclient.utils import InferenceServerException

    module = protocol.module
    client = protocol.client()
    try:
        # health
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("digits")
        assert client.is_model_ready("digits", "1")
        assert not client.is_model_ready("nope")

        # metadata
        server = protocol.as_dict(client.get_server_metadata)
        assert server["name"] == "strata"
        model = protocol.as_dict(client.get_model_metadata, "digits")
        assert model["name"] == "digits"
        assert model["versions"] == ["1"]
        assert model["platform"] == "onnxruntime_onnx"
        assert [(t["name"], t["datatype"], ints(t["shape"])) for t in model["inputs"]] == [("X", "FP32", [-1, 64])]
        assert {t["name"] for t in model["outputs"]} == {"label", "probabilities"}

        # Triton's extensions
        config = protocol.as_dict(client.get_model_config, "digits")
        config = config.get("config", config)  # gRPC wraps it in ModelConfigResponse
        assert config["name"] == "digits"
        assert int(config["max_batch_size"]) == 32
        assert [(t["name"], t["data_type"], ints(t["dims"])) for t in config["input"]] == [("X", "TYPE_FP32", [64])]
        assert int(config["dynamic_batching"]["default_queue_policy"]["max_queue_size"]) == 256
        assert config["instance_group"][0]["kind"] == "KIND_CPU"
        index = protocol.as_dict(client.get_model_repository_index)
        index = index["models"] if isinstance(index, dict) else index
        assert [(m["name"], m["version"], m["state"]) for m in index] == [("digits", "1", "READY")]
        before = stats(protocol, client)

        # inference: raw/binary tensors, and JSON where the protocol has it
        encodings = [True, False] if protocol.name == "http" else [True]
        for binary in encodings:
            for outputs in (None, ["label"]):
                result = infer(protocol, client, X, "X", "FP32", binary, outputs)
                assert result.as_numpy("label").tolist() == expected, (protocol.name, binary, outputs)
                if outputs is None:
                    probabilities = result.as_numpy("probabilities")
                    assert probabilities.shape == (4, 10)
                    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-4)
                else:
                    assert result.as_numpy("probabilities") is None
        if protocol.name == "grpc":  # one request more to keep the counts of both protocols equal
            assert infer(protocol, client, X, "X", "FP32", True, ["label"]).as_numpy("label").tolist() == expected
            assert infer(protocol, client, X, "X", "FP32", True, None).as_numpy("label").tolist() == expected

        after = stats(protocol, client)
        assert after["inference_count"] - before["inference_count"] == 16
        assert after["success"] - before["success"] == 4
        assert after["execution_count"] > before["execution_count"]
        assert after["last_inference"] > 0

        # every mistake is the caller's, and says what it is
        def refused(status: str, pattern: str, call: Callable[[], Any]) -> None:
            with pytest.raises(InferenceServerException) as caught:
                call()
            assert caught.value.status() == status, (protocol.name, caught.value)
            assert re.search(pattern, caught.value.message()), (protocol.name, caught.value.message())

        wide = np.zeros((4, 65), dtype=np.float32)
        refused(protocol.bad_request, r"shape \[4, 65\].*expects \[-1, 64\]", lambda: infer(protocol, client, wide))
        doubles = X.astype(np.float64)
        refused(
            protocol.bad_request,
            r"is FP64; model digits expects FP32",
            lambda: infer(protocol, client, doubles, datatype="FP64"),
        )
        refused(protocol.bad_request, r"no input 'Y'", lambda: infer(protocol, client, X, name="Y"))

        def truncated() -> Any:
            infer_input = module.InferInput("X", [4, 64], "FP32")
            infer_input.set_data_from_numpy(X)
            if protocol.name == "http":  # a client whose binary tensor lost its last 4 bytes
                infer_input._raw_data = infer_input._raw_data[:-4]
                infer_input._parameters["binary_data_size"] = 4 * 64 * 4 - 4
            else:
                infer_input._raw_content = infer_input._raw_content[:-4]
            return client.infer("digits", [infer_input])

        refused(protocol.bad_request, r"is 1020 bytes; shape \[4, 64\] of FP32 needs 1024", truncated)
        refused(protocol.not_found, r"model 'nope' is not served", lambda: infer(protocol, client, X, model="nope"))
        refused(protocol.not_found, r"model 'nope' is not served", lambda: client.get_model_metadata("nope"))
        refused(protocol.not_found, r"version 7 is not available", lambda: client.get_model_config("digits", "7"))
    finally:
        client.close()


def infer(
    protocol: Protocol,
    client: Any,
    x: np.ndarray[Any, Any],
    name: str = "X",
    datatype: str = "FP32",
    binary: bool = True,
    outputs: list[str] | None = None,
    model: str = "digits",
) -> Any:
    module = protocol.module
    infer_input = module.InferInput(name, list(x.shape), datatype)
    if protocol.name == "http":
        infer_input.set_data_from_numpy(x, binary_data=binary)
        requested = [module.InferRequestedOutput(o, binary_data=binary) for o in outputs] if outputs else None
    else:
        infer_input.set_data_from_numpy(x)
        requested = [module.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(model, [infer_input], outputs=requested)


def stats(protocol: Protocol, client: Any) -> dict[str, int]:
    answer = protocol.as_dict(client.get_inference_statistics, "digits")
    (entry,) = answer["model_stats"]
    assert (entry["name"], entry["version"]) == ("digits", "1")
    return {
        "inference_count": int(entry.get("inference_count", 0)),
        "execution_count": int(entry.get("execution_count", 0)),
        "last_inference": int(entry.get("last_inference", 0)),
        "success": int(entry["inference_stats"].get("success", {}).get("count", 0)),
    }


def typed_contents_and_truncated_raw_bytes_over_grpc(address: str, expected: list[int]) -> None:
    """What tritonclient.grpc's InferInput never sends, through its own generated stub: typed contents (KServe
    clients send them), and typed contents of the wrong type or count."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def request(**contents: list[Any]) -> Any:
            message = service_pb2.ModelInferRequest(model_name="digits", id="typed-1")
            tensor = message.inputs.add(name="X", datatype="FP32", shape=[4, 64])
            for field, values in contents.items():
                getattr(tensor.contents, field).extend(values)
            return message

        answer = stub.ModelInfer(request(fp32_contents=X.ravel().tolist()))
        assert answer.id == "typed-1"
        assert (answer.model_name, answer.model_version) == ("digits", "1")
        label = next(i for i, o in enumerate(answer.outputs) if o.name == "label")
        assert answer.outputs[label].datatype == "INT64"
        assert np.frombuffer(answer.raw_output_contents[label], "<i8").tolist() == expected

        for contents, pattern in (
            ({"fp32_contents": X.ravel().tolist()[:-1]}, r"contents.fp32_contents has 255 elements; .* needs 256"),
            ({"int_contents": [0] * 256}, r"FP32, whose values go in contents.fp32_contents, not in int_contents"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request(**contents))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert re.search(pattern, caught.value.details()), caught.value.details()
