"""The gRPC messages' codec: the vendored descriptors match their .proto files, requests decode as strictly as REST
bodies, answers decode with tritonclient's own messages."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from strata.agent import oip_grpc_codec as codec
from strata.agent.oip_grpc_descriptor import PROTO_SHA256
from strata.core.errors import BadRequest

PROTO_DIR = Path(codec.__file__).parent / "proto"


def test_oip_grpc_descriptor_matches_its_protos() -> None:
    """A .proto edited without rerunning tools/gen-oip-grpc fails here."""
    assert sorted(PROTO_SHA256) == sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    for name, digest in PROTO_SHA256.items():
        assert hashlib.sha256((PROTO_DIR / name).read_bytes()).hexdigest() == digest, (
            f"rerun tools/gen-oip-grpc ({name})"
        )


def request(**fields: Any) -> Any:
    return codec.message_class("ModelInferRequest")(**fields)


def test_raw_contents_are_views_of_the_received_bytes() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    message = request(model_name="m", id="r")
    message.inputs.add(name="X", datatype="FP32", shape=[2, 4])
    message.raw_input_contents.append(x.tobytes())
    decoded = codec.decode_infer_request(codec.parse_message("ModelInferRequest", message.SerializeToString()))
    assert decoded.id == "r"
    np.testing.assert_array_equal(decoded.inputs[0].array, x)
    assert decoded.outputs is None


def test_typed_contents_of_every_datatype() -> None:
    values = {
        "BOOL": ("bool_contents", [True, False]),
        "INT8": ("int_contents", [-128, 127]),
        "UINT16": ("uint_contents", [0, 65535]),
        "INT64": ("int64_contents", [-(2**63), 2**63 - 1]),
        "UINT64": ("uint64_contents", [0, 2**64 - 1]),
        "FP64": ("fp64_contents", [0.5, -1.25]),
        "BYTES": ("bytes_contents", [b"a", b"\x00b"]),
    }
    for datatype, (field, data) in values.items():
        message = request()
        tensor = message.inputs.add(name="t", datatype=datatype, shape=[2])
        getattr(tensor.contents, field).extend(data)
        array = codec.decode_infer_request(message).inputs[0].array
        assert array.tolist() == data, datatype


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda m: None, "at least one input"),
        (lambda m: m.inputs.add(name="t", datatype="FP8", shape=[1]), "unsupported datatype 'FP8'"),
        (lambda m: m.inputs.add(name="t", datatype="FP32", shape=[-1]), "non-negative integers"),
        (lambda m: m.inputs.add(name="t", datatype="FP32", shape=[1 << 40]), "holds more than"),
        (lambda m: m.inputs.add(name="t", datatype="FP16", shape=[1]), "FP16 has no typed contents field"),
        (
            lambda m: m.inputs.add(name="t", datatype="INT8", shape=[1]).contents.int_contents.append(300),
            "out of range for INT8",
        ),
        (
            lambda m: m.inputs.add(name="t", datatype="FP32", shape=[2]).contents.fp32_contents.append(1),
            "has 1 elements; shape \\[2\\] needs 2",
        ),
        (
            lambda m: (m.inputs.add(name="t", datatype="FP32", shape=[1]), m.raw_input_contents.extend([b"", b""])),
            "2 entries for 1 inputs",
        ),
        (
            lambda m: (m.inputs.add(name="t", datatype="FP32", shape=[2]), m.raw_input_contents.append(b"\0" * 7)),
            "its raw_input_contents is 7 bytes; shape \\[2\\] of FP32 needs 8",
        ),
        (
            lambda m: (m.inputs.add(name="t", datatype="BYTES", shape=[3]), m.raw_input_contents.append(b"\0" * 8)),
            "3 BYTES elements need at least 12 bytes",
        ),
        (  # as REST's decoder: each BYTES element becomes a Python object, so their number is capped first
            lambda m: m.inputs.add(name="t", datatype="BYTES", shape=[(1 << 22) + 1]).contents.bytes_contents.extend(
                [b""] * ((1 << 22) + 1)
            ),
            "4194305 BYTES elements; at most 4194304",
        ),
    ],
)
def test_malformed_requests_are_bad_requests_that_say_why(build: Any, message: str) -> None:
    infer_request = request()
    build(infer_request)
    with pytest.raises(BadRequest, match=message):
        codec.decode_infer_request(infer_request)


def test_bytes_that_are_not_a_message_are_a_bad_request() -> None:
    with pytest.raises(BadRequest, match=r"not a valid inference\.ModelInferRequest"):
        codec.parse_message("ModelInferRequest", b"\xff\xff\xff")


def test_answers_read_back_with_tritonclients_own_messages() -> None:
    """The wire format is Triton's: its generated classes (in protobuf's default pool, beside ours) parse it."""
    import tritonclient.grpc as grpc_client
    from tritonclient.grpc import service_pb2

    body = codec.encode_infer_response(
        "m", "2", "id-1", [("label", np.array([3, 4], dtype=np.int64)), ("name", np.array([b"x"], dtype=object))]
    )
    result = grpc_client.InferResult(service_pb2.ModelInferResponse.FromString(body))
    assert result.as_numpy("label").tolist() == [3, 4]
    assert result.as_numpy("name").tolist() == [b"x"]
    assert result.get_response().id == "id-1"


def test_the_agent_imports_grpc_only_for_its_grpc_port() -> None:
    """grpcio and protobuf cost an agent ~12 MB resident (bench/grpc_vs_rest.py): without --grpc-port, none of it."""
    import subprocess
    import sys

    probe = "import sys, strata.agent.main; print(sorted(m for m in ('grpc', 'google.protobuf') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
